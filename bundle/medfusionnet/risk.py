"""Two-stage risk stratification for tabular data (DESIGN.md section 8), generic over binary outcome columns.

Pipeline per outcome, all of it refitted inside every cross-validation fold:

1. `read_risk_csv` (or `nih_tables` for NIH metadata): sentinels such as ``?`` become missing.
2. `RiskPreprocessor`: drops almost-empty and constant columns, imputes the rest (median, or forward fill).
3. Stage 1 (`TwoStageRiskModel`): a shallow univariate decision tree per feature proposes thresholds; a grid search
   around each proposal refines it on the AUC (or F1) of the binary rule; the top-N features are kept.
4. Stage 2: a multivariate decision tree on the selected features; each leaf's training positive rate is the
   patient's probability and maps to a risk level ``low`` / ``medium`` / ``high``.

The fitted model is saved as human-readable JSON (`save_models`) and predicts from that JSON alone (`load_models`);
no pickle. `discretise` and the bins in ``risk_bins.yaml`` only make the report's rules readable.
"""

from __future__ import annotations

import json
import logging
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
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils.validation import check_is_fitted

from .constants import LABELS

logger = logging.getLogger(__name__)

CERVICAL_OUTCOMES: tuple[str, ...] = ("Hinselmann", "Schiller", "Citology", "Biopsy")
# Compared after strip() and lower(): the UCI file writes '?', other copies blanks or 'NA'.
SENTINELS: tuple[str, ...] = ("?", "", "na", "nan")
RISK_LEVELS: tuple[str, ...] = ("low", "medium", "high")
CV_METRICS: tuple[str, ...] = ("auc", "f1", "gmean", "balanced_accuracy", "sensitivity", "specificity")
STAGE1_SCORES: tuple[str, ...] = ("auc", "f1")
IMPUTATIONS: tuple[str, ...] = ("median", "ffill")
NIH_FEATURES: tuple[str, ...] = ("age", "sex_M", "view_PA", "follow_up")
MODEL_NAME = "two_stage"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------- reading


