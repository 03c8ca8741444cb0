"""Two-stage risk stratification for tabular data (DESIGN.md section 8), generic over binary outcome columns.

Pipeline per outcome, all of it refitted inside every cross-validation fold:

1. `read_risk_csv` (or `nih_tables` for NIH metadata, parsed by the network's own `data.tabular.TabularEncoder`):
   sentinels such as ``?`` become missing.
2. `RiskPreprocessor`: adds missing-value indicators, drops almost-empty and constant columns, imputes the rest
   (median, or forward fill).
3. Stage 1 (`TwoStageRiskModel`): a shallow univariate decision tree per feature proposes thresholds; a grid search
   around each proposal refines it on the AUC (or F1) of the binary rule; the top-N features are kept (N fixed,
   all, or chosen by an inner cross-validation).
4. Stage 2: a multivariate decision tree on the selected features (each leaf's training positive rate is the
   patient's probability), or a random forest of such trees; the probability maps to a risk level ``low`` /
   ``medium`` / ``high``.

The fitted model is saved as human-readable JSON (`save_models`) and predicts from that JSON alone (`load_models`);
no pickle. `discretise` and the bins in ``risk_bins.yaml`` only make the report's rules readable.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from importlib import resources

import numpy as np
import pandas as pd
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_is_fitted

from ..constants import LABELS, MISSING_STRINGS, RISK_LEVELS
from ..data.tabular import NIH_FIELDS, TabularEncoder, parse_fields
from ..files import write_text_atomic

logger = logging.getLogger(__name__)

CERVICAL_OUTCOMES: tuple[str, ...] = ("Hinselmann", "Schiller", "Citology", "Biopsy")
# Compared after strip() and lower(): the UCI file writes '?', other copies blanks or 'NA'.
CV_METRICS: tuple[str, ...] = ("auc", "f1", "gmean", "balanced_accuracy", "sensitivity", "specificity")
STAGE1_SCORES: tuple[str, ...] = ("auc", "f1")
IMPUTATIONS: tuple[str, ...] = ("median", "ffill")
NIH_FEATURES: tuple[str, ...] = tuple(TabularEncoder(NIH_FIELDS).frame([]).columns)  # the risk model's NIH inputs
MODEL_NAME = "two_stage"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------- reading


def read_risk_csv(path, outcomes: Sequence[str], features: Sequence[str] | None = None):
    """Read a CSV into a float feature frame ``x`` (NaN = missing) and a 0/1 outcome frame ``y_table``.

    ``features=None`` takes every column that is not an outcome. Cells equal to a string of `constants.MISSING_STRINGS`
    (case-insensitive, surrounding spaces ignored) are missing; an INFO log counts them.

    Raises:
        ValueError: for an empty file (naming it); a requested outcome or feature column that is absent (naming
            it); a non-numeric cell that is not a sentinel (naming the column and CSV line); an outcome cell that
            is missing or not 0/1; an outcome with a single class.
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty; expected a header line and at least one data row") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise ValueError(f"{path}: the file has a header but no data rows")
    outcomes = list(outcomes)
    features = [c for c in frame.columns if c not in outcomes] if features is None else list(features)
    for kind, names in (("outcome", outcomes), ("feature", features)):
        absent = [c for c in names if c not in frame.columns]
        if absent:
            raise ValueError(f"{path}: {kind} column(s) {absent} not found; the columns are {list(frame.columns)}")
    numeric = {c: _parse_numeric_column(frame[c], path, c) for c in dict.fromkeys(features + outcomes)}
    x = pd.DataFrame({c: numeric[c] for c in features})
    gaps = x.isna().sum()
    if gaps.any():
        logger.info(
            "%s: %d missing cell(s) in %d row(s) and %d of %d feature column(s) (most in '%s': %d); they "
            "are imputed, with missing-value indicators",
            path,
            int(gaps.sum()),
            int(x.isna().any(axis=1).sum()),
            int((gaps > 0).sum()),
            len(features),
            gaps.idxmax(),
            int(gaps.max()),
        )
    y_table = pd.DataFrame({c: numeric[c] for c in outcomes})
    for c in outcomes:
        bad = y_table[c].isna() | ~y_table[c].isin((0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}: line {i + 2}, outcome column '{c}': value '{frame[c].iloc[i]}' is not 0 or 1; "
                "outcomes must be binary and present in every row"
            )
        _check_two_classes(y_table[c], f"{path}: outcome column '{c}'")
    return x, y_table.astype(np.int64)


def _parse_numeric_column(text: pd.Series, path, column: str) -> pd.Series:
    stripped = text.str.strip()
    sentinel = stripped.str.lower().isin(MISSING_STRINGS)
    values = pd.to_numeric(stripped.where(~sentinel), errors="coerce").astype(np.float64)
    bad = values.isna() & ~sentinel
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: line {i + 2}, column '{column}': value '{text.iloc[i]}' is not a number; "
            f"missing values must be one of {list(MISSING_STRINGS)} (case-insensitive)"
        )
    return values


def _check_two_classes(y: pd.Series, where: str) -> None:
    classes = np.unique(np.asarray(y))
    if len(classes) < 2:
        raise ValueError(f"{where} has a single class {classes.tolist()}; a risk model needs positives and negatives")


