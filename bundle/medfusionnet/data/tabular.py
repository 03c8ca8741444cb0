"""Parsing and encoding of the tabular patient fields (age, sex, view position, follow-up number).

One fitted `TabularEncoder` is saved as JSON next to the model and reused by training, evaluation and inference,
so the network always sees the same encoding. Missing or impossible values never raise: they map to the "missing"
encoding, with a missing-indicator feature per field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from ..constants import (
    KEY_AGE,
    KEY_FOLLOW_UP,
    KEY_SEX,
    KEY_VIEW,
    MAX_PLAUSIBLE_AGE,
    MISSING_STRINGS,
    SEX_CATEGORIES,
    VIEW_CATEGORIES,
)

FEATURE_NAMES: tuple[str, ...] = (
    "age",
    "age_missing",
    *(f"sex_{c}" for c in SEX_CATEGORIES),
    "sex_missing",
    *(f"view_{c}" for c in VIEW_CATEGORIES),
    "view_missing",
    "follow_up",
    "follow_up_missing",
)
NUM_TABULAR_FEATURES = len(FEATURE_NAMES)

_AGE_UNITS_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
_AGE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)


def is_missing(value) -> bool:
    """Whether a raw field is missing: None, NaN, or a string in `constants.MISSING_STRINGS` (the one definition
    of "missing" in the package; the risk model's CSV reader uses the same strings)."""
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_STRINGS


def parse_age(value) -> float:
    """Age in years from a number or a DICOM-style string (``58``, ``"058Y"``, ``"013M"``, ``"001D"``).

    Returns NaN for missing, unparseable, negative or implausible (> 120 years) ages.
    """
    if is_missing(value):
        return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        years = float(value)
    else:
        match = _AGE_PATTERN.match(str(value))
        if match is None:
            return float("nan")
        years = float(match.group(1)) / _AGE_UNITS_PER_YEAR[(match.group(2) or "Y").upper()]
    if not (0.0 <= years <= MAX_PLAUSIBLE_AGE):
        return float("nan")
    return years


def parse_sex(value) -> str | None:
    """``"M"`` or ``"F"`` (also from ``male``/``female``), else None (missing or other)."""
    if is_missing(value):
        return None
    text = str(value).strip().upper()
    text = {"MALE": "M", "FEMALE": "F"}.get(text, text)
    return text if text in SEX_CATEGORIES else None


def parse_view(value) -> str | None:
    """``"PA"`` or ``"AP"``, else None (missing or another projection such as ``LL``)."""
    if is_missing(value):
        return None
    text = str(value).strip().upper()
    return text if text in VIEW_CATEGORIES else None


def parse_follow_up(value) -> float:
    """Follow-up number as a non-negative float, NaN when missing or invalid."""
    if is_missing(value):
        return float("nan")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if number >= 0 and math.isfinite(number) else float("nan")


def missing_tabular_vector(num_features: int = NUM_TABULAR_FEATURES) -> np.ndarray:
    """The encoding of a record with every field missing: zero values, all missing indicators set.

    It does not depend on the fitted scaling, so networks use it for ``tabular=None``. For another feature layout
    (``num_features`` other than this encoder's) it is all zeros.
    """
    if num_features != NUM_TABULAR_FEATURES:
        return np.zeros(num_features, dtype=np.float32)
    return np.array([1.0 if name.endswith("_missing") else 0.0 for name in FEATURE_NAMES], dtype=np.float32)


class TabularEncoder:
    """Encodes raw patient fields into a float32 vector of `NUM_TABULAR_FEATURES` values (see `FEATURE_NAMES`).

    Age is standardised with the training mean and standard deviation, the follow-up number is ``log1p``-scaled by
    the training maximum, sex and view are one-hot; each field has a missing indicator and a zero value slot when
    missing. Follows scikit-learn's conventions: ``fit`` returns ``self``, learned attributes end in ``_``.
    """

    def __init__(self):
        pass

    def fit(self, records: Sequence[Mapping]) -> TabularEncoder:
        """Learn the scaling from training records (mappings with ``age``, ``sex``, ``view``, ``follow_up``)."""
        ages = np.array([parse_age(r.get(KEY_AGE)) for r in records], dtype=np.float64)
        ages = ages[np.isfinite(ages)]
        self.age_mean_ = float(ages.mean()) if ages.size else 50.0
        self.age_std_ = float(ages.std()) if ages.size > 1 and ages.std() > 0 else 1.0
        follow = np.array([parse_follow_up(r.get(KEY_FOLLOW_UP)) for r in records], dtype=np.float64)
        follow = follow[np.isfinite(follow)]
        self.follow_up_scale_ = float(np.log1p(follow.max())) if follow.size and follow.max() > 0 else 1.0
        return self

    def _check_fitted(self):
        if not hasattr(self, "age_mean_"):
            raise RuntimeError("TabularEncoder is not fitted: call fit(records) or TabularEncoder.load(path)")

    def encode(self, record: Mapping) -> np.ndarray:
        """Encode one record into a ``(NUM_TABULAR_FEATURES,)`` float32 vector."""
        self._check_fitted()
        out = np.zeros(NUM_TABULAR_FEATURES, dtype=np.float32)
        age = parse_age(record.get(KEY_AGE))
        if math.isnan(age):
            out[1] = 1.0
        else:
            out[0] = (age - self.age_mean_) / self.age_std_
        sex = parse_sex(record.get(KEY_SEX))
        out[2 + SEX_CATEGORIES.index(sex) if sex else 4] = 1.0
        view = parse_view(record.get(KEY_VIEW))
        out[5 + VIEW_CATEGORIES.index(view) if view else 7] = 1.0
        follow = parse_follow_up(record.get(KEY_FOLLOW_UP))
        if math.isnan(follow):
            out[9] = 1.0
        else:
            out[8] = np.log1p(follow) / self.follow_up_scale_
        return out

    def transform(self, records: Sequence[Mapping]) -> np.ndarray:
        """Encode many records into an ``(N, NUM_TABULAR_FEATURES)`` float32 array."""
        return np.stack([self.encode(r) for r in records]) if records else np.zeros((0, NUM_TABULAR_FEATURES), "f4")

    def state_dict(self) -> dict:
        """The learned parameters and the feature layout, as plain JSON-able values."""
        self._check_fitted()
        return {
            "feature_names": list(FEATURE_NAMES),
            "age_mean": self.age_mean_,
            "age_std": self.age_std_,
            "follow_up_scale": self.follow_up_scale_,
        }

    def save(self, path: str) -> TabularEncoder:
        """Write the encoder as JSON; returns ``self``."""
        from ..files import write_json_atomic

        write_json_atomic(path, self.state_dict())
        return self

    @classmethod
    def load(cls, path: str) -> TabularEncoder:
        """Read an encoder written by `save`; the feature layout must match this version's."""
        with open(path) as f:
            state = json.load(f)
        if state.get("feature_names") != list(FEATURE_NAMES):
            raise ValueError(
                f"tabular encoder '{path}' has features {state.get('feature_names')}; expected {list(FEATURE_NAMES)}"
            )
        enc = cls()
        enc.age_mean_ = float(state["age_mean"])
        enc.age_std_ = float(state["age_std"])
        enc.follow_up_scale_ = float(state["follow_up_scale"])
        return enc
