"""Decision support on top of the 14 probabilities: per-finding decisions at the saved thresholds, a risk tier
(`RiskTierRule`: ``high`` when an urgent finding, by default pneumothorax, or ``high_risk_count`` findings cross
their thresholds, ``medium`` when any finding does, ``low`` otherwise), and the per-image decision document that
inference writes (`decision_document`), with the patient's tabular risk and the combined tier (`combine_tiers`)
where the bundle has a risk model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..constants import LABELS, RISK_LEVELS
from .calibration import TemperatureScaling, probabilities_to_logits

URGENT_FINDINGS: tuple[str, ...] = ("Pneumothorax",)
COMBINED_RULE = (
    "combined tier: the higher of the image tier and the tabular risk level (the highest level over the risk "
    "model's outcomes); the image tier alone when the patient has no tabular data the risk model reads"
)


def combine_tiers(image_tier: str, tabular_level: str | None) -> str:
    """The higher of the two levels (`constants.RISK_LEVELS` order); ``image_tier`` alone without a tabular level."""
    if tabular_level is None:
        return image_tier
    return max(image_tier, tabular_level, key=RISK_LEVELS.index)


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


def decision_document(
    names: Sequence[str],
    probs: np.ndarray,
    thresholds: Sequence[float],
    rule: RiskTierRule,
    calibration: TemperatureScaling | None = None,
    skipped: Sequence[dict] = (),
    labels: Sequence[str] = LABELS,
    risks: dict | None = None,
) -> dict:
    """The decisions of a set of images, as inference writes them to ``decisions.json``.

    Per image (sorted by name): the probability of each finding (temperature-scaled when ``calibration`` is
    given), the decision at its threshold, the positive findings and the risk tier of ``rule``. The thresholds are
    listed on the scale of the reported probabilities, so a decision is true exactly when the reported probability
    reaches its threshold. ``skipped`` (marks of `data.unreadable`, each with ``name`` and ``error``) follow with
    status ``unreadable`` and the reader's error.

    With ``risks`` (``{name: assessment}`` of `risk.assessment.PatientRiskAssessor`, from a bundle with a risk
    model) every image also gets ``tabular_risk`` (the assessment: level, probability and fired rules per outcome)
    and ``combined_tier`` (`combine_tiers` of the tier and the tabular level), and the document
    the combining rule.
    """
    thresholds = np.asarray(thresholds, dtype=float)
    probs = np.asarray(probs, dtype=float).reshape(len(names), len(labels))
    order = sorted(range(len(names)), key=lambda i: names[i])
    shown = calibration.transform(probabilities_to_logits(probs)) if calibration else probs
    decisions = probs >= thresholds
    images = [
        {
            "image": names[i],
            "status": "ok",
            "tier": rule(decisions[i]),
            "findings": [label for label, d in zip(labels, decisions[i]) if d],
            "probabilities": {label: round(float(v), 6) for label, v in zip(labels, shown[i])},
            "decisions": {label: bool(d) for label, d in zip(labels, decisions[i])},
        }
        for i in order
    ]
    if risks is not None:
        for item in images:
            risk = risks.get(item["image"], {"status": "no tabular data"})
            item["tabular_risk"] = risk
            item["combined_tier"] = combine_tiers(item["tier"], risk.get("level"))
    images += [{"image": mark["name"], "status": "unreadable", "error": mark["error"]} for mark in skipped]
    shown_thresholds = (
        calibration.transform(probabilities_to_logits(thresholds[None]))[0] if calibration else thresholds
    )
    document = {
        "rule": rule.describe(),
        "calibrated": calibration is not None,
        "thresholds": {label: round(float(t), 6) for label, t in zip(labels, shown_thresholds)},
        "images": images,
    }
    if risks is not None:
        document["combined_rule"] = COMBINED_RULE
    return document
