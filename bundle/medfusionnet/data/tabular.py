"""The tabular patient fields: their declaration (`TabularField`, a list of them in the config's ``tabular_fields``),
parsing, and the one fitted encoding (`TabularEncoder`) that training, evaluation and inference share.

NIH's age, sex, view position and follow-up number are the default fields (`NIH_FIELDS`, written out in
``configs/train.yaml``). One fitted `TabularEncoder` is saved as JSON next to the model and reused by every workflow,
so the network always sees the same encoding. Missing, out-of-range or unknown values never raise: they map to the
field's "missing" encoding (its missing-indicator feature set), and `TabularEncoder.report_invalid` counts them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..constants import KEY_CLINICAL, MAX_PLAUSIBLE_AGE, MISSING_STRINGS, SEX_CATEGORIES, VIEW_CATEGORIES

logger = logging.getLogger(__name__)


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


FIELD_KINDS: tuple[str, ...] = ("numeric", "binary", "categorical")
PARSERS: tuple[str, ...] = ("number", "age")  # age: years from a number or a DICOM age string (058Y, 013M)
SCALES: tuple[str, ...] = ("standard", "log1p")
_TRUE, _FALSE = ("1", "1.0", "true", "yes", "y"), ("0", "0.0", "false", "no", "n")
_FIELD_KEYS = ("name", "kind", "column", "range", "categories", "aliases", "missing", "parse", "scale", "bins")


@dataclass(frozen=True)
class TabularField:
    """One declared tabular field.

    Attributes:
        name: the field's name: the record key it reads (``age``), and the prefix of its encoded features.
        kind: ``numeric`` (value and missing flag), ``binary`` (0/1 and missing flag) or ``categorical`` (one
            indicator per category and a missing flag: a linear projection of it is the category's embedding).
        column: the ``tabular_csv`` column it reads when the record has no key ``name`` (default: ``name``).
        range: plausible ``[low, high]`` of a numeric value (``null`` for no bound); values outside are missing.
        categories: a categorical field's values (compared upper-cased); any other value is missing.
        aliases: other spellings of categories (``{MALE: M}``).
        missing: sentinels meaning "missing" besides `constants.MISSING_STRINGS`.
        parse: ``number``, or ``age`` for DICOM-style ages (``058Y``, ``013M``).
        scale: numeric scaling fitted on training: ``standard`` (z-score) or ``log1p`` (log1p over log1p of the
            training maximum).
        bins: clinical bins ``{edges: [...], labels: [...]}`` that make rules on the field readable.
    """

    name: str
    kind: str = "numeric"
    column: str | None = None
    range: tuple | None = None
    categories: tuple = ()
    aliases: dict = field(default_factory=dict)
    missing: tuple = ()
    parse: str = "number"
    scale: str = "standard"
    bins: dict | None = None

    @classmethod
    def from_mapping(cls, entry, where: str = "tabular_fields") -> TabularField:
        """A checked field from a config entry.

        Raises:
            ValueError: naming ``where`` and the field for an unknown key or kind, a bad range, a categorical field
                without categories, an alias to an undeclared category, or an unknown parse or scale.
        """
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise ValueError(f"{where}: every field needs a 'name' (text); got {entry!r}")
        name = entry["name"].strip()
        at = f"{where}: field '{name}'"
        unknown = sorted(set(entry) - set(_FIELD_KEYS))
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {unknown}; a field takes {list(_FIELD_KEYS)}")
        kind = entry.get("kind", "numeric")
        if kind not in FIELD_KINDS:
            raise ValueError(f"{at}: kind '{kind}' is not one of {list(FIELD_KINDS)}")
        for key, allowed in (("parse", PARSERS), ("scale", SCALES)):
            if entry.get(key, allowed[0]) not in allowed:
                raise ValueError(f"{at}: {key} '{entry[key]}' is not one of {list(allowed)}")
        bounds = entry.get("range")
        if bounds is not None:
            try:
                low, high = (
                    -math.inf if bounds[0] is None else float(bounds[0]),
                    math.inf if bounds[1] is None else float(bounds[1]),
                )
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"{at}: range {bounds!r} must be [low, high] (numbers or null)") from None
            if len(bounds) != 2 or not low < high:
                raise ValueError(f"{at}: range {bounds!r} must be [low, high] with low < high")
            bounds = (low, high)
        categories = tuple(str(c).strip().upper() for c in entry.get("categories") or ())
        if kind == "categorical" and not categories:
            raise ValueError(f"{at}: a categorical field needs 'categories'")
        if len(set(categories)) != len(categories):
            raise ValueError(f"{at}: categories {list(categories)} repeat a value")
        aliases = {str(k).strip().upper(): str(v).strip().upper() for k, v in (entry.get("aliases") or {}).items()}
        stray = sorted(v for v in aliases.values() if v not in categories)
        if stray:
            raise ValueError(f"{at}: aliases point to {stray}, which are not among the categories {list(categories)}")
        return cls(
            name=name,
            kind=kind,
            column=entry.get("column"),
            range=bounds,
            categories=categories,
            aliases=aliases,
            missing=tuple(str(m).strip().lower() for m in entry.get("missing") or ()),
            parse=entry.get("parse", "number"),
            scale=entry.get("scale", "standard"),
            bins=entry.get("bins"),
        )

    def to_dict(self) -> dict:
        """JSON-ready declaration (infinite range bounds as null), `from_mapping`'s input format."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, (), {}) or k in ("name", "kind")}
        if self.range is not None:
            out["range"] = [None if math.isinf(v) else v for v in self.range]
        for key in ("categories", "missing"):
            if key in out:
                out[key] = list(out[key])
        return out

    def value_names(self) -> list[str]:
        """Names of the field's value features, which are also its `TabularEncoder.frame` columns: the field's name,
        or one ``<name>_<category>`` per category."""
        return [f"{self.name}_{c}" for c in self.categories] if self.kind == "categorical" else [self.name]

    def feature_names(self) -> list[str]:
        """Names of the field's encoded features, its missing flag last."""
        return [*self.value_names(), f"{self.name}_missing"]

    def raw(self, record: Mapping):
        """The field's raw value in ``record``: its key ``name``, else ``record['clinical'][column or name]``."""
        if record.get(self.name) is not None:
            return record[self.name]
        return (record.get(KEY_CLINICAL) or {}).get(self.column or self.name)

    def parse_value(self, raw):
        """``(value, problem)``: the parsed value (a float, or a category for categorical fields; None or NaN when
        missing) and, for a present value that is unusable, a short reason (else None)."""
        if is_missing(raw) or (isinstance(raw, str) and raw.strip().lower() in self.missing):
            return (None if self.kind == "categorical" else math.nan), None
        if self.kind == "categorical":
            text = str(raw).strip().upper()
            text = self.aliases.get(text, text)
            return (text, None) if text in self.categories else (None, f"'{raw}' is not one of {list(self.categories)}")
        if self.kind == "binary":
            text = str(raw).strip().lower()
            if text in _TRUE or text in _FALSE:
                return float(text in _TRUE), None
            return math.nan, f"'{raw}' is not 0/1"
        value = _age_years(raw) if self.parse == "age" else _number(raw)
        if math.isnan(value):
            return value, f"'{raw}' is not a number"
        low, high = self.range or (-math.inf, math.inf)
        if not low <= value <= high:
            return math.nan, f"{value:g} is outside the plausible range [{low:g}, {high:g}]"
        return value, None


def _number(raw) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _age_years(raw) -> float:
    """Years from a number or a DICOM age string, NaN when unparseable (no range check)."""
    if isinstance(raw, (int, float, np.integer, np.floating)) and not isinstance(raw, bool):
        return _number(raw)
    match = _AGE_PATTERN.match(str(raw))
    if match is None:
        return math.nan
    return float(match.group(1)) / _AGE_UNITS_PER_YEAR[(match.group(2) or "Y").upper()]


def parse_fields(entries, where: str = "tabular_fields") -> tuple[TabularField, ...]:
    """Checked fields from a config list (`TabularField.from_mapping` per entry); names must be unique."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"{where}: give a non-empty list of fields (name, kind, ...); got {entries!r}")
    fields = tuple(e if isinstance(e, TabularField) else TabularField.from_mapping(e, where) for e in entries)
    names = [f.name for f in fields]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: field name(s) {repeated} declared more than once")
    return fields


NIH_FIELDS: tuple[TabularField, ...] = parse_fields(
    [
        {"name": "age", "kind": "numeric", "parse": "age", "range": [0, MAX_PLAUSIBLE_AGE]},
        {
            "name": "sex",
            "kind": "categorical",
            "categories": list(SEX_CATEGORIES),
            "aliases": {"MALE": "M", "FEMALE": "F"},
        },
        {"name": "view", "kind": "categorical", "categories": list(VIEW_CATEGORIES)},
        {"name": "follow_up", "kind": "numeric", "range": [0, None], "scale": "log1p"},
    ],
    "NIH_FIELDS",
)
FEATURE_NAMES: tuple[str, ...] = tuple(n for f in NIH_FIELDS for n in f.feature_names())
NUM_TABULAR_FEATURES = len(FEATURE_NAMES)


def field_slices(fields: Sequence[TabularField]) -> list[tuple[int, int, int]]:
    """``(start, end, missing_index)`` per field of the encoding: the tokenizer's fields (`TabularTokenizer`)."""
    out, start = [], 0
    for f in fields:
        end = start + len(f.feature_names())
        out.append((start, end, end - 1))
        start = end
    return out


def missing_tabular_vector(num_features: int = NUM_TABULAR_FEATURES, fields=None) -> np.ndarray:
    """The encoding of a record with every field missing: zero values, all missing flags set.

    It does not depend on the fitted scaling, so networks use it for ``tabular=None``. ``fields`` are field slices
    (`field_slices`); without them the NIH layout is assumed when ``num_features`` matches it, else all zeros.
    """
    out = np.zeros(num_features, dtype=np.float32)
    if fields is None and num_features == NUM_TABULAR_FEATURES:
        fields = field_slices(NIH_FIELDS)
    for _, _, flag in fields or ():
        if flag >= 0:
            out[flag] = 1.0
    return out


class TabularEncoder:
    """Encodes the declared fields (`TabularField`; NIH's four by default) of a record into one float32 vector.

    Per field, in declaration order: numeric: the scaled value (``standard``: training mean and standard deviation;
    ``log1p``: log1p over log1p of the training maximum) and a missing flag; binary: 0/1 and a missing flag;
    categorical: one indicator per category and a missing flag. A missing field has zero values and its flag set.
    Follows scikit-learn's conventions: ``fit`` returns ``self``, learned attributes end in ``_`` (``stats_``:
    ``{field: {"mean", "std"} or {"scale"}}``).
    """

    def __init__(self, fields: Sequence[TabularField | Mapping] | None = None, risk_model: Mapping | None = None):
        self.fields = NIH_FIELDS if fields is None else parse_fields(fields)
        self.risk_model = risk_model
        self.risk = None
        if risk_model is not None:  # the risk package parses with this module: imported here, not at the top
            from ..risk.assessment import PatientRiskAssessor

            self.risk = PatientRiskAssessor(risk_model, "the run's risk model")

    @classmethod
    def for_risk_model(cls, path: str) -> TabularEncoder:
        """The paper's pipeline: the fields of a risk model JSON (`risk.two_stage.save_models`) that give its stage-1
        selected features (any outcome's), then one ``risk`` field holding the stage-2 probability of every outcome.

        Raises:
            ValueError: naming the file when it is not a risk model or its stage 1 selected no feature.
        """
        with open(path) as f:
            document = json.load(f)
        from ..risk.assessment import PatientRiskAssessor

        assessor = PatientRiskAssessor(document, str(path))
        wanted = set()
        for model in assessor.models.values():
            indicators = model.preprocessor_.indicators_
            for feature in model.selected_features_:  # a missing-value indicator stands for the columns it flags
                wanted.update(indicators.get(feature, [feature]))
        fields = [f for f in assessor.encoder.fields if wanted.intersection(f.value_names())]
        if not fields:
            raise ValueError(f"{path}: stage 1 of the risk model selected no feature, so it gives the network nothing")
        encoder = cls(fields)
        encoder.risk_model, encoder.risk = document, assessor  # the assessor built above, not a second one
        return encoder

    # ---- layout
    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, field by field (the ``risk`` field last, with a risk model)."""
        names = [n for f in self.fields for n in f.feature_names()]
        if self.risk is not None:
            names += [f"risk_{outcome}" for outcome in self.risk.models] + ["risk_missing"]
        return names

    @property
    def num_features(self) -> int:
        """Length of the encoded vector."""
        return len(self.feature_names)

    def field_slices(self) -> list[tuple[int, int, int]]:
        """``(start, end, missing_index)`` per field (`field_slices`), for the network's tokenizer; with a risk model
        the ``risk`` field (one probability per outcome and a missing flag) is the last."""
        slices = field_slices(self.fields)
        if self.risk is not None:
            start = slices[-1][1] if slices else 0
            end = start + len(self.risk.models) + 1
            slices.append((start, end, end - 1))
        return slices

    # ---- fitting and encoding
    def fit(self, records: Sequence[Mapping]) -> TabularEncoder:
        """Learn the numeric scaling from training records; values that are missing or unusable are left out."""
        self.stats_ = {}
        for f in self.fields:
            if f.kind != "numeric":
                continue
            values = np.array([f.parse_value(f.raw(r))[0] for r in records], dtype=np.float64)
            values = values[np.isfinite(values)]
            if f.scale == "log1p":
                top = float(values.max()) if values.size else 0.0
                self.stats_[f.name] = {"scale": float(np.log1p(top)) if top > 0 else 1.0}
            else:
                std = float(values.std()) if values.size > 1 else 0.0
                self.stats_[f.name] = {
                    "mean": float(values.mean()) if values.size else 0.0,
                    "std": std if std > 0 else 1.0,
                }
        return self

    def _check_fitted(self):
        if not hasattr(self, "stats_"):
            raise RuntimeError("TabularEncoder is not fitted: call fit(records) or TabularEncoder.load(path)")

    def encode(self, record: Mapping) -> np.ndarray:
        """Encode one record into a ``(num_features,)`` float32 vector."""
        self._check_fitted()
        out = np.zeros(self.num_features, dtype=np.float32)
        for f, (start, _, flag) in zip(self.fields, self.field_slices()):
            value, _ = f.parse_value(f.raw(record))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                out[flag] = 1.0
            elif f.kind == "categorical":
                out[start + f.categories.index(value)] = 1.0
            elif f.kind == "numeric":
                stats = self.stats_[f.name]
                out[start] = (
                    np.log1p(value) / stats["scale"] if f.scale == "log1p" else (value - stats["mean"]) / stats["std"]
                )
            else:
                out[start] = value
        if self.risk is not None:
            start, end, flag = self.field_slices()[-1]
            probabilities = self.risk.probabilities(record)
            if probabilities is None:
                out[flag] = 1.0
            else:
                out[start:flag] = probabilities
        return out

    def transform(self, records: Sequence[Mapping]) -> np.ndarray:
        """Encode many records into an ``(N, num_features)`` float32 array."""
        if not records:
            return np.zeros((0, self.num_features), dtype=np.float32)
        return np.stack([self.encode(r) for r in records])

    def frame(self, records: Sequence[Mapping]):
        """The parsed values as a float `pandas.DataFrame`, the risk model's input: one column per numeric or binary
        field, one 0/1 column per category (``sex_M``, ...); NaN where the field is missing or unusable, exactly
        where `encode` sets the missing flag. Needs no fitting."""
        import pandas as pd

        columns = {}
        for f in self.fields:
            parsed = [f.parse_value(f.raw(r))[0] for r in records]
            if f.kind == "categorical":
                for name, c in zip(f.value_names(), f.categories):
                    columns[name] = [np.nan if v is None else float(v == c) for v in parsed]
            else:
                columns[f.name] = parsed
        return pd.DataFrame(columns, index=range(len(records)), dtype=np.float64)

    def report_invalid(self, records: Sequence[Mapping], where: str = "records", skip: Sequence[str] = ()) -> Counter:
        """Count, per field (but those named in ``skip``), the present values that are encoded as missing (out of
        range, not a number, an unknown category); one warning per field names the count and the first example.
        Returns the counts."""
        counts, examples = Counter(), {}
        checked = [f for f in self.fields if f.name not in skip]
        for r in records:
            for f in checked:
                _, problem = f.parse_value(f.raw(r))
                if problem:
                    counts[f.name] += 1
                    examples.setdefault(f.name, problem)
        for name, n in counts.items():
            logger.warning("%s: %d value(s) of field '%s' encoded as missing (e.g. %s)", where, n, name, examples[name])
        return counts

    # ---- saving
    def state_dict(self) -> dict:
        """The declared fields, the learned scaling and the feature layout, as plain JSON-able values."""
        self._check_fitted()
        state = {
            "format_version": 2,
            "fields": [f.to_dict() for f in self.fields],
            "stats": self.stats_,
            "feature_names": self.feature_names,
        }
        if self.risk_model is not None:
            state["risk_model"] = self.risk_model
        return state

    def save(self, path: str) -> TabularEncoder:
        """Write the encoder as JSON; returns ``self``."""
        from ..files import write_json_atomic

        write_json_atomic(path, self.state_dict())
        return self

    @classmethod
    def from_state(cls, state: Mapping, where: str = "tabular encoder") -> TabularEncoder:
        """Rebuild a fitted encoder from `state_dict`'s output (or the NIH-only format of 0.8.0 and earlier)."""
        if "fields" not in state:  # 0.8.0: the four NIH fields, their scaling in three numbers
            if state.get("feature_names") != list(FEATURE_NAMES):
                raise ValueError(
                    f"{where} has features {state.get('feature_names')}; expected {list(FEATURE_NAMES)} or declared fields"
                )
            enc = cls()
            enc.stats_ = {
                "age": {"mean": float(state["age_mean"]), "std": float(state["age_std"])},
                "follow_up": {"scale": float(state["follow_up_scale"])},
            }
            return enc
        enc = cls(parse_fields(state["fields"], where), risk_model=state.get("risk_model"))
        if state.get("feature_names") != enc.feature_names:
            raise ValueError(f"{where}: feature_names {state.get('feature_names')} do not match its fields")
        enc.stats_ = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in state["stats"].items()}
        return enc

    @classmethod
    def load(cls, path: str) -> TabularEncoder:
        """Read an encoder written by `save`."""
        with open(path) as f:
            state = json.load(f)
        return cls.from_state(state, f"tabular encoder '{path}'")
