"""The array form every evaluation function takes: probabilities and binary targets, both ``(N, C)``."""

from __future__ import annotations

import numpy as np
import torch


def as_arrays(y_prob, y) -> tuple[np.ndarray, np.ndarray]:
    """``(y_prob, y)`` as float64 probabilities and int64 0/1 targets, both ``(N, C)`` (tensors or arrays)."""
    y_prob = y_prob.detach().cpu().numpy() if isinstance(y_prob, torch.Tensor) else np.asarray(y_prob)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y_prob.shape != y.shape or y_prob.ndim != 2:
        raise ValueError(f"y_prob {y_prob.shape} and y {y.shape} must both be (N, C)")
    return y_prob.astype(np.float64), (y > 0.5).astype(np.int64)


def has_both_classes(y_col: np.ndarray) -> bool:
    """Whether a 0/1 target column holds both label values (so AUC and threshold choice are defined)."""
    return 0 < y_col.sum() < len(y_col)