def nih_tables(frame: pd.DataFrame, labels: Sequence[str] = LABELS):
    """Numeric features and 0/1 findings from `data.read_nih_csv`'s frame.

    The features are the NIH fields' parse (`data.tabular.TabularEncoder.frame` of `data.tabular.NIH_FIELDS`, the
    network's own fields): ``age``, ``sex_M``, ``sex_F``, ``view_PA``, ``view_AP``, ``follow_up``; sexes other than
    M/F, views other than PA/AP and implausible ages are missing, so imputation handles them like any other gap.
    """
    x = TabularEncoder().frame(frame.to_dict("records"))
    x.index = frame.index
    y_table = pd.DataFrame(
        np.stack(frame["label"].to_numpy()).astype(np.int64), columns=list(labels), index=frame.index
    )
    return x, y_table


def outcome_features(
    x: pd.DataFrame, y_table: pd.DataFrame, outcome: str, with_screening: bool = False
) -> pd.DataFrame:
    """Feature frame for one outcome: ``x`` alone, or with ``with_screening`` also the other outcome columns
    (cervical setting (b): for Biopsy, the Hinselmann, Schiller and Citology results)."""
    if not with_screening:
        return x
    others = [c for c in y_table.columns if c != outcome]
    return pd.concat([x, y_table[others].astype(np.float64)], axis=1)


# ------------------------------------------------------------------------------------------------ discretisation


def read_yaml(path, default: str) -> tuple[dict, str]:
    """``(document, where)`` of a YAML file, or of the package's ``medfusionnet/risk/<default>`` when ``path`` is None;
    ``where`` names the file for error messages."""
    if path is None:
        text = resources.files("medfusionnet.risk").joinpath(default).read_text()
        where = f"medfusionnet/risk/{default}"
    else:
        with open(path) as f:
            text = f.read()
        where = str(path)
    return yaml.safe_load(text) or {}, where


def load_bins(path=None) -> dict:
    """Bins ``{column: {"edges": [...], "labels": [...]}}`` from a YAML file (the package default when None).

    Raises:
        ValueError: naming the file and key when edges are not increasing or labels do not number edges - 1.
    """
    return validate_bins(*read_yaml(path, "risk_bins.yaml"))


def validate_bins(bins: dict, where: str = "bins") -> dict:
    """Check and normalise a bins mapping (see `load_bins`); returns it with float edges and str labels."""
    checked = {}
    for column, spec in bins.items():
        if not isinstance(spec, dict) or "edges" not in spec:
            raise ValueError(f"{where}: bins for '{column}' need an 'edges' list (and optional 'labels')")
        edges = [float(e) for e in spec["edges"]]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"{where}: bins for '{column}': edges {edges} must be at least two increasing numbers")
        labels = spec.get("labels") or [f"[{a:g}, {b:g})" for a, b in zip(edges, edges[1:])]
        if len(labels) != len(edges) - 1:
            raise ValueError(
                f"{where}: bins for '{column}': {len(labels)} labels for {len(edges) - 1} intervals; give one each"
            )
        checked[str(column)] = {"edges": edges, "labels": [str(v) for v in labels]}
    return checked


def discretise(values, spec: dict) -> pd.Series:
    """Bin labels of ``values`` for one column's ``spec`` (intervals ``[a, b)``; NaN outside or missing)."""
    return pd.Series(pd.cut(np.asarray(values, dtype=np.float64), spec["edges"], labels=spec["labels"], right=False))


def describe_rule(feature: str, op: str, threshold: float, bins: dict) -> str:
    """Readable rule such as ``Age > 37.5 (threshold in bin 35-44)``: the bin is the one holding the threshold."""
    rule = f"{feature} {op} {threshold:g}"
    if feature in bins:
        label = discretise([threshold], bins[feature]).iloc[0]
        if isinstance(label, str):
            rule += f" (threshold in bin {label})"
    return rule


# ------------------------------------------------------------------------------------------------ preprocessing


