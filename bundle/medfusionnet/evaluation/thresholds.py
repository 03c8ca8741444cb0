"""Decision thresholds: chosen per finding on the validation split (maximum G-mean), saved with the model as
``thresholds.json`` and read back by evaluation, inference and explanation."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from ..constants import LABELS
from .arrays import as_arrays, has_both_classes


def choose_thresholds(y_prob, y, default: float = 0.5) -> np.ndarray:
    """Per-class threshold that maximises G-mean on ``(y_prob, y)`` (Youden-like, from the ROC curve).

    A class without both label values keeps ``default``.
    """
    y_prob, y = as_arrays(y_prob, y)
    thresholds = np.full(y.shape[1], default, dtype=np.float64)
    for c in range(y.shape[1]):
        if not has_both_classes(y[:, c]):
            continue
        fpr, tpr, cut = roc_curve(y[:, c], y_prob[:, c])
        best = int(np.argmax(np.sqrt(tpr * (1 - fpr))))
        thresholds[c] = float(min(cut[best], 1.0))  # roc_curve's first cut is +inf
    return thresholds


def load_thresholds(path: str | None, labels: Sequence[str] = LABELS, required: bool = True) -> list[float] | None:
    """Per-class thresholds from a ``thresholds.json`` written by training's validation report; None when ``path``
    is None, or when the file is absent and not ``required`` (decisions then use 0.5)."""
    if path is None or (not required and not os.path.isfile(path)):
        return None
    with open(path) as f:
        saved = json.load(f)
    missing = [label for label in labels if label not in saved]
    if missing:
        raise ValueError(f"{path}: no threshold for {missing}")
    return [float(saved[label]) for label in labels]
