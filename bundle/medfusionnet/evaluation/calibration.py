"""Calibration of the reported probabilities: per-finding temperature scaling fitted on validation logits (Guo et
al. 2017) and the expected calibration error. Temperature scaling is monotone, so it changes the reported
probabilities, never a decision at its threshold."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import calibration_binning
from scipy.special import expit

from ..constants import LABELS
from ..files import write_json_atomic


class TemperatureScaling:
    """Per-finding temperature scaling of logits: ``calibrated = sigmoid(logit / T_c)``.

    ``fit`` minimises the binary cross-entropy of the validation labels over ``log T_c`` (L-BFGS); a finding without
    both classes in the data keeps ``T = 1``. ``temperatures_`` is set by `fit` or `load`.
    """

    def __init__(self, labels: Sequence[str] = LABELS):
        self.labels = list(labels)

    def fit(self, logits: np.ndarray, y: np.ndarray) -> TemperatureScaling:
        """Fit on ``(N, C)`` logits and 0/1 labels; returns self."""
        logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
        y = torch.as_tensor(np.asarray(y, dtype=np.float64))
        if logits.shape != y.shape or logits.shape[1] != len(self.labels):
            raise ValueError(
                f"logits {tuple(logits.shape)} and labels {tuple(y.shape)} must both be (N, " f"{len(self.labels)})"
            )
        both = (y.min(0).values == 0) & (y.max(0).values == 1)
        log_t = torch.zeros(len(self.labels), dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            scaled = logits[:, both] / log_t[both].exp()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scaled, y[:, both])
            loss.backward()
            return loss

        if bool(both.any()):
            optimiser.step(closure)
        self.temperatures_ = [float(t) if b else 1.0 for t, b in zip(log_t.detach().exp(), both)]
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` from logits."""
        scaled = np.asarray(logits, dtype=np.float64) / np.asarray(self.temperatures_)
        return expit(scaled)  # the logistic function without overflow for large negative logits

    def save(self, path: str) -> None:
        """Write ``{"temperatures": {finding: T}}`` as JSON."""
        write_json_atomic(
            path, {"method": "temperature_scaling", "temperatures": dict(zip(self.labels, self.temperatures_))}
        )

    @classmethod
    def load(cls, path: str, labels: Sequence[str] = LABELS) -> TemperatureScaling:
        """Read `save`'s JSON; raises ValueError naming the file when a finding has no positive temperature."""
        with open(path) as f:
            saved = json.load(f).get("temperatures", {})
        bad = [label for label in labels if not (isinstance(saved.get(label), (int, float)) and saved[label] > 0)]
        if bad:
            raise ValueError(f"{path}: no positive temperature for {bad}")
        scaler = cls(labels)
        scaler.temperatures_ = [float(saved[label]) for label in labels]
        return scaler

    @classmethod
    def load_if_present(
        cls, path: str, labels: Sequence[str] = LABELS, enabled: bool = True
    ) -> TemperatureScaling | None:
        """`load` when ``enabled`` and ``path`` exists; None otherwise (probabilities are reported uncalibrated)."""
        return cls.load(path, labels) if enabled and os.path.isfile(path) else None


def probabilities_to_logits(probs: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Inverse sigmoid, with probabilities clipped to ``[eps, 1 - eps]``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def calibration_error(probs: np.ndarray, y: np.ndarray, num_bins: int = 10) -> np.ndarray:
    """Expected calibration error of each finding ``(C,)`` over the ``N`` images of ``(N, C)`` probabilities.

    Bins with MONAI's `calibration_binning` (the functional core of `CalibrationErrorMetric`, without the metric's
    cross-rank buffer sync, so one process can call it alone): the images are laid out as the spatial axis of one
    ``(1, C, N)`` sample; ECE = sum over bins of (images in bin / N) x |mean probability - positive rate|.
    """
    probs = torch.as_tensor(np.asarray(probs, dtype=np.float32)).T[None].contiguous()
    y = torch.as_tensor(np.asarray(y, dtype=np.float32)).T[None].contiguous()
    mean_p, mean_y, counts = calibration_binning(probs, y, num_bins=num_bins)
    gaps = torch.nan_to_num((mean_p - mean_y).abs(), nan=0.0)
    ece = (counts * gaps).sum(-1) / counts.sum(-1).clamp(min=1)
    return ece.reshape(-1).numpy().astype(np.float64)