class RiskPreprocessor(TransformerMixin, BaseEstimator):
    """Add missing-value indicators, drop unusable columns, then impute the rest.

    With ``missing_indicators`` every column that has gaps in the training data (dropped ones included) yields a
    0/1 column ``"<column> missing"``: in survey-style clinical data a question left unanswered is itself a
    signal (in the cervical data, the patients who skipped the STD questions). Columns with the same missing
    pattern share one indicator, named after the first of them (``indicators_`` lists the columns it stands for).

    A column is dropped when its missing fraction exceeds ``max_missing_fraction`` or when its observed values
    are constant; the reason is logged and kept in ``dropped_``. ``imputation='median'`` fills with the training
    median (``medians_``). ``imputation='ffill'`` forward-fills in row order, as the source paper does; this
    assumes rows are ordered in time per patient, which the cervical data is NOT (one row per patient, unordered),
    so it is offered for comparison only. Leading gaps that a forward fill cannot reach take the training median.
    """

    def __init__(self, imputation: str = "median", max_missing_fraction: float = 0.8, missing_indicators: bool = True):
        self.imputation = imputation
        self.max_missing_fraction = max_missing_fraction
        self.missing_indicators = missing_indicators

    def fit(self, x, y=None):
        """Learn ``columns_`` (kept), ``dropped_`` ({column: reason}), ``indicators_`` and ``medians_`` from ``x``."""
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"imputation='{self.imputation}' is not supported; use one of {IMPUTATIONS}")
        x = _as_frame(x)
        self.feature_names_in_ = np.asarray(x.columns, dtype=object)
        self.dropped_ = {}
        for column in x.columns:
            observed = x[column].dropna()
            missing = 1.0 - len(observed) / max(len(x), 1)
            if missing > self.max_missing_fraction:
                self.dropped_[column] = f"{missing:.0%} missing (> {self.max_missing_fraction:.0%})"
            elif observed.nunique() <= 1:
                self.dropped_[column] = "constant"
        for column, reason in self.dropped_.items():  # each cross-validation fold refits: callers summarise once
            logger.debug("dropping column '%s': %s", column, reason)
        self.columns_ = [c for c in x.columns if c not in self.dropped_]
        self.medians_ = {c: float(x[c].median()) for c in self.columns_}
        self.indicators_ = {}
        if self.missing_indicators:
            by_pattern = {}
            for column in x.columns:
                gaps = x[column].isna().to_numpy()
                if 0 < gaps.sum() < len(gaps):
                    by_pattern.setdefault(gaps.tobytes(), []).append(column)
            self.indicators_ = {f"{columns[0]} missing": columns for columns in by_pattern.values()}
        return self

    def transform(self, x) -> pd.DataFrame:
        """Kept columns of ``x`` with the gaps filled, then the indicators (a frame in `output_columns` order)."""
        check_is_fitted(self, "medians_")
        x = _as_frame(x, self.feature_names_in_)
        needed = list(dict.fromkeys(self.columns_ + [cols[0] for cols in self.indicators_.values()]))
        absent = [c for c in needed if c not in x.columns]
        if absent:
            raise ValueError(f"column(s) {absent} seen in fit are missing from the data to transform")
        out = x[self.columns_].astype(np.float64)
        if self.imputation == "ffill":
            out = out.ffill()
        out = out.fillna(self.medians_)
        for name, columns in self.indicators_.items():
            out[name] = x[columns[0]].isna().astype(np.float64).to_numpy()
        return out

    def output_columns(self) -> list[str]:
        """Names of `transform`'s columns: kept features, then missing-value indicators."""
        check_is_fitted(self, "medians_")
        return list(self.columns_) + list(self.indicators_)

    def to_dict(self) -> dict:
        """JSON-ready state."""
        return {
            "imputation": self.imputation,
            "max_missing_fraction": self.max_missing_fraction,
            "missing_indicators": self.missing_indicators,
            "feature_names_in": list(self.feature_names_in_),
            "columns": list(self.columns_),
            "dropped": dict(self.dropped_),
            "medians": dict(self.medians_),
            "indicators": {k: list(v) for k, v in self.indicators_.items()},
        }

    @classmethod
    def from_dict(cls, state: dict) -> RiskPreprocessor:
        """Rebuild a fitted preprocessor from `to_dict`'s output."""
        pre = cls(state["imputation"], state["max_missing_fraction"], state["missing_indicators"])
        pre.columns_, pre.dropped_, pre.medians_ = list(state["columns"]), dict(state["dropped"]), state["medians"]
        pre.indicators_ = {k: list(v) for k, v in state["indicators"].items()}
        pre.feature_names_in_ = np.asarray(state["feature_names_in"], dtype=object)
        return pre


def _as_frame(x, columns=None) -> pd.DataFrame:
    if isinstance(x, pd.DataFrame):
        return x
    x = np.asarray(x, dtype=np.float64)
    columns = list(columns) if columns is not None else [f"x{i}" for i in range(x.shape[1])]
    return pd.DataFrame(x, columns=columns[: x.shape[1]])


# ------------------------------------------------------------------------------------------------------ stage 1


def rule_scores(x: np.ndarray, y: np.ndarray, thresholds: np.ndarray, score: str = "auc"):
    """Score of the binary rules ``x > t`` for each ``t``; returns ``(scores, directions)``.

    ``auc`` is the ROC-AUC of the 0/1 rule, (sensitivity + specificity) / 2; a rule below 0.5 is flipped to
    ``x <= t`` (direction ``"<="``) so the score is the better of the two. ``f1`` likewise takes the better side.
    """
    y = np.asarray(y).astype(bool)
    above = x[:, None] > thresholds[None, :]  # (N, T)
    pos, neg = max(y.sum(), 1), max((~y).sum(), 1)
    tp, fp = above[y].sum(0), above[~y].sum(0)
    if score == "auc":
        auc = 0.5 * (tp / pos + 1.0 - fp / neg)
        flip = auc < 0.5
        return np.where(flip, 1.0 - auc, auc), np.where(flip, "<=", ">")
    if score == "f1":
        f1_above = 2 * tp / np.maximum(2 * tp + fp + (pos - tp), 1)
        tp_b, fp_b = pos - tp, neg - fp  # the rule x <= t
        f1_below = 2 * tp_b / np.maximum(2 * tp_b + fp_b + tp, 1)
        flip = f1_below > f1_above
        return np.where(flip, f1_below, f1_above), np.where(flip, "<=", ">")
    raise ValueError(f"score='{score}' is not supported; use one of {STAGE1_SCORES}")