def read_risk_csv(path, outcomes: Sequence[str], features: Sequence[str] | None = None):
    """Read a CSV into a float feature frame ``X`` (NaN = missing) and a 0/1 outcome frame ``Y``.

    ``features=None`` takes every column that is not an outcome. Cells equal to a sentinel in `SENTINELS`
    (case-insensitive, surrounding spaces ignored) are missing.

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
    X = pd.DataFrame({c: numeric[c] for c in features})
    Y = pd.DataFrame({c: numeric[c] for c in outcomes})
    for c in outcomes:
        bad = Y[c].isna() | ~Y[c].isin((0.0, 1.0))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}: line {i + 2}, outcome column '{c}': value '{frame[c].iloc[i]}' is not 0 or 1; "
                "outcomes must be binary and present in every row"
            )
        _check_two_classes(Y[c], f"{path}: outcome column '{c}'")
    return X, Y.astype(np.int64)


def _parse_numeric_column(text: pd.Series, path, column: str) -> pd.Series:
    stripped = text.str.strip()
    sentinel = stripped.str.lower().isin(SENTINELS)
    values = pd.to_numeric(stripped.where(~sentinel), errors="coerce").astype(np.float64)
    bad = values.isna() & ~sentinel
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: line {i + 2}, column '{column}': value '{text.iloc[i]}' is not a number; "
            f"missing values must be one of {list(SENTINELS)} (case-insensitive)"
        )
    return values


def _check_two_classes(y: pd.Series, where: str) -> None:
    classes = np.unique(np.asarray(y))
    if len(classes) < 2:
        raise ValueError(f"{where} has a single class {classes.tolist()}; a risk model needs positives and negatives")


def nih_tables(frame: pd.DataFrame, labels: Sequence[str] = LABELS):
    """Numeric features ``(age, sex_M, view_PA, follow_up)`` and 0/1 findings from `data.read_nih_csv`'s frame.

    Sex other than M/F and views other than PA/AP become missing, so imputation handles them like any other gap.
    """
    sex = frame["sex"].str.upper()
    view = frame["view"].str.upper()
    X = pd.DataFrame(
        {
            "age": frame["age"].astype(np.float64),
            "sex_M": np.where(sex == "M", 1.0, np.where(sex == "F", 0.0, np.nan)),
            "view_PA": np.where(view == "PA", 1.0, np.where(view == "AP", 0.0, np.nan)),
            "follow_up": pd.to_numeric(frame["follow_up"], errors="coerce").astype(np.float64),
        },
        index=frame.index,
    )
    Y = pd.DataFrame(np.stack(frame["label"].to_numpy()).astype(np.int64), columns=list(labels), index=frame.index)
    return X, Y


def outcome_features(X: pd.DataFrame, Y: pd.DataFrame, outcome: str, with_screening: bool = False) -> pd.DataFrame:
    """Feature frame for one outcome: ``X`` alone, or with ``with_screening`` also the other outcome columns
    (cervical setting (b): for Biopsy, the Hinselmann, Schiller and Citology results)."""
    if not with_screening:
        return X
    others = [c for c in Y.columns if c != outcome]
    return pd.concat([X, Y[others].astype(np.float64)], axis=1)


# ------------------------------------------------------------------------------------------------ discretisation


def load_bins(path=None) -> dict:
    """Bins ``{column: {"edges": [...], "labels": [...]}}`` from a YAML file (the package default when None).

    Raises:
        ValueError: naming the file and key when edges are not increasing or labels do not number edges - 1.
    """
    if path is None:
        text = resources.files("medfusionnet").joinpath("risk_bins.yaml").read_text()
        where = "medfusionnet/risk_bins.yaml"
    else:
        with open(path) as f:
            text = f.read()
        where = str(path)
    bins = yaml.safe_load(text) or {}
    return validate_bins(bins, where)


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
    """Drop unusable columns, then impute the rest.

    A column is dropped when its missing fraction exceeds ``max_missing_fraction`` or when its observed values
    are constant; the reason is logged and kept in ``dropped_``. ``imputation='median'`` fills with the training
    median (``medians_``). ``imputation='ffill'`` forward-fills in row order, as the source paper does; this
    assumes rows are ordered in time per patient, which the cervical data is NOT (one row per patient, unordered),
    so it is offered for comparison only. Leading gaps that a forward fill cannot reach take the training median.
    """

    def __init__(self, imputation: str = "median", max_missing_fraction: float = 0.8):
        self.imputation = imputation
        self.max_missing_fraction = max_missing_fraction

    def fit(self, X, y=None):
        """Learn ``columns_`` (kept), ``dropped_`` ({column: reason}) and ``medians_`` from ``X``."""
        if self.imputation not in IMPUTATIONS:
            raise ValueError(f"imputation='{self.imputation}' is not supported; use one of {IMPUTATIONS}")
        X = _as_frame(X)
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.dropped_ = {}
        for column in X.columns:
            observed = X[column].dropna()
            missing = 1.0 - len(observed) / max(len(X), 1)
            if missing > self.max_missing_fraction:
                self.dropped_[column] = f"{missing:.0%} missing (> {self.max_missing_fraction:.0%})"
            elif observed.nunique() <= 1:
                self.dropped_[column] = "constant"
        for column, reason in self.dropped_.items():
            logger.info("dropping column '%s': %s", column, reason)
        self.columns_ = [c for c in X.columns if c not in self.dropped_]
        self.medians_ = {c: float(X[c].median()) for c in self.columns_}
        return self

    def transform(self, X) -> pd.DataFrame:
        """Kept columns of ``X`` with the gaps filled (a frame in ``columns_`` order)."""
        check_is_fitted(self, "medians_")
        X = _as_frame(X, self.feature_names_in_)
        absent = [c for c in self.columns_ if c not in X.columns]
        if absent:
            raise ValueError(f"column(s) {absent} seen in fit are missing from the data to transform")
        out = X[self.columns_].astype(np.float64)
        if self.imputation == "ffill":
            out = out.ffill()
        return out.fillna(self.medians_)

    def to_dict(self) -> dict:
        """JSON-ready state."""
        return {"imputation": self.imputation, "max_missing_fraction": self.max_missing_fraction,
                "feature_names_in": list(self.feature_names_in_), "columns": list(self.columns_),
                "dropped": dict(self.dropped_), "medians": dict(self.medians_)}

    @classmethod
    def from_dict(cls, state: dict) -> RiskPreprocessor:
        """Rebuild a fitted preprocessor from `to_dict`'s output."""
        pre = cls(state["imputation"], state["max_missing_fraction"])
        pre.columns_, pre.dropped_, pre.medians_ = list(state["columns"]), dict(state["dropped"]), state["medians"]
        pre.feature_names_in_ = np.asarray(state["feature_names_in"], dtype=object)
        return pre


