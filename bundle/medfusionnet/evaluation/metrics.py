"""Multilabel classification metrics in MONAI's layers: pure functions, then cumulative metrics.

All functions take probabilities ``y_prob`` and binary targets ``y`` of shape ``(N, C)``. Per-class values are
NaN where a class is undefined on the data (e.g. AUC when a split holds only one label value for that finding);
means skip NaN, so one such class never turns the mean into NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from sklearn.metrics import average_precision_score, roc_auc_score

from .arrays import as_arrays, has_both_classes
from .thresholds import choose_thresholds

THRESHOLD_METRICS = ("f1", "gmean", "accuracy", "sensitivity", "specificity")


def nanmean(values) -> float:
    """Mean of the finite values; NaN only when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def roc_auc_per_class(y_prob, y) -> np.ndarray:
    """ROC-AUC per class (scikit-learn); NaN for a class whose targets are all 0 or all 1."""
    y_prob, y = as_arrays(y_prob, y)
    return np.array(
        [roc_auc_score(y[:, c], y_prob[:, c]) if has_both_classes(y[:, c]) else np.nan for c in range(y.shape[1])]
    )


def average_precision_per_class(y_prob, y) -> np.ndarray:
    """Area under the precision-recall curve (average precision) per class; NaN for a class with no positive."""
    y_prob, y = as_arrays(y_prob, y)
    return np.array(
        [average_precision_score(y[:, c], y_prob[:, c]) if y[:, c].any() else np.nan for c in range(y.shape[1])]
    )


def confusion_per_class(y_prob, y, thresholds) -> np.ndarray:
    """Counts ``(C, 4)`` of TP, FP, TN, FN per class with ``y_prob >= threshold`` predicting positive."""
    y_prob, y = as_arrays(y_prob, y)
    pred = (y_prob >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)
    tp = (pred & y).sum(0)
    fp = (pred & (1 - y)).sum(0)
    tn = ((1 - pred) & (1 - y)).sum(0)
    fn = ((1 - pred) & y).sum(0)
    return np.stack([tp, fp, tn, fn], axis=1)


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def threshold_metric_per_class(y_prob, y, thresholds, metric: str) -> np.ndarray:
    """``f1``, ``gmean`` (sqrt(sensitivity x specificity)), ``accuracy``, ``sensitivity`` or ``specificity`` per
    class at the given thresholds. F1 is NaN for a class with no positive and no predicted positive; sensitivity
    (specificity) is NaN without positives (negatives), and so is G-mean."""
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"metric='{metric}' is not supported; use one of {THRESHOLD_METRICS}")
    tp, fp, tn, fn = confusion_per_class(y_prob, y, thresholds).T
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    if metric == "sensitivity":
        return sensitivity
    if metric == "specificity":
        return specificity
    if metric == "gmean":
        return np.sqrt(sensitivity * specificity)
    if metric == "accuracy":
        return _ratio(tp + tn, tp + fp + tn + fn)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def summarize(y_prob, y, labels: Sequence[str], thresholds=None) -> dict:
    """Full report: per-class and mean AUC, AUPRC and the threshold metrics.

    ``thresholds=None`` chooses them on this data (`choose_thresholds`), which is how validation picks the
    thresholds saved with the model; evaluation passes the saved ones.
    """
    y_prob_np, y_np = as_arrays(y_prob, y)
    chosen = choose_thresholds(y_prob_np, y_np) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    per_class = {
        "auc": roc_auc_per_class(y_prob_np, y_np),
        "auprc": average_precision_per_class(y_prob_np, y_np),
        **{m: threshold_metric_per_class(y_prob_np, y_np, chosen, m) for m in THRESHOLD_METRICS},
        "threshold": chosen,
    }
    report = {
        "num_images": int(y_np.shape[0]),
        "positives": dict(zip(labels, y_np.sum(0).astype(int).tolist())),
        "mean": {k: nanmean(v) for k, v in per_class.items() if k != "threshold"},
        "per_class": {
            label: {k: (None if not np.isfinite(v[i]) else float(v[i])) for k, v in per_class.items()}
            for i, label in enumerate(labels)
        },
        "undefined_auc": [labels[i] for i in np.flatnonzero(~np.isfinite(per_class["auc"]))],
    }
    return report


class _MultiLabelMetric(CumulativeIterationMetric):
    """Buffers ``(y_prob, y)`` batches; `aggregate` returns the NaN-skipping mean and keeps ``per_class_``."""

    def __init__(self, per_class_fn):
        super().__init__()
        self.per_class_fn = per_class_fn
        self.per_class_ = np.zeros(0)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):
        if y is None:
            raise ValueError(f"{type(self).__name__} needs targets y")
        if y_pred.ndim == 1:  # a decollated single item
            y_pred, y = y_pred[None], y[None]
        return y_pred.detach().float(), y.detach().float()

    def aggregate(self) -> float:
        """Mean over classes of the per-class values of everything buffered so far."""
        y_prob, y = self.get_buffer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.per_class_ = self.per_class_fn(y_prob, y)
        return nanmean(self.per_class_)


class MultiLabelAUC(_MultiLabelMetric):
    """Cumulative mean ROC-AUC over classes (`roc_auc_per_class`); ``per_class_`` after `aggregate`."""

    def __init__(self):
        super().__init__(roc_auc_per_class)


class MultiLabelAUPRC(_MultiLabelMetric):
    """Cumulative mean average precision over classes (`average_precision_per_class`)."""

    def __init__(self):
        super().__init__(average_precision_per_class)


class MultiLabelThresholdMetric(_MultiLabelMetric):
    """Cumulative mean of a threshold metric (``f1``, ``gmean``, ``accuracy``, ...) over classes.

    Args:
        metric: one of `THRESHOLD_METRICS`.
        thresholds: per-class thresholds, or None to choose them on the buffered data (max G-mean).
    """

    def __init__(self, metric: str = "f1", thresholds: Sequence[float] | None = None):
        super().__init__(self._at_thresholds)
        if metric not in THRESHOLD_METRICS:
            raise ValueError(f"metric='{metric}' is not supported; use one of {THRESHOLD_METRICS}")
        self.metric = metric
        self.thresholds = thresholds

    def _at_thresholds(self, y_prob, y):
        thresholds = choose_thresholds(y_prob, y) if self.thresholds is None else self.thresholds
        return threshold_metric_per_class(y_prob, y, thresholds, self.metric)