def search_threshold(x, y, max_depth=2, min_samples_leaf=10, grid_size=10, score="auc", random_state=0):
    """Stage 1 for one feature: tree-proposed thresholds refined by a local grid search.

    A univariate `DecisionTreeClassifier` (balanced class weights) proposes split points. Around each proposal the
    grid holds the midpoints between consecutive unique values that lie between the neighbouring proposals (or
    the data range), at most ``grid_size`` on each side. Returns ``None`` when the tree makes no split, else a
    dict with the best ``threshold``, ``direction``, ``score`` and the tree's ``proposals``. Ties go to the
    candidate nearest a proposal.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    tree = DecisionTreeClassifier(
        max_depth=max_depth, min_samples_leaf=min_samples_leaf, class_weight="balanced", random_state=random_state
    ).fit(x[:, None], y)
    proposals = np.unique(tree.tree_.threshold[tree.tree_.feature >= 0])
    if proposals.size == 0:
        return None
    values = np.unique(x)
    midpoints = (values[:-1] + values[1:]) / 2.0
    bounds = np.concatenate([[-np.inf], proposals, [np.inf]])
    candidates, distance = [], []
    for i, p in enumerate(proposals):
        window = midpoints[(midpoints > bounds[i]) & (midpoints < bounds[i + 2])]
        below, above = window[window <= p][-grid_size:], window[window > p][:grid_size]
        grid = np.concatenate([below, [p], above])
        candidates.append(grid)
        distance.append(np.abs(grid - p))
    candidates, distance = np.concatenate(candidates), np.concatenate(distance)
    order = np.argsort(distance, kind="stable")  # argmax then prefers the candidate nearest a proposal
    candidates = candidates[order]
    scores, directions = rule_scores(x, y, candidates, score)
    best = int(np.argmax(scores))
    return {
        "threshold": float(candidates[best]),
        "direction": str(directions[best]),
        "score": float(scores[best]),
        "proposals": proposals.tolist(),
    }


# ------------------------------------------------------------------------------------------------------ stage 2


def tree_to_nodes(tree: DecisionTreeClassifier, features: Sequence[str]) -> dict:
    """Nested ``{"feature", "threshold", "left", "right"}`` nodes of a fitted tree (left: ``value <= threshold``);
    leaves are ``{"leaf": id}`` until `_annotate_leaves` adds their rates and levels."""
    t = tree.tree_

    def node(i: int) -> dict:
        if t.children_left[i] < 0:
            return {"leaf": int(i)}
        return {
            "feature": features[t.feature[i]],
            "threshold": float(t.threshold[i]),
            "left": node(int(t.children_left[i])),
            "right": node(int(t.children_right[i])),
        }

    return node(0)


def apply_nodes(nodes: dict, x: pd.DataFrame) -> np.ndarray:
    """Leaf id of every row of ``x`` under the nested nodes (`tree_to_nodes`).

    Values are rounded to float32 first because scikit-learn trees compare float32 inputs; this keeps the JSON
    model's routing identical to the fitted tree's.
    """
    leaves = np.full(len(x), -1, dtype=np.int64)
    stack = [(nodes, np.arange(len(x)))]
    while stack:
        node, rows = stack.pop()
        if "leaf" in node:
            leaves[rows] = node["leaf"]
            continue
        values = x[node["feature"]].to_numpy(dtype=np.float32).astype(np.float64)[rows]
        go_left = values <= node["threshold"]
        stack += [(node["left"], rows[go_left]), (node["right"], rows[~go_left])]
    return leaves


def iter_leaves(nodes: dict, path=()):
    """Yield ``(leaf, conditions)`` with ``conditions`` a tuple of ``(feature, op, threshold)`` from the root."""
    if "leaf" in nodes:
        yield nodes, path
        return
    f, t = nodes["feature"], nodes["threshold"]
    yield from iter_leaves(nodes["left"], path + ((f, "<=", t),))
    yield from iter_leaves(nodes["right"], path + ((f, ">", t),))


def tree_to_arrays(tree: DecisionTreeClassifier) -> dict:
    """A fitted tree as flat node arrays (scikit-learn's layout): ``feature`` (column index, -1 at leaves),
    ``threshold``, ``left``, ``right`` (-1 at leaves) and ``probability`` (the leaf's positive-class fraction as
    the tree weighs it, so a forest built from these arrays predicts exactly as scikit-learn's)."""
    t = tree.tree_
    value = t.value[:, 0, :]
    leaf = t.children_left < 0
    return {
        "feature": np.where(leaf, -1, t.feature).tolist(),
        "threshold": np.where(leaf, 0.0, t.threshold).tolist(),
        "left": t.children_left.tolist(),
        "right": t.children_right.tolist(),
        "probability": (value[:, 1] / value.sum(axis=1)).tolist(),
    }


def apply_arrays(arrays: dict, values: np.ndarray) -> np.ndarray:
    """Leaf index of every row of ``values`` (columns in the forest's feature order) under `tree_to_arrays`' tree.

    Values are compared as float32, like scikit-learn's trees."""
    feature, threshold = np.asarray(arrays["feature"]), np.asarray(arrays["threshold"])
    left, right = np.asarray(arrays["left"]), np.asarray(arrays["right"])
    values = values.astype(np.float32).astype(np.float64)
    node = np.zeros(len(values), dtype=np.int64)
    active = np.flatnonzero(left[node] >= 0)
    while active.size:
        n = node[active]
        go_left = values[active, feature[n]] <= threshold[n]
        node[active] = np.where(go_left, left[n], right[n])
        active = active[left[node[active]] >= 0]
    return node


def risk_level(rate: float, cut_points: dict) -> str:
    """``low`` below ``cut_points['low']``, ``high`` at or above ``cut_points['high']``, else ``medium``."""
    if rate < cut_points["low"]:
        return "low"
    return "high" if rate >= cut_points["high"] else "medium"


STAGE2_KINDS: tuple[str, ...] = ("tree", "forest")
# Stage 2 as a random forest of fully grown trees: a finer ranking than one readable tree (see docs/README.md).
FOREST_PARAMS = {
    "stage2": "forest",
    "n_estimators": 200,
    "max_depth": None,
    "min_samples_leaf": 5,
    "class_weight": None,
    "top_n": None,
}


class TwoStageRiskModel(ClassifierMixin, BaseEstimator):
    """Two-stage risk model for one binary outcome (scikit-learn estimator; ``y`` is 0/1).

    Preprocessing is `RiskPreprocessor` (with missing-value indicators by default). Stage 1 (`search_threshold`)
    scores every preprocessed feature by its best single-threshold rule and keeps the ``top_n`` best, ranked by
    ``stage1_score`` (``auc`` or ``f1`` of the rule; not named ``score``, which is ClassifierMixin's accuracy
    method). ``top_n=None`` keeps every feature that stage 1 can split; ``top_n="auto"`` picks it from
    ``top_n_grid`` by an inner stratified ``inner_folds``-fold cross-validation on the training data only.

    Stage 2 (``stage2``):

    - ``"tree"`` (the paper's design): one `DecisionTreeClassifier` on the selected features; a patient's
      probability is the unweighted positive rate of its leaf on the training data; the tree is readable as rules.
    - ``"forest"``: a `RandomForestClassifier` of ``n_estimators`` trees on the selected features; the
      probability is scikit-learn's forest probability. `FOREST_PARAMS` holds the settings used in the docs.

    Risk levels use cut points relative to the training prevalence p: ``low`` when the probability < ``low_factor
    * p`` (below the base rate), ``high`` when it is >= ``high_factor * p`` (at least twice the base rate by
    default), ``medium`` between. `predict` calls a patient positive when the probability is at least the
    prevalence, the same rule the cross-validation applies to every compared model.

    Fitted attributes: ``preprocessor_``, ``stage1_`` (all scored features, best first), ``top_n_``,
    ``top_n_scores_`` (inner-CV AUC per candidate with ``"auto"``), ``selected_features_``, ``prevalence_``,
    ``cut_points_``, ``classes_``; for a tree ``tree_`` (the scikit-learn tree, None after loading from JSON) and
    ``nodes_``; for a forest ``forest_`` (the scikit-learn forest, None after loading) and ``trees_`` (node arrays).
    """

    def __init__(
        self,
        top_n="auto",
        stage1_score="auc",
        stage1_max_depth=2,
        stage1_min_samples_leaf=10,
        grid_size=10,
        stage2="tree",
        n_estimators=200,
        max_depth=3,
        min_samples_leaf=20,
        class_weight="balanced",
        low_factor=1.0,
        high_factor=2.0,
        imputation="median",
        max_missing_fraction=0.8,
        missing_indicators=True,
        top_n_grid=(3, 5, 10, None),
        inner_folds=3,
        random_state=0,
    ):
        self.top_n = top_n
        self.stage1_score = stage1_score
        self.stage1_max_depth = stage1_max_depth
        self.stage1_min_samples_leaf = stage1_min_samples_leaf
        self.grid_size = grid_size
        self.stage2 = stage2
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.class_weight = class_weight
        self.low_factor = low_factor
        self.high_factor = high_factor
        self.imputation = imputation
        self.max_missing_fraction = max_missing_fraction
        self.missing_indicators = missing_indicators
        self.top_n_grid = top_n_grid
        self.inner_folds = inner_folds
        self.random_state = random_state

    def fit(self, x, y):
        """Fit preprocessing, stage 1 and stage 2 on ``(x, y)``; returns self."""
        if self.stage1_score not in STAGE1_SCORES:
            raise ValueError(f"stage1_score='{self.stage1_score}' is not supported; use one of {STAGE1_SCORES}")
        if self.stage2 not in STAGE2_KINDS:
            raise ValueError(f"stage2='{self.stage2}' is not supported; use one of {STAGE2_KINDS}")
        if not (self.top_n is None or self.top_n == "auto" or (isinstance(self.top_n, int) and self.top_n > 0)):
            raise ValueError(f"top_n={self.top_n!r}: use a positive integer, None (all features) or 'auto'")
        x = _as_frame(x)
        y = np.asarray(y).astype(np.int64).ravel()
        _check_two_classes(pd.Series(y), "the training outcome")
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.asarray(x.columns, dtype=object)
        self.preprocessor_ = self._preprocessor().fit(x)
        xp = self.preprocessor_.transform(x)
        self.stage1_ = self._stage1(xp, y)
        self.top_n_scores_ = self._inner_scores(x, y) if self.top_n == "auto" else {}
        self.top_n_ = max(self.top_n_scores_, key=self.top_n_scores_.get) if self.top_n_scores_ else self.top_n
        self.selected_features_ = [r["feature"] for r in self.stage1_[: self.top_n_]]
        self.prevalence_ = float(y.mean())
        self.cut_points_ = {"low": self.low_factor * self.prevalence_, "high": self.high_factor * self.prevalence_}
        self.tree_ = self.forest_ = self.nodes_ = self.trees_ = None
        fitted = self._stage2(xp, y, self.selected_features_)
        if self.stage2 == "tree":
            self.tree_ = fitted
            self.nodes_ = tree_to_nodes(fitted, self.selected_features_) if fitted is not None else {"leaf": 0}
            self._annotate_leaves(apply_nodes(self.nodes_, xp), y)
        else:
            self.forest_ = fitted
            self.trees_ = [tree_to_arrays(t) for t in fitted.estimators_] if fitted is not None else []
        return self

    def _preprocessor(self) -> RiskPreprocessor:
        return RiskPreprocessor(self.imputation, self.max_missing_fraction, self.missing_indicators)

    def _stage1(self, xp: pd.DataFrame, y: np.ndarray) -> list:
        stage1 = []
        for column in xp.columns:
            found = search_threshold(
                xp[column].to_numpy(),
                y,
                self.stage1_max_depth,
                self.stage1_min_samples_leaf,
                self.grid_size,
                self.stage1_score,
                self.random_state,
            )
            if found is not None:
                stage1.append({"feature": column, **found})
        stage1.sort(key=lambda r: -r["score"])  # stable: equal scores keep column order
        return stage1

    def _stage2(self, xp: pd.DataFrame, y: np.ndarray, features: list):
        """The fitted scikit-learn stage-2 model on ``features``, or None when stage 1 selected nothing."""
        if not features:
            return None
        if self.stage2 == "tree":
            model = DecisionTreeClassifier(
                max_depth=self.max_depth,
                min_samples_leaf=self.min_samples_leaf,
                class_weight=self.class_weight,
                random_state=self.random_state,
            )
        else:
            model = RandomForestClassifier(
                n_estimators=self.n_estimators,
                max_depth=self.max_depth,
                min_samples_leaf=self.min_samples_leaf,
                class_weight=self.class_weight,
                random_state=self.random_state,
            )
        return model.fit(xp[features].to_numpy(), y)

    def _inner_scores(self, x: pd.DataFrame, y: np.ndarray) -> dict:
        """Mean inner-CV AUC of each ``top_n_grid`` candidate, every step refitted on the inner training part."""
        splitter = StratifiedKFold(self.inner_folds, shuffle=True, random_state=self.random_state)
        scores = {n: [] for n in self.top_n_grid}
        for train, test in splitter.split(x, y):
            pre = self._preprocessor().fit(x.iloc[train])
            x_train, x_test = pre.transform(x.iloc[train]), pre.transform(x.iloc[test])
            ranked = [r["feature"] for r in self._stage1(x_train, y[train])]
            for n in self.top_n_grid:
                fitted = self._stage2(x_train, y[train], ranked[:n])
                if fitted is None or len(np.unique(y[test])) < 2:
                    continue
                inner_train, inner_test = x_train[ranked[:n]].to_numpy(), x_test[ranked[:n]].to_numpy()
                if self.stage2 == "tree":  # the leaf's unweighted training rate, as the final model scores
                    rate = pd.Series(y[train]).groupby(fitted.apply(inner_train)).mean()
                    prob = rate.reindex(fitted.apply(inner_test)).to_numpy()
                else:
                    prob = fitted.predict_proba(inner_test)[:, 1]
                scores[n].append(roc_auc_score(y[test], prob))
        return {n: float(np.mean(v)) for n, v in scores.items() if v}

    def _annotate_leaves(self, leaves: np.ndarray, y: np.ndarray) -> None:
        for leaf, _ in iter_leaves(self.nodes_):
            in_leaf = leaves == leaf["leaf"]
            n, positives = int(in_leaf.sum()), int(y[in_leaf].sum())
            leaf.update(n=n, positives=positives, rate=positives / n if n else self.prevalence_)
            leaf["level"] = risk_level(leaf["rate"], self.cut_points_)

    def _probability(self, x) -> np.ndarray:
        check_is_fitted(self, "prevalence_")
        xp = self.preprocessor_.transform(_as_frame(x, self.feature_names_in_))
        if self.stage2 == "tree":
            table = {leaf["leaf"]: leaf["rate"] for leaf, _ in iter_leaves(self.nodes_)}
            return np.array([table[i] for i in apply_nodes(self.nodes_, xp)], dtype=np.float64)
        if not self.trees_:
            return np.full(len(xp), self.prevalence_)
        values = xp[self.selected_features_].to_numpy(dtype=np.float64)
        total = np.zeros(len(xp))
        for arrays in self.trees_:  # summed in tree order then divided, as scikit-learn's forest does
            total += np.asarray(arrays["probability"])[apply_arrays(arrays, values)]
        return total / len(self.trees_)

    def predict_proba(self, x) -> np.ndarray:
        """``(N, 2)`` probabilities; column 1 is the stage-2 probability of the positive class."""
        rate = self._probability(x)
        return np.stack([1.0 - rate, rate], axis=1)

    def predict(self, x) -> np.ndarray:
        """0/1: positive when the probability is at least the training prevalence."""
        return (self._probability(x) >= self.prevalence_).astype(np.int64)

    def predict_risk(self, x) -> np.ndarray:
        """Risk level (``low`` / ``medium`` / ``high``) of every row, from its probability and ``cut_points_``."""
        return np.array([risk_level(p, self.cut_points_) for p in self._probability(x)], dtype=object)

    def to_dict(self) -> dict:
        """JSON-ready fitted state: parameters, preprocessing, stage-1 scores, selected features, stage 2."""
        check_is_fitted(self, "prevalence_")
        params = {**self.get_params(), "top_n_grid": list(self.top_n_grid)}
        state = {
            "params": params,
            "feature_names_in": list(self.feature_names_in_),
            "preprocessing": self.preprocessor_.to_dict(),
            "stage1": self.stage1_,
            "top_n": self.top_n_,
            "top_n_scores": {str(k): v for k, v in self.top_n_scores_.items()},
            "selected_features": list(self.selected_features_),
            "prevalence": self.prevalence_,
            "cut_points": dict(self.cut_points_),
        }
        if self.stage2 == "tree":
            state["tree"] = self.nodes_
        else:
            state["forest"] = self.trees_
        return state

    @classmethod
    def from_dict(cls, state: dict) -> TwoStageRiskModel:
        """Rebuild a model that predicts exactly as the saved one (no scikit-learn tree or forest object)."""
        params = dict(state["params"])
        params["top_n_grid"] = tuple(params["top_n_grid"])
        model = cls(**params)
        model.classes_ = np.array([0, 1])
        model.feature_names_in_ = np.asarray(state["feature_names_in"], dtype=object)
        model.preprocessor_ = RiskPreprocessor.from_dict(state["preprocessing"])
        model.stage1_, model.selected_features_ = state["stage1"], list(state["selected_features"])
        model.top_n_ = state["top_n"]
        model.top_n_scores_ = {None if k == "None" else int(k): v for k, v in state["top_n_scores"].items()}
        model.prevalence_, model.cut_points_ = float(state["prevalence"]), dict(state["cut_points"])
        model.tree_ = model.forest_ = model.nodes_ = model.trees_ = None
        if model.stage2 == "tree":
            model.nodes_ = state["tree"]
        else:
            model.trees_ = state["forest"]
        return model


# --------------------------------------------------------------------------------------------------- JSON I/O


def package_versions() -> dict:
    """Versions recorded in the JSON so a reader knows what produced it."""
    import sklearn

    from .. import __version__

    return {
        "medfusionnet": __version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def save_models(
    path, models: dict, with_screening: bool = False, bins: dict | None = None, tabular_fields=None
) -> dict:
    """Write ``{outcome: TwoStageRiskModel}`` as one human-readable JSON file; returns the written document.

    ``tabular_fields`` (`data.tabular.TabularField` declarations) say how a patient's raw fields become the
    models' input columns (`data.tabular.TabularEncoder.frame`); by default every input column is a numeric field
    of that name. The file is replaced atomically (`write_text_atomic`): a failed save keeps the previous model file.
    """
    if tabular_fields is None:
        columns = dict.fromkeys(c for m in models.values() for c in m.feature_names_in_)
        tabular_fields = [{"name": c, "kind": "numeric"} for c in columns]
    document = {
        "format_version": FORMAT_VERSION,
        "model": MODEL_NAME,
        "with_screening": with_screening,
        "versions": package_versions(),
        "tabular_fields": [f.to_dict() for f in parse_fields(tabular_fields, f"{path}: tabular_fields")],
        "bins": bins or {},
        "outcomes": {name: m.to_dict() for name, m in models.items()},
    }
    write_text_atomic(path, _readable_json(document))
    return document


def _readable_json(document) -> str:
    """JSON indented by level, with lists of plain values kept on one line (a forest's node arrays stay compact)."""
    text = json.dumps(document, indent=4)
    # JSON strings cannot hold a raw newline, so only the layout whitespace is touched.
    return (
        re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text) + "\n"
    )


def load_models(path) -> dict:
    """``{outcome: TwoStageRiskModel}`` from `save_models`' JSON (no pickle).

    Raises:
        ValueError: naming the file when it is not a saved two-stage risk model.
    """
    with open(path) as f:
        return models_from_document(json.load(f), str(path))


def models_from_document(document: dict, where: str = "risk model") -> dict:
    """``{outcome: TwoStageRiskModel}`` from the parsed JSON document of `save_models`; errors name ``where``."""
    if not isinstance(document, dict) or document.get("model") != MODEL_NAME or "outcomes" not in document:
        raise ValueError(f'{where}: not a two-stage risk model JSON (expected "model": "{MODEL_NAME}")')
    return {name: TwoStageRiskModel.from_dict(state) for name, state in document["outcomes"].items()}


# ------------------------------------------------------------------------------------------------- evaluation


def comparison_models(
    random_state: int = 0, max_depth: int = 3, min_samples_leaf: int = 20, n_estimators: int = 100
) -> dict:
    """Reference classifiers by short name (``tree``, ``logistic``, ``forest``, ``boosting``: decision tree, logistic
    regression, random forest, gradient boosting), each behind a median `SimpleImputer` (and a scaler for the
    logistic regression)."""
    # The same information as the two-stage model: median imputation plus missing-value indicators.
    impute = SimpleImputer(strategy="median", keep_empty_features=True, add_indicator=True)
    return {
        "tree": make_pipeline(
            clone(impute),
            DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf, random_state=random_state),
        ),
        "logistic": make_pipeline(clone(impute), StandardScaler(), LogisticRegression(max_iter=2000)),
        "forest": make_pipeline(
            clone(impute),
            RandomForestClassifier(n_estimators=n_estimators, min_samples_leaf=5, random_state=random_state),
        ),
        "boosting": make_pipeline(
            clone(impute), GradientBoostingClassifier(n_estimators=n_estimators, max_depth=2, random_state=random_state)
        ),
    }


def binary_metrics(y, prob, threshold: float) -> dict:
    """`CV_METRICS` for probabilities ``prob`` called positive at ``prob >= threshold``."""
    y = np.asarray(y).astype(np.int64)
    pred = (np.asarray(prob) >= threshold).astype(np.int64)
    sensitivity = recall_score(y, pred, pos_label=1, zero_division=0)
    specificity = recall_score(y, pred, pos_label=0, zero_division=0)
    return {
        "auc": roc_auc_score(y, prob),
        "f1": f1_score(y, pred, zero_division=0),
        "gmean": float(np.sqrt(sensitivity * specificity)),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def cross_validate(
    x: pd.DataFrame,
    y_table: pd.DataFrame,
    models: dict,
    outcomes: Sequence[str] | None = None,
    with_screening: bool = False,
    n_splits: int = 5,
    repeats: int = 5,
    seed: int = 0,
    keep_models: bool = False,
    groups=None,
) -> dict:
    """Repeated stratified k-fold cross-validation of every model on every outcome, under the same folds.

    With ``groups`` (one id per row, e.g. NIH's patient id) the folds are `StratifiedGroupKFold` splits, reshuffled
    with seed ``seed + repeat``, so no group has rows on both sides of a split.

    Every model is cloned and fitted on the training rows of each fold only (imputation, thresholds, selection
    and tree included). A model with a true ``auxiliary_outcomes`` attribute (the tabular-only MedFusionNet) is
    fitted on the training rows' outcome and, in setting (a), their other outcomes as extra targets. Binary
    predictions use ``probability >= training prevalence`` for every model, so F1 and the other thresholded metrics
    compare like with like.

    Returns ``{"scores": DataFrame (outcome, model, repeat, fold, *CV_METRICS), "roc": {outcome: {model: (y,
    prob)}} out-of-fold for the first repeat, "levels": {outcome: {model: DataFrame}} out-of-fold patients,
    positives and rate per risk level in the first repeat (models with ``predict_risk``), "folds": [...]}``;
    ``folds`` holds ``(outcome, model, train_index, fitted)`` when ``keep_models``.
    """
    outcomes = list(y_table.columns if outcomes is None else outcomes)
    rows, roc, levels, folds = [], {}, {}, []
    for outcome in outcomes:
        features, y = outcome_features(x, y_table, outcome, with_screening), y_table[outcome].to_numpy()
        oof = {name: np.zeros(len(y)) for name in models}
        oof_levels = {name: np.empty(len(y), dtype=object) for name in models if hasattr(models[name], "predict_risk")}
        for k, (train, test) in enumerate(fold_indices(y, n_splits, repeats, seed, groups)):
            repeat, fold = divmod(k, n_splits)
            threshold = float(y[train].mean())
            for name, model in models.items():
                target = y[train]
                if getattr(model, "auxiliary_outcomes", False) and not with_screening:
                    # the training rows' other outcomes as extra targets (never as inputs, never from the test rows)
                    target = y_table[[outcome, *(c for c in y_table.columns if c != outcome)]].to_numpy()[train]
                fitted = clone(model).fit(features.iloc[train], target)
                prob = fitted.predict_proba(features.iloc[test])[:, 1]
                rows.append(
                    {
                        "outcome": outcome,
                        "model": name,
                        "repeat": repeat,
                        "fold": fold,
                        **binary_metrics(y[test], prob, threshold),
                    }
                )
                if repeat == 0:
                    oof[name][test] = prob
                    if name in oof_levels:
                        oof_levels[name][test] = fitted.predict_risk(features.iloc[test])
                if keep_models:
                    folds.append((outcome, name, train, fitted))
        roc[outcome] = {name: (y, oof[name]) for name in models}
        levels[outcome] = {name: rates_by_level(lv, y) for name, lv in oof_levels.items()}
    return {"scores": pd.DataFrame(rows), "roc": roc, "levels": levels, "folds": folds}


def fold_indices(y, n_splits: int = 5, repeats: int = 5, seed: int = 0, groups=None) -> list:
    """``(train, test)`` index pairs of repeated stratified k-fold splits, patient-grouped when ``groups`` is given."""
    y = np.asarray(y)
    if groups is None:
        splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y))
    groups = np.asarray(groups)
    return [
        split
        for r in range(repeats)
        for split in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed + r).split(
            np.zeros(len(y)), y, groups
        )
    ]


def summarize_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over folds and repeats, one row per (outcome, model)."""
    grouped = scores.groupby(["outcome", "model"], sort=False)[list(CV_METRICS)]
    mean, std = grouped.mean().add_suffix("_mean"), grouped.std(ddof=0).add_suffix("_std")
    return pd.concat([mean, std], axis=1).reset_index()


def level_rates(model: TwoStageRiskModel, x, y) -> pd.DataFrame:
    """Patients, positives and positive rate within each risk level of ``model`` on ``(x, y)``."""
    return rates_by_level(model.predict_risk(x), y)


def rates_by_level(levels, y) -> pd.DataFrame:
    """Patients, positives and positive rate per risk level, from each row's level and 0/1 outcome."""
    levels, y = np.asarray(levels, dtype=object), np.asarray(y)
    rows = [
        {"level": lv, "n": int((levels == lv).sum()), "positives": int(y[levels == lv].sum())} for lv in RISK_LEVELS
    ]
    frame = pd.DataFrame(rows)
    frame["rate"] = frame["positives"] / frame["n"].where(frame["n"] > 0)
    return frame