def _as_frame(X, columns=None) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        return X
    X = np.asarray(X, dtype=np.float64)
    columns = list(columns) if columns is not None else [f"x{i}" for i in range(X.shape[1])]
    return pd.DataFrame(X, columns=columns[: X.shape[1]])


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
    tree = DecisionTreeClassifier(max_depth=max_depth, min_samples_leaf=min_samples_leaf, class_weight="balanced",
                                  random_state=random_state).fit(x[:, None], y)
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
    return {"threshold": float(candidates[best]), "direction": str(directions[best]), "score": float(scores[best]),
            "proposals": proposals.tolist()}


# ------------------------------------------------------------------------------------------------------ stage 2


def tree_to_nodes(tree: DecisionTreeClassifier, features: Sequence[str]) -> dict:
    """Nested ``{"feature", "threshold", "left", "right"}`` nodes of a fitted tree (left: ``value <= threshold``);
    leaves are ``{"leaf": id}`` until `_annotate_leaves` adds their rates and levels."""
    t = tree.tree_

    def node(i: int) -> dict:
        if t.children_left[i] < 0:
            return {"leaf": int(i)}
        return {"feature": features[t.feature[i]], "threshold": float(t.threshold[i]),
                "left": node(int(t.children_left[i])), "right": node(int(t.children_right[i]))}

    return node(0)


def apply_nodes(nodes: dict, X: pd.DataFrame) -> np.ndarray:
    """Leaf id of every row of ``X`` under the nested nodes (`tree_to_nodes`).

    Values are rounded to float32 first because scikit-learn trees compare float32 inputs; this keeps the JSON
    model's routing identical to the fitted tree's.
    """
    leaves = np.full(len(X), -1, dtype=np.int64)
    stack = [(nodes, np.arange(len(X)))]
    while stack:
        node, rows = stack.pop()
        if "leaf" in node:
            leaves[rows] = node["leaf"]
            continue
        values = X[node["feature"]].to_numpy(dtype=np.float32).astype(np.float64)[rows]
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


def risk_level(rate: float, cut_points: dict) -> str:
    """``low`` below ``cut_points['low']``, ``high`` at or above ``cut_points['high']``, else ``medium``."""
    if rate < cut_points["low"]:
        return "low"
    return "high" if rate >= cut_points["high"] else "medium"


