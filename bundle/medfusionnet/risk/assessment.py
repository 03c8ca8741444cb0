"""Per-patient tabular risk next to the image findings: the saved two-stage risk model (``models/risk_model.json``
of a packaged bundle, or any ``build_risk_model.py`` output) applied to one image's patient fields.

A patient's fields come from the image's record (NIH's age / sex / view / follow-up from ``tabular_csv`` or the
DICOM header; other columns of ``tabular_csv`` under ``clinical``), parsed by the risk model's declared
``tabular_fields`` with the network's own `data.tabular.TabularEncoder`. The
combined tier of an image is the higher of its image tier and the patient's tabular risk level
(`evaluation.decision.combine_tiers`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..constants import RISK_LEVELS
from ..data.tabular import TabularEncoder, parse_fields
from ..evaluation.decision import COMBINED_RULE
from .two_stage import models_from_document

logger = logging.getLogger(__name__)


class PatientRiskAssessor:
    """Risk level, probability and fired stage-1 rules per outcome of a saved two-stage risk model, for one patient.

    Args:
        document: the parsed risk model JSON (`two_stage.save_models`); `load` reads a file.
        where: the file it came from, for error messages and ``decisions.json``.
    """

    def __init__(self, document: Mapping, where: str = "risk model"):
        self.where = str(where)
        self.document = document
        self.models = models_from_document(document, where)
        fields = document.get("tabular_fields")
        if not fields:
            raise ValueError(f"{where}: the risk model declares no 'tabular_fields'; rebuild it with this version")
        self.encoder = TabularEncoder(parse_fields(fields, f"{where}: tabular_fields"))
        self.features = list(dict.fromkeys(f for m in self.models.values() for f in m.feature_names_in_))
        absent = [f for f in self.features if f not in self.encoder.frame([]).columns]
        if absent:
            raise ValueError(f"{where}: the models read {absent}, which its tabular_fields do not produce")

    @classmethod
    def load(cls, path: str) -> PatientRiskAssessor:
        """The assessor of a risk model JSON file (`two_stage.save_models`)."""
        with open(path) as f:
            return cls(json.load(f), str(path))

    @classmethod
    def load_if_present(cls, path: str | None) -> PatientRiskAssessor | None:
        """An assessor for ``path``, or None when ``path`` is None or no file is there (a bundle without one)."""
        if not path or not os.path.isfile(path):
            return None
        return cls.load(path)

    def features_of(self, record: Mapping) -> dict:
        """``{feature: value}`` (NaN when missing or unusable) of the risk model's input features for one record:
        the declared fields' parse (`data.tabular.TabularEncoder.frame`), the network's own."""
        row = self.encoder.frame([record]).iloc[0]
        return {f: float(row[f]) for f in self.features}

    def probabilities(self, record: Mapping) -> np.ndarray | None:
        """Stage-2 probability per outcome (in `models` order), or None when none of the features is present."""
        values = self.features_of(record)
        if all(math.isnan(v) for v in values.values()):
            return None
        return np.array([self._probability(m, values) for m in self.models.values()], dtype=np.float64)

    @staticmethod
    def _frame(model, values: dict) -> pd.DataFrame:
        return pd.DataFrame([{f: values[f] for f in model.feature_names_in_}], dtype=np.float64)

    def _probability(self, model, values: dict) -> float:
        return float(model.predict_proba(self._frame(model, values))[0, 1])

    def assess(self, record: Mapping, where: str = "record") -> dict:
        """The tabular risk of the record's patient.

        Returns ``{"status": "no tabular data", "unknown": [...]}`` when none of the features is present, else
        ``{"status": "ok", "level", "outcomes": {outcome: {"probability", "level", "rules"}}, "unknown"}``: ``level``
        is the highest outcome level; ``rules`` are the outcome's selected stage-1 rules that the patient's known
        values satisfy, in the risk direction (a missing value fires no rule and is listed in ``unknown``). A
        present value that cannot be used (out of range, not a number, an unknown category) is missing, named
        under ``invalid`` with the reason and in a warning that names ``where``.
        """
        values = self.features_of(record)
        unknown = [f for f, v in values.items() if math.isnan(v)]
        invalid = {f.name: p for f in self.encoder.fields for p in [f.parse_value(f.raw(record))[1]] if p}
        if invalid:
            logger.warning(
                "%s: tabular value(s) read as missing: %s", where, "; ".join(f"{k}: {v}" for k, v in invalid.items())
            )
        if len(unknown) == len(values):
            return {"status": "no tabular data", "unknown": unknown, **({"invalid": invalid} if invalid else {})}
        outcomes = {}
        for outcome, model in self.models.items():
            frame = self._frame(model, values)
            outcomes[outcome] = {
                "probability": round(self._probability(model, values), 6),
                "level": str(model.predict_risk(frame)[0]),
                "rules": self._fired(model, frame.iloc[0]),
            }
        level = max((o["level"] for o in outcomes.values()), key=RISK_LEVELS.index)
        return {
            "status": "ok",
            "level": level,
            "outcomes": outcomes,
            "unknown": unknown,
            **({"invalid": invalid} if invalid else {}),
        }

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
            "path": self.where,
            "outcomes": list(self.models),
            "features": self.features,
            "combined_rule": COMBINED_RULE,
        }
