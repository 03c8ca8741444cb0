"""Decision support on top of the 14 probabilities: per-finding decisions, a risk tier, and calibration.

- `RiskTierRule`: ``high`` when an urgent finding (default: pneumothorax) or ``several`` findings cross their
  thresholds, ``medium`` when any finding does, ``low`` otherwise.
- `TemperatureScaling`: one temperature per finding, fitted on validation logits (Guo et al. 2017); it changes the
  reported probabilities, not the decisions, because each finding's threshold is compared with the uncalibrated
  score and temperature scaling is monotone.
- `calibration_error`: expected calibration error per finding from MONAI's calibration binning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import calibration_binning

from .constants import LABELS, RISK_LEVELS
from .files import write_json_atomic

URGENT_FINDINGS: tuple[str, ...] = ("Pneumothorax",)


class RiskTierRule:
    """Risk tier of one image from its per-finding decisions.

    Args:
        urgent: findings that make the tier ``high`` on their own.
        high_risk_count: number of positive findings that makes the tier ``high``.
        labels: finding names, in the order of the decisions.
    """

    def __init__(
        self, urgent: Sequence[str] = URGENT_FINDINGS, high_risk_count: int = 2, labels: Sequence[str] = LABELS
    ):
        unknown = [f for f in urgent if f not in labels]
        if unknown:
            raise ValueError(f"urgent findings {unknown} are not among the labels {list(labels)}")
        if int(high_risk_count) < 1:
            raise ValueError(
                f"high_risk_count={high_risk_count}: the number of findings that makes a tier high must be >= 1"
            )
        self.urgent, self.high_risk_count, self.labels = set(urgent), int(high_risk_count), list(labels)

    def __call__(self, decisions: Sequence[bool]) -> str:
        """``low`` / ``medium`` / ``high`` for one image's decisions (one bool per label)."""
        positives = [label for label, d in zip(self.labels, decisions) if d]
        low, medium, high = RISK_LEVELS
        if len(positives) >= self.high_risk_count or self.urgent.intersection(positives):
            return high
        return medium if positives else low

    def describe(self) -> str:
        """The rule in words, written next to the outputs."""
        return (
            f"high: any of {sorted(self.urgent)} or at least {self.high_risk_count} findings at or above their "
            "thresholds; medium: any one finding; low: none"
        )


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
        return 1.0 / (1.0 + np.exp(-scaled))

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