class TwoStageRiskModel(ClassifierMixin, BaseEstimator):
    """Two-stage risk model for one binary outcome (scikit-learn estimator; ``y`` is 0/1).

    Stage 1 (`search_threshold`) scores every preprocessed feature by its best single-threshold rule and keeps the
    ``top_n`` best, ranked by ``stage1_score`` (``auc`` or ``f1`` of the rule; not named ``score``, which is
    ClassifierMixin's accuracy method). Stage 2 fits a `DecisionTreeClassifier` (balanced class weights) on them.
    A patient's probability is the unweighted positive rate of its leaf on the training data. Risk levels use cut points
    relative to the training prevalence p: ``low`` when the leaf rate < ``low_factor * p`` (below the base rate),
    ``high`` when it is >= ``high_factor * p`` (at least twice the base rate by default), ``medium`` between.
    `predict` calls a patient positive when the leaf rate is at least the prevalence (levels medium and high), the
    same rule the cross-validation applies to every compared model.

    Fitted attributes: ``preprocessor_``, ``stage1_`` (all scored features, best first), ``selected_features_``,
    ``tree_`` (the scikit-learn tree, None after loading from JSON), ``nodes_``, ``prevalence_``, ``cut_points_``,
    ``classes_``.
    """

    def __init__(self, top_n=5, stage1_score="auc", stage1_max_depth=2, stage1_min_samples_leaf=10, grid_size=10,
                 max_depth=3, min_samples_leaf=20, low_factor=1.0, high_factor=2.0, imputation="median",
                 max_missing_fraction=0.8, random_state=0):
        self.top_n = top_n
        self.stage1_score = stage1_score
        self.stage1_max_depth = stage1_max_depth
        self.stage1_min_samples_leaf = stage1_min_samples_leaf
        self.grid_size = grid_size
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.low_factor = low_factor
        self.high_factor = high_factor
        self.imputation = imputation
        self.max_missing_fraction = max_missing_fraction
        self.random_state = random_state

    def fit(self, X, y):
        """Fit preprocessing, stage 1 and stage 2 on ``(X, y)``; returns self."""
        if self.stage1_score not in STAGE1_SCORES:
            raise ValueError(f"stage1_score='{self.stage1_score}' is not supported; use one of {STAGE1_SCORES}")
        X = _as_frame(X)
        y = np.asarray(y).astype(np.int64).ravel()
        _check_two_classes(pd.Series(y), "the training outcome")
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.preprocessor_ = RiskPreprocessor(self.imputation, self.max_missing_fraction).fit(X)
        Xp = self.preprocessor_.transform(X)
        stage1 = []
        for column in Xp.columns:
            found = search_threshold(Xp[column].to_numpy(), y, self.stage1_max_depth, self.stage1_min_samples_leaf,
                                     self.grid_size, self.stage1_score, self.random_state)
            if found is not None:
                stage1.append({"feature": column, **found})
        stage1.sort(key=lambda r: -r["score"])  # stable: equal scores keep column order
        self.stage1_ = stage1
        self.selected_features_ = [r["feature"] for r in stage1[: self.top_n]]
        self.prevalence_ = float(y.mean())
        self.cut_points_ = {"low": self.low_factor * self.prevalence_, "high": self.high_factor * self.prevalence_}
        if self.selected_features_:
            self.tree_ = DecisionTreeClassifier(max_depth=self.max_depth, min_samples_leaf=self.min_samples_leaf,
                                                class_weight="balanced", random_state=self.random_state)
            self.tree_.fit(Xp[self.selected_features_].to_numpy(), y)
            self.nodes_ = tree_to_nodes(self.tree_, self.selected_features_)
        else:  # no feature splits the outcome: one leaf at the base rate
            self.tree_, self.nodes_ = None, {"leaf": 0}
        self._annotate_leaves(apply_nodes(self.nodes_, Xp), y)
        return self

    def _annotate_leaves(self, leaves: np.ndarray, y: np.ndarray) -> None:
        for leaf, _ in iter_leaves(self.nodes_):
            in_leaf = leaves == leaf["leaf"]
            n, positives = int(in_leaf.sum()), int(y[in_leaf].sum())
            leaf.update(n=n, positives=positives, rate=positives / n if n else self.prevalence_)
            leaf["level"] = risk_level(leaf["rate"], self.cut_points_)

    def _leaf_table(self) -> dict:
        check_is_fitted(self, "nodes_")
        return {leaf["leaf"]: leaf for leaf, _ in iter_leaves(self.nodes_)}

    def _leaves(self, X) -> np.ndarray:
        check_is_fitted(self, "nodes_")
        return apply_nodes(self.nodes_, self.preprocessor_.transform(_as_frame(X, self.feature_names_in_)))

    def predict_proba(self, X) -> np.ndarray:
        """``(N, 2)`` probabilities; column 1 is the training positive rate of each row's leaf."""
        table = self._leaf_table()
        rate = np.array([table[i]["rate"] for i in self._leaves(X)], dtype=np.float64)
        return np.stack([1.0 - rate, rate], axis=1)

    def predict(self, X) -> np.ndarray:
        """0/1: positive when the leaf's rate is at least the training prevalence."""
        return (self.predict_proba(X)[:, 1] >= self.prevalence_).astype(np.int64)

    def predict_risk(self, X) -> np.ndarray:
        """Risk level (``low`` / ``medium`` / ``high``) of every row."""
        table = self._leaf_table()
        return np.array([table[i]["level"] for i in self._leaves(X)], dtype=object)

    def to_dict(self) -> dict:
        """JSON-ready fitted state: parameters, preprocessing, stage-1 scores, selected features, tree nodes."""
        check_is_fitted(self, "nodes_")
        return {"params": self.get_params(), "feature_names_in": list(self.feature_names_in_),
                "preprocessing": self.preprocessor_.to_dict(), "stage1": self.stage1_,
                "selected_features": list(self.selected_features_), "prevalence": self.prevalence_,
                "cut_points": dict(self.cut_points_), "tree": self.nodes_}

    @classmethod
    def from_dict(cls, state: dict) -> TwoStageRiskModel:
        """Rebuild a model that predicts exactly as the saved one (``tree_`` is None: no scikit-learn object)."""
        model = cls(**state["params"])
        model.classes_ = np.array([0, 1])
        model.feature_names_in_ = np.asarray(state["feature_names_in"], dtype=object)
        model.preprocessor_ = RiskPreprocessor.from_dict(state["preprocessing"])
        model.stage1_, model.selected_features_ = state["stage1"], list(state["selected_features"])
        model.prevalence_, model.cut_points_ = float(state["prevalence"]), dict(state["cut_points"])
        model.nodes_, model.tree_ = state["tree"], None
        return model


