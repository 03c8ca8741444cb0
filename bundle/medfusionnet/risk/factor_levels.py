"""The MedFusionNet paper's rule-based risk levels, beside the probability cut points of `two_stage`: low when no
risk factor is present, medium with exactly one, high with two or more or with any severe finding. The conditions
are declared in YAML (`factor_levels.yaml` holds the cervical defaults and the assumptions behind them).
"""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd

from ..constants import RISK_LEVELS
from .two_stage import read_yaml

OPERATORS = {">=": operator.ge, ">": operator.gt, "==": operator.eq, "<=": operator.le, "<": operator.lt}


class FactorRiskRule:
    """Risk level per row from counted risk factors and severe findings (see the module docstring).

    Args:
        factors: ``{name: {"column": str, "op": one of OPERATORS, "value": number}}``; each true condition counts.
        severe: the same layout; any true condition makes the level high on its own.
        where: where the conditions came from, for error messages.

    Raises:
        ValueError: naming ``where`` and the entry for an unknown operator, a missing key or a non-numeric value.
    """

    def __init__(self, factors: dict, severe: dict | None = None, where: str = "factor_levels"):
        self.where = where
        self.factors = self._check(factors, "factors")
        self.severe = self._check(severe or {}, "severe")
        both = sorted(set(self.factors) & set(self.severe))
        if both:
            raise ValueError(f"{where}: {both} named under both 'factors' and 'severe'; give each condition one name")
        if not self.factors and not self.severe:
            raise ValueError(f"{where}: declare at least one entry under 'factors' or 'severe'")

    def _check(self, entries: dict, group: str) -> dict:
        if not isinstance(entries, dict):
            raise ValueError(f"{self.where}: '{group}' must map names to conditions; got {type(entries).__name__}")
        checked = {}
        for name, spec in entries.items():
            key = f"{self.where}: {group}.{name}"
            if not isinstance(spec, dict) or set(spec) != {"column", "op", "value"}:
                raise ValueError(f"{key} needs exactly the keys column, op and value; got {spec!r}")
            if spec["op"] not in OPERATORS:
                raise ValueError(f"{key}: op {spec['op']!r} is not one of {list(OPERATORS)}")
            if isinstance(spec["value"], bool) or not isinstance(spec["value"], (int, float)):
                raise ValueError(f"{key}: value {spec['value']!r} is not a number")
            checked[str(name)] = {"column": str(spec["column"]), "op": spec["op"], "value": float(spec["value"])}
        return checked

    @classmethod
    def from_mapping(cls, document, where: str) -> FactorRiskRule:
        """The rule of a parsed mapping with ``factors`` and optional ``severe`` (as in `factor_levels.yaml`)."""
        if not isinstance(document, dict):
            raise ValueError(f"{where} must map 'factors' and 'severe' to conditions; got {document!r}")
        unknown = sorted(set(document) - {"factors", "severe"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; use 'factors' and 'severe'")
        return cls(document.get("factors") or {}, document.get("severe"), where)

    @classmethod
    def load(cls, path=None) -> FactorRiskRule:
        """The rule of a YAML file (the package default when None)."""
        return cls.from_mapping(*read_yaml(path, "factor_levels.yaml"))

    @property
    def columns(self) -> list[str]:
        """The columns the rule reads, in declaration order."""
        return list(dict.fromkeys(c["column"] for c in (*self.factors.values(), *self.severe.values())))

    def to_dict(self) -> dict:
        """The conditions as a plain mapping, e.g. for a JSON file (`from_mapping` rebuilds the rule)."""
        return {"factors": self.factors, "severe": self.severe}

    def describe(self) -> str:
        """The rule in one line, for reports."""

        def text(entries):
            return ", ".join(f"{n} ({c['column']} {c['op']} {c['value']:g})" for n, c in entries.items()) or "none"

        return (
            f"low: no factor; medium: one factor; high: two or more factors or any severe finding. "
            f"Factors: {text(self.factors)}. Severe: {text(self.severe)}. A missing answer counts as no factor."
        )

    def evaluate(self, frame: pd.DataFrame, where: str = "table") -> pd.DataFrame:
        """Per row of ``frame``: ``level`` (one of RISK_LEVELS), ``fired`` (the names whose condition holds, ';'
        joined) and ``unknown`` (the names whose column is missing in that row); same index as ``frame``.

        Raises:
            ValueError: naming ``where`` and the columns the rule needs that ``frame`` lacks.
        """
        absent = [c for c in self.columns if c not in frame.columns]
        if absent:
            raise ValueError(f"{where}: the risk-factor rule ({self.where}) reads column(s) {absent}, not in the table")
        fired, unknown = {}, {}
        for name, c in {**self.factors, **self.severe}.items():
            values = pd.to_numeric(frame[c["column"]], errors="coerce")
            unknown[name] = values.isna().to_numpy()
            fired[name] = OPERATORS[c["op"]](values, c["value"]).to_numpy() & ~unknown[name]
        count = np.sum([fired[n] for n in self.factors], axis=0) if self.factors else np.zeros(len(frame), int)
        severe = np.any([fired[n] for n in self.severe], axis=0) if self.severe else np.zeros(len(frame), bool)
        level = np.where(severe | (count >= 2), RISK_LEVELS[2], np.where(count == 1, RISK_LEVELS[1], RISK_LEVELS[0]))
        names = list(fired)
        return pd.DataFrame(
            {
                "level": level,
                "fired": [";".join(n for n in names if fired[n][i]) for i in range(len(frame))],
                "unknown": [";".join(n for n in names if unknown[n][i]) for i in range(len(frame))],
            },
            index=frame.index,
        )
