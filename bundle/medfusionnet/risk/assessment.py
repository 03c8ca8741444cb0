"""Per-patient tabular risk next to the image findings: the saved two-stage risk model (``models/risk_model.json``
of a packaged bundle, or any ``build_risk_model.py`` output) applied to one image's patient fields.

A patient's fields come from the image's record: NIH's age / sex / view / follow-up (from ``tabular_csv`` or the
DICOM header) give the NIH risk model's features ``age``, ``sex_M``, ``view_PA`` and ``follow_up``; any other
feature is read by its column name from the extra ``tabular_csv`` columns (``clinical`` in the record). The
combined tier of an image is the higher of its image tier and the patient's tabular risk level
(`evaluation.decision.combine_tiers`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..constants import KEY_AGE, KEY_CLINICAL, KEY_FOLLOW_UP, KEY_SEX, KEY_VIEW, RISK_LEVELS
from ..data.tabular import is_missing, parse_age, parse_follow_up, parse_sex, parse_view
from ..evaluation.decision import COMBINED_RULE
from .two_stage import load_models

logger = logging.getLogger(__name__)


def nih_risk_features(record: Mapping) -> dict:
    """The NIH risk model's features of one record: ``age`` (years), ``sex_M`` and ``view_PA`` (1 / 0), ``follow_up``;
    NaN where missing, as `two_stage.nih_tables` encodes them."""
    sex, view = parse_sex(record.get(KEY_SEX)), parse_view(record.get(KEY_VIEW))
    return {
        "age": parse_age(record.get(KEY_AGE)),
        "sex_M": float("nan") if sex is None else float(sex == "M"),
        "view_PA": float("nan") if view is None else float(view == "PA"),
        "follow_up": parse_follow_up(record.get(KEY_FOLLOW_UP)),
    }


def _number(value, column: str, where: str) -> float:
    if is_missing(value):
        return float("nan")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: column '{column}': value '{value}' is not a number; the risk model reads it as a number"
        ) from None
    return number if math.isfinite(number) else float("nan")


class PatientRiskAssessor:
    """Risk level, probability and fired stage-1 rules per outcome of a saved two-stage risk model, for one patient.

    Args:
        path: the risk model JSON (`two_stage.save_models`).
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.models = load_models(path)
        self.features = list(dict.fromkeys(f for m in self.models.values() for f in m.feature_names_in_))

    @classmethod
    def load_if_present(cls, path: str | None) -> PatientRiskAssessor | None:
        """An assessor for ``path``, or None when ``path`` is None or no file is there (a bundle without one)."""
        if not path or not os.path.isfile(path):
            return None
        return cls(path)

    def features_of(self, record: Mapping, where: str = "record") -> dict:
        """``{feature: value}`` (NaN when missing) of the risk model's input features for one record.

        Raises:
            ValueError: naming ``where`` and the column when a value is not a number.
        """
        nih = nih_risk_features(record)
        clinical = record.get(KEY_CLINICAL) or {}
        return {f: nih[f] if f in nih else _number(clinical.get(f), f, where) for f in self.features}

    def assess(self, record: Mapping, where: str = "record") -> dict:
        """The tabular risk of the record's patient.

        Returns ``{"status": "no tabular data", "unknown": [...]}`` when none of the features is present, else
        ``{"status": "ok", "level", "outcomes": {outcome: {"probability", "level", "rules"}}, "unknown"}``: ``level``
        is the highest outcome level; ``rules`` are the outcome's selected stage-1 rules that the patient's known
        values satisfy, in the risk direction (a missing value fires no rule and is listed in ``unknown``).
        """
        values = self.features_of(record, where)
        unknown = [f for f, v in values.items() if math.isnan(v)]
        if len(unknown) == len(values):
            return {"status": "no tabular data", "unknown": unknown}
        outcomes = {}
        for outcome, model in self.models.items():
            frame = pd.DataFrame([{f: values[f] for f in model.feature_names_in_}], dtype=np.float64)
            probability = float(model.predict_proba(frame)[0, 1])
            outcomes[outcome] = {
                "probability": round(probability, 6),
                "level": str(model.predict_risk(frame)[0]),
                "rules": self._fired(model, frame.iloc[0]),
            }
        level = max((o["level"] for o in outcomes.values()), key=RISK_LEVELS.index)
        return {"status": "ok", "level": level, "outcomes": outcomes, "unknown": unknown}

    @staticmethod
    def _fired(model, row: pd.Series) -> list[str]:
        indicators = model.preprocessor_.indicators_
        fired = []
        for rule in model.stage1_[: len(model.selected_features_)]:
            feature = rule["feature"]
            value = float(pd.isna(row[indicators[feature][0]])) if feature in indicators else row[feature]
            if pd.isna(value):
                continue
            holds = value > rule["threshold"] if rule["direction"] == ">" else value <= rule["threshold"]
            if holds:
                fired.append(f"{feature} {rule['direction']} {rule['threshold']:g}")
        return fired

    def describe(self) -> dict:
        """What ``decisions.json`` records of the risk model: its file, outcomes, features and the combining rule."""
        return {
            "path": self.path,
            "outcomes": list(self.models),
            "features": self.features,
            "combined_rule": COMBINED_RULE,
        }