# --------------------------------------------------------------------------------------------------- JSON I/O


def package_versions() -> dict:
    """Versions recorded in the JSON so a reader knows what produced it."""
    import sklearn

    from . import __version__

    return {"medfusionnet": __version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
            "pandas": pd.__version__}


def save_models(path, models: dict, with_screening: bool = False, bins: dict | None = None) -> dict:
    """Write ``{outcome: TwoStageRiskModel}`` as one human-readable JSON file; returns the written document."""
    document = {"format_version": FORMAT_VERSION, "model": MODEL_NAME, "with_screening": with_screening,
                "versions": package_versions(), "bins": bins or {},
                "outcomes": {name: m.to_dict() for name, m in models.items()}}
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
    return document


def load_models(path) -> dict:
    """``{outcome: TwoStageRiskModel}`` from `save_models`' JSON (no pickle).

    Raises:
        ValueError: naming the file when it is not a saved two-stage risk model.
    """
    with open(path) as f:
        document = json.load(f)
    if document.get("model") != MODEL_NAME or "outcomes" not in document:
        raise ValueError(f"{path}: not a two-stage risk model JSON (expected \"model\": \"{MODEL_NAME}\")")
    return {name: TwoStageRiskModel.from_dict(state) for name, state in document["outcomes"].items()}


# ------------------------------------------------------------------------------------------------- evaluation


def comparison_models(random_state: int = 0, max_depth: int = 3, min_samples_leaf: int = 20,
                      n_estimators: int = 100) -> dict:
    """Reference classifiers, each behind a median `SimpleImputer` (and a scaler for the logistic regression)."""
    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    return {
        "decision_tree": make_pipeline(clone(impute), DecisionTreeClassifier(
            max_depth=max_depth, min_samples_leaf=min_samples_leaf, random_state=random_state)),
        "logistic_regression": make_pipeline(clone(impute), StandardScaler(), LogisticRegression(max_iter=2000)),
        "random_forest": make_pipeline(clone(impute), RandomForestClassifier(
            n_estimators=n_estimators, min_samples_leaf=5, random_state=random_state)),
        "gradient_boosting": make_pipeline(clone(impute), GradientBoostingClassifier(
            n_estimators=n_estimators, max_depth=2, random_state=random_state)),
    }


def binary_metrics(y, prob, threshold: float) -> dict:
    """`CV_METRICS` for probabilities ``prob`` called positive at ``prob >= threshold``."""
    y = np.asarray(y).astype(np.int64)
    pred = (np.asarray(prob) >= threshold).astype(np.int64)
    sensitivity = recall_score(y, pred, pos_label=1, zero_division=0)
    specificity = recall_score(y, pred, pos_label=0, zero_division=0)
    return {"auc": roc_auc_score(y, prob), "f1": f1_score(y, pred, zero_division=0),
            "gmean": float(np.sqrt(sensitivity * specificity)),
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "sensitivity": sensitivity, "specificity": specificity}


def cross_validate(X: pd.DataFrame, Y: pd.DataFrame, models: dict, outcomes: Sequence[str] | None = None,
                   with_screening: bool = False, n_splits: int = 5, repeats: int = 5, seed: int = 0,
                   keep_models: bool = False) -> dict:
    """Repeated stratified k-fold cross-validation of every model on every outcome, under the same folds.

    Every model is cloned and fitted on the training rows of each fold only (imputation, thresholds, selection
    and tree included). Binary predictions use ``probability >= training prevalence`` for every model, so F1 and
    the other thresholded metrics compare like with like.

    Returns ``{"scores": DataFrame (outcome, model, repeat, fold, *CV_METRICS), "roc": {outcome: {model: (y,
    prob)}} out-of-fold for the first repeat, "folds": [...]}``; ``folds`` holds ``(outcome, model, train_index,
    fitted)`` when ``keep_models``.
    """
    outcomes = list(Y.columns if outcomes is None else outcomes)
    rows, roc, folds = [], {}, []
    for outcome in outcomes:
        features, y = outcome_features(X, Y, outcome, with_screening), Y[outcome].to_numpy()
        splitter = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=seed)
        oof = {name: np.zeros(len(y)) for name in models}
        for k, (train, test) in enumerate(splitter.split(features, y)):
            repeat, fold = divmod(k, n_splits)
            threshold = float(y[train].mean())
            for name, model in models.items():
                fitted = clone(model).fit(features.iloc[train], y[train])
                prob = fitted.predict_proba(features.iloc[test])[:, 1]
                rows.append({"outcome": outcome, "model": name, "repeat": repeat, "fold": fold,
                             **binary_metrics(y[test], prob, threshold)})
                if repeat == 0:
                    oof[name][test] = prob
                if keep_models:
                    folds.append((outcome, name, train, fitted))
        roc[outcome] = {name: (y, oof[name]) for name in models}
    return {"scores": pd.DataFrame(rows), "roc": roc, "folds": folds}


def summarize_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over folds and repeats, one row per (outcome, model)."""
    grouped = scores.groupby(["outcome", "model"], sort=False)[list(CV_METRICS)]
    mean, std = grouped.mean().add_suffix("_mean"), grouped.std(ddof=0).add_suffix("_std")
    return pd.concat([mean, std], axis=1).reset_index()


def level_rates(model: TwoStageRiskModel, X, y) -> pd.DataFrame:
    """Patients, positives and positive rate within each risk level of ``model`` on ``(X, y)``."""
    levels, y = model.predict_risk(X), np.asarray(y)
    rows = [{"level": lv, "n": int((levels == lv).sum()), "positives": int(y[levels == lv].sum())}
            for lv in RISK_LEVELS]
    frame = pd.DataFrame(rows)
    frame["rate"] = frame["positives"] / frame["n"].where(frame["n"] > 0)
    return frame
