import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from conftest import DATA, NIH, REPO, require
from scipy import stats as scipy_stats
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score

from medfusionnet.constants import LABELS
from medfusionnet.data.nih import read_nih_csv
from medfusionnet.evaluation.decision import RiskTierRule, combine_tiers, decision_document
from medfusionnet.risk import two_stage
from medfusionnet.risk.assessment import PatientRiskAssessor
from medfusionnet.risk.factor_levels import FactorRiskRule
from medfusionnet.risk.network import TabularMedFusionNetClassifier

CERVICAL = DATA / "cervical" / "risk_factors_cervical_cancer.csv"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cervical():
    return two_stage.read_risk_csv(require(CERVICAL), two_stage.CERVICAL_OUTCOMES)


def _synthetic(n=600, cut=37, noise=0.05, seed=0):
    """Outcome = (x > cut), flipped for a fraction ``noise`` of rows; two pure-noise columns beside it."""
    rng = np.random.default_rng(seed)
    value = rng.integers(18, 70, n).astype(float)
    y = (value > cut).astype(int)
    flip = rng.random(n) < noise
    y[flip] = 1 - y[flip]
    x = pd.DataFrame({"x": value, "noise_a": rng.normal(size=n), "noise_b": rng.integers(0, 3, n).astype(float)})
    return x, y


def test_cervical_csv_parses_with_the_documented_counts(cervical):
    x, y_table = cervical
    assert len(x) == 858 and x.shape[1] + y_table.shape[1] == 36
    assert int(x.isna().sum().sum()) == 3622  # every '?' cell, none in the outcomes
    assert y_table.sum().to_dict() == {"Hinselmann": 35, "Schiller": 74, "Citology": 44, "Biopsy": 55}
    assert x["Age"].min() == 13 and x["Age"].max() == 84


def test_threshold_search_recovers_a_known_cut_point():
    x, y = _synthetic()
    found = two_stage.search_threshold(x["x"].to_numpy(), y)
    assert abs(found["threshold"] - 37.5) <= 1.0 and found["direction"] == ">"
    # the refined rule's score is the ROC-AUC of the 0/1 rule, as scikit-learn computes it
    assert found["score"] == pytest.approx(roc_auc_score(y, x["x"] > found["threshold"]))
    model = two_stage.TwoStageRiskModel(top_n=1).fit(x, y)
    assert model.selected_features_ == ["x"] and model.stage1_[0]["feature"] == "x"
    f1 = two_stage.search_threshold(x["x"].to_numpy(), y, score="f1")
    assert abs(f1["threshold"] - 37.5) <= 1.0


def test_rule_scores_flip_a_protective_rule():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 1, 0, 0])
    scores, directions = two_stage.rule_scores(x, y, np.array([2.5]))
    assert scores[0] == 1.0 and directions[0] == "<="
    f1, direction = two_stage.rule_scores(x, y, np.array([2.5]), "f1")
    assert f1[0] == 1.0 and direction[0] == "<="


def test_preprocessing_drops_and_imputes():
    x = pd.DataFrame({"a": [1.0, np.nan, 3.0, 10.0], "empty": [np.nan, np.nan, np.nan, 1.0], "const": [2.0] * 4})
    pre = two_stage.RiskPreprocessor().fit(x)
    assert pre.columns_ == ["a"] and set(pre.dropped_) == {"empty", "const"}
    assert pre.transform(x)["a"].tolist() == [1.0, 3.0, 3.0, 10.0]  # median of 1, 3, 10
    ffill = two_stage.RiskPreprocessor(imputation="ffill").fit(x)
    assert ffill.transform(x)["a"].tolist() == [1.0, 1.0, 3.0, 10.0]
    assert ffill.transform(x.iloc[[1, 0]])["a"].tolist() == [3.0, 1.0]  # a leading gap takes the median
    with pytest.raises(ValueError, match="imputation='mean'"):
        two_stage.RiskPreprocessor(imputation="mean").fit(x)


def test_cross_validation_fits_everything_inside_the_folds(cervical):
    x, y_table = cervical
    result = two_stage.cross_validate(
        x, y_table, {"two_stage": two_stage.TwoStageRiskModel()}, outcomes=["Biopsy"], repeats=1, keep_models=True
    )
    assert len(result["folds"]) == 5 and len(result["scores"]) == 5
    for _, _, train, fitted in result["folds"]:
        expected = x.iloc[train][fitted.preprocessor_.columns_].median()
        assert fitted.preprocessor_.medians_ == pytest.approx(expected.to_dict())
        assert fitted.prevalence_ == pytest.approx(y_table["Biopsy"].iloc[train].mean())
        assert sum(leaf["n"] for leaf, _ in two_stage.iter_leaves(fitted.nodes_)) == len(train)
    assert "Biopsy" in result["roc"] and result["scores"]["auc"].between(0, 1).all()


def test_missing_indicators_share_a_pattern_and_carry_signal():
    rng = np.random.default_rng(1)
    n = 400
    skipped = rng.random(n) < 0.3  # patients who left a block of questions unanswered
    y = (skipped & (rng.random(n) < 0.6)).astype(int)
    x = pd.DataFrame(
        {
            "stds": np.where(skipped, np.nan, rng.integers(0, 2, n)),
            "stds_number": np.where(skipped, np.nan, rng.integers(0, 3, n)),
            "rare": np.where(np.arange(n) < 360, np.nan, 1.0),
            "age": rng.integers(15, 60, n),
        }
    )
    pre = two_stage.RiskPreprocessor().fit(x)
    assert pre.indicators_ == {"stds missing": ["stds", "stds_number"], "rare missing": ["rare"]}
    assert "rare" in pre.dropped_ and pre.output_columns() == [
        "stds",
        "stds_number",
        "age",
        "stds missing",
        "rare missing",
    ]
    out = pre.transform(x)
    np.testing.assert_array_equal(out["stds missing"], skipped.astype(float))
    assert not out.isna().any().any()
    again = two_stage.RiskPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    pd.testing.assert_frame_equal(again.transform(x), out)
    assert two_stage.RiskPreprocessor(missing_indicators=False).fit(x).output_columns() == [
        "stds",
        "stds_number",
        "age",
    ]
    model = two_stage.TwoStageRiskModel(top_n=1).fit(x, y)
    assert model.selected_features_ == ["stds missing"]  # the gap pattern is the only signal


def test_forest_stage2_round_trips_and_matches_scikit_learn(cervical, tmp_path):
    x, y_table = cervical
    model = two_stage.TwoStageRiskModel(**{**two_stage.FOREST_PARAMS, "n_estimators": 25}).fit(x, y_table["Biopsy"])
    assert len(model.trees_) == 25 and model.top_n_ is None
    assert len(model.selected_features_) == len(model.stage1_)
    values = model.preprocessor_.transform(x)[model.selected_features_].to_numpy()
    np.testing.assert_allclose(model.predict_proba(x), model.forest_.predict_proba(values), rtol=0, atol=1e-12)
    two_stage.save_models(tmp_path / "forest.json", {"Biopsy": model})
    loaded = two_stage.load_models(tmp_path / "forest.json")["Biopsy"]
    assert loaded.forest_ is None and loaded.stage2 == "forest"
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    np.testing.assert_array_equal(loaded.predict_risk(x), model.predict_risk(x))
    first = model.forest_.estimators_[0]
    np.testing.assert_array_equal(
        two_stage.apply_arrays(loaded.trees_[0], values), first.apply(values.astype(np.float32))
    )


def test_top_n_auto_is_chosen_by_inner_cross_validation():
    x, y = _synthetic(n=300)
    model = two_stage.TwoStageRiskModel(top_n="auto", top_n_grid=(1, 3), max_depth=2).fit(x, y)
    assert set(model.top_n_scores_) == {1, 3} and model.top_n_ == max(model.top_n_scores_, key=model.top_n_scores_.get)
    assert model.top_n_scores_[1] > 0.85  # the single true cut point already ranks well on held-out rows
    assert len(model.selected_features_) == model.top_n_


def test_grouped_folds_keep_each_patient_on_one_side():
    y = np.array([0, 1] * 30)
    groups = np.repeat(np.arange(20), 3)  # three images per patient
    folds = two_stage.fold_indices(y, n_splits=5, repeats=2, seed=0, groups=groups)
    assert len(folds) == 10
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test]) and 0 < y[test].mean() < 1
    assert [t.tolist() for _, t in folds[:5]] != [t.tolist() for _, t in folds[5:]]  # repeats reshuffle
    assert sorted(np.concatenate([t for _, t in folds[:5]]).tolist()) == list(range(60))


def test_json_round_trip_predicts_identically(cervical, tmp_path):
    x, y_table = cervical
    features = two_stage.outcome_features(x, y_table, "Biopsy", with_screening=True)
    assert {"Hinselmann", "Schiller", "Citology"} <= set(features.columns) and "Biopsy" not in features.columns
    model = two_stage.TwoStageRiskModel().fit(features, y_table["Biopsy"])
    two_stage.save_models(tmp_path / "model.json", {"Biopsy": model}, with_screening=True)
    document = json.loads((tmp_path / "model.json").read_text())
    assert document["outcomes"]["Biopsy"]["preprocessing"]["medians"]["Age"] == x["Age"].median()
    loaded = two_stage.load_models(tmp_path / "model.json")["Biopsy"]
    assert loaded.tree_ is None  # prediction runs from the JSON rules alone
    np.testing.assert_array_equal(loaded.predict_proba(features), model.predict_proba(features))
    np.testing.assert_array_equal(loaded.predict_risk(features), model.predict_risk(features))
    # the JSON routing agrees with scikit-learn's own tree
    reference = model.tree_.apply(model.preprocessor_.transform(features)[model.selected_features_].to_numpy())
    np.testing.assert_array_equal(
        two_stage.apply_nodes(model.nodes_, model.preprocessor_.transform(features)), reference
    )
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="other.json"):
        two_stage.load_models(tmp_path / "other.json")


def test_risk_levels_are_monotone_on_training_data(cervical):
    x, y_table = cervical
    for outcome, with_screening, params in (
        ("Biopsy", False, {}),
        ("Biopsy", True, {}),
        ("Schiller", False, {}),
        ("Schiller", True, {}),
        ("Biopsy", False, two_stage.FOREST_PARAMS),
    ):
        features = two_stage.outcome_features(x, y_table, outcome, with_screening)
        model = two_stage.TwoStageRiskModel(**{**params, "n_estimators": 25}).fit(features, y_table[outcome])
        rates = two_stage.level_rates(model, features, y_table[outcome]).dropna()["rate"].to_numpy()
        assert len(rates) >= 2 and np.all(np.diff(rates) > 0), (outcome, with_screening, rates)


def test_estimator_conventions():
    x, y = _synthetic(n=200)
    model = two_stage.TwoStageRiskModel(top_n=2, max_depth=2)
    with pytest.raises(NotFittedError):
        model.predict(x)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "nodes_")
    assert model.set_params(**model.get_params()) is model
    assert model.fit(x, y) is model and model.predict_proba(x).shape == (200, 2)
    np.testing.assert_array_equal(model.predict(x.to_numpy()), model.predict(x))  # arrays use the fit's column order
    assert model.score(x, y) > 0.9  # ClassifierMixin accuracy on an almost separable rule
    with pytest.raises(ValueError, match="stage1_score='gini'"):
        two_stage.TwoStageRiskModel(stage1_score="gini").fit(x, y)
    with pytest.raises(ValueError, match="stage2='boosting'"):
        two_stage.TwoStageRiskModel(stage2="boosting").fit(x, y)
    with pytest.raises(ValueError, match="top_n=0"):
        two_stage.TwoStageRiskModel(top_n=0).fit(x, y)


def test_bins_describe_thresholds():
    bins = two_stage.load_bins()
    assert {"Age", "Number of sexual partners", "First sexual intercourse", "age"} <= set(bins)
    assert two_stage.describe_rule("Age", ">", 37.5, bins) == "Age > 37.5 (threshold in bin 35-44)"
    assert two_stage.discretise([17, 18, 60], bins["Age"]).tolist() == ["<18", "18-24", ">=55"]
    with pytest.raises(ValueError, match="'Age'.*2 labels"):
        two_stage.validate_bins({"Age": {"edges": [0, 10, 20, 30], "labels": ["a", "b"]}}, "cfg.yaml")


@pytest.mark.parametrize(
    "text, outcomes, match",
    [
        ("a,b\n1,0\n2,1\n", ["y"], r"outcome column\(s\) \['y'\] not found"),
        ("a,y\n1,0\n?,1\nabc,0\n", ["y"], r"line 4, column 'a': value 'abc'"),
        ("a,y\n1,0\n2,0\n", ["y"], r"outcome column 'y' has a single class"),
        ("a,y\n1,0\n2,?\n", ["y"], r"line 3, outcome column 'y'"),
        ("", ["y"], r"bad\.csv: the file is empty"),
    ],
)
def test_bad_input_errors(tmp_path, text, outcomes, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        two_stage.read_risk_csv(path, outcomes)


def test_sentinels_become_missing(tmp_path, caplog):
    path = tmp_path / "s.csv"
    path.write_text("a,b,y\n?,1,0\n NA ,nan,1\n,2,0\n3,NaN,1\n")
    with caplog.at_level("INFO", logger="medfusionnet.risk.two_stage"):
        x, y_table = two_stage.read_risk_csv(path, ["y"])
    assert x["a"].isna().tolist() == [True, True, True, False] and x["b"].isna().sum() == 2
    assert y_table["y"].tolist() == [0, 1, 0, 1]
    assert f"{path}: 5 missing cell(s) in 4 row(s) and 2 of 2 feature column(s) (most in 'a': 3)" in caplog.text


def test_nih_tables():
    frame = read_nih_csv(require(NIH / "labels.csv"))
    x, y_table = two_stage.nih_tables(frame)
    assert list(x.columns) == list(two_stage.NIH_FEATURES) and list(y_table.columns) == list(LABELS)
    assert x["sex_M"].sum() == 247 and x["view_PA"].sum() == 394
    assert int(y_table["Infiltration"].sum()) == 92


def test_script_writes_all_outputs_on_cervical(tmp_path, capsys):
    build = _script("build_risk_model")
    out = tmp_path / "cervical"
    config = tmp_path / "risk.yaml"
    config.write_text("medfusionnet:\n  max_epochs: 2\n")  # every model in the comparison, the network kept short
    assert (
        build.main(
            [
                "--csv",
                str(require(CERVICAL)),
                "--output_dir",
                str(out),
                "--config",
                str(config),
                "--repeats",
                "1",
                "--outcomes",
                "Biopsy",
                "Schiller",
                "--with_screening",
                "--export_tabular",
                "--factor_levels",
            ]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "model.json",
        "patients.csv",
        "report.md",
        "roc_curves.png",
        "tabular_features.csv",
        "tree_Biopsy.png",
        "tree_Schiller.png",
    } <= names
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == 858 and set(patients["Biopsy_level"]) <= set(two_stage.RISK_LEVELS)
    assert set(patients["factor_level"]) == set(two_stage.RISK_LEVELS)
    report = (out / "report.md").read_text()
    assert "(a) risk factors only" in report and "(b) with screening results" in report
    for model in build.MODELS:
        assert f"| Biopsy | {model} |" in report
    assert "Positive rate per risk level of `two_stage_forest`, out of fold (first CV repeat), (a)" in report
    assert "Positive rate per rule-based risk level (`--factor_levels`):" in report
    assert two_stage.load_models(out / "model.json")["Biopsy"].stage2 == "forest"
    loaded = two_stage.load_models(out / "model.json")
    x, y_table = two_stage.read_risk_csv(CERVICAL, ["Biopsy", "Schiller"])
    np.testing.assert_allclose(
        loaded["Biopsy"].predict_proba(two_stage.outcome_features(x, y_table, "Biopsy", True))[:, 1],
        patients["Biopsy_probability"],
    )
    assert "AUC (b)" in capsys.readouterr().out
    cv = pd.read_csv(out / "cv_results.csv")
    assert list(cv.columns[:8]) == ["setting", "outcome", "model", "repeat", "fold", "auc", "f1", "gmean"]
    assert len(cv) == 2 * 2 * 7 * 5 and set(cv["setting"]) == {"a", "b"}  # settings x outcomes x models x folds
    assert list(dict.fromkeys(cv["model"])) == list(build.MODELS)
    ranking = json.loads((out / "rank_stats.json").read_text())
    for setting in ("a", "b"):
        part = cv[cv["setting"] == setting]
        table = part.pivot_table(index=["outcome", "repeat", "fold"], columns="model", values="auc")
        friedman = ranking[setting]["friedman"]
        expected = scipy_stats.friedmanchisquare(*(table[m] for m in friedman["models"]))
        assert friedman["blocks"] == 10 and friedman["statistic"] == pytest.approx(expected.statistic)
        assert len(ranking[setting]["wilcoxon_holm"]) == 21 and (out / f"ranks_{setting}.png").stat().st_size > 0
    assert "Friedman test over 10 blocks (outcome x repeat x fold, cross-validated AUC): chi2 = " in report


def test_script_runs_on_nih_metadata(tmp_path):
    build = _script("build_risk_model")
    out = tmp_path / "nih"
    assert (
        build.main(
            [
                "--csv",
                str(require(NIH / "labels.csv")),
                "--nih",
                "--output_dir",
                str(out),
                "--repeats",
                "1",
                "--outcomes",
                "Infiltration",
                "Effusion",
                "--models",
                "two_stage_forest",
                "tree",
                "--images_in",
                str(NIH / "meta" / "train_val_list.txt"),
            ]
        )
        == 0
    )
    model = json.loads((out / "model.json").read_text())
    assert set(model["outcomes"]) == {"Infiltration", "Effusion"}
    assert model["tabular_fields"][0]["parse"] == "age"  # the network's NIH fields, for the --risk_model input
    patients = pd.read_csv(out / "patients.csv")
    assert len(patients) == 469 - 56  # the official test images left out
    test_images = (NIH / "meta" / "test_list.txt").read_text().split()
    assert not set(patients["name"]) & set(test_images)


def test_factor_rule_levels_by_hand():
    rule = FactorRiskRule(
        {"smoking": {"column": "Smokes", "op": ">=", "value": 1}, "hpv": {"column": "Dx:HPV", "op": "==", "value": 1}},
        {"prior_cancer": {"column": "Dx:Cancer", "op": ">=", "value": 1}},
    )
    frame = pd.DataFrame(
        {
            "Smokes": [0, 1, 1, 0, np.nan],
            "Dx:HPV": [0, 0, 1, 0, 0],
            "Dx:Cancer": [0, 0, 0, 1, 0],
        }
    )
    out = rule.evaluate(frame)
    assert out["level"].tolist() == ["low", "medium", "high", "high", "low"]
    assert out["fired"].tolist() == ["", "smoking", "smoking;hpv", "prior_cancer", ""]
    assert out["unknown"].tolist() == ["", "", "", "", "smoking"]
    assert FactorRiskRule.from_mapping(rule.to_dict(), "saved").evaluate(frame).equals(out)
    with pytest.raises(ValueError, match=r"reads column\(s\) \['Dx:Cancer'\]"):
        rule.evaluate(frame.drop(columns="Dx:Cancer"), "t.csv")


def test_factor_rule_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"cfg: factors.smoking: op '=>' is not one of"):
        FactorRiskRule({"smoking": {"column": "Smokes", "op": "=>", "value": 1}}, where="cfg")
    with pytest.raises(ValueError, match=r"cfg: severe.cancer: value 'yes' is not a number"):
        FactorRiskRule({}, {"cancer": {"column": "Dx:Cancer", "op": ">=", "value": "yes"}}, where="cfg")
    with pytest.raises(ValueError, match=r"cfg: factors.hpv needs exactly the keys column, op and value"):
        FactorRiskRule({"hpv": {"column": "Dx:HPV", "op": ">="}}, where="cfg")
    with pytest.raises(ValueError, match=r"\['a'\] named under both"):
        FactorRiskRule({"a": {"column": "x", "op": ">", "value": 0}}, {"a": {"column": "y", "op": ">", "value": 0}})
    with pytest.raises(ValueError, match=r"cfg: unknown key\(s\) \['factor'\]"):
        FactorRiskRule.from_mapping({"factor": {}}, "cfg")


def test_default_factor_rule_on_cervical():
    rule = FactorRiskRule.load()
    x, _ = two_stage.read_risk_csv(require(CERVICAL), ["Biopsy"])
    out = rule.evaluate(x)
    assert set(rule.columns) <= set(x.columns) and set(out["level"]) == set(two_stage.RISK_LEVELS)
    assert (out.loc[x["Dx:Cancer"] == 1, "level"] == "high").all()  # a prior cancer diagnosis is high on its own
    smokers_only = (x["Smokes"] == 1) & out["fired"].eq("smoking")
    assert smokers_only.any() and (out.loc[smokers_only, "level"] == "medium").all()


def test_tabular_medfusionnet_learns_a_threshold_rule_with_missing_values():
    x, y = _synthetic(n=500, noise=0.0, seed=3)
    x.loc[x.index[::7], "noise_a"] = np.nan  # a column with gaps gets a missing flag, not an imputed guess
    train, test = np.arange(400), np.arange(400, 500)
    model = TabularMedFusionNetClassifier(max_epochs=40).fit(x.iloc[train], y[train])
    assert model.fields_[1][2] == model.columns_.index("noise_a missing")
    assert roc_auc_score(y[test], model.predict_proba(x.iloc[test])[:, 1]) > 0.95
    again = TabularMedFusionNetClassifier(max_epochs=40).fit(x.iloc[train], y[train])
    np.testing.assert_array_equal(model.predict_proba(x.iloc[test]), again.predict_proba(x.iloc[test]))  # seeded


def test_tabular_medfusionnet_learns_from_the_training_fold_only(cervical):
    x, y_table = cervical
    small = TabularMedFusionNetClassifier(max_epochs=2)
    result = two_stage.cross_validate(
        x, y_table, {"medfusionnet": small}, outcomes=["Biopsy"], repeats=1, keep_models=True
    )
    probe = x.iloc[:50]
    for (_, _, train, fitted), (_, test) in zip(result["folds"], two_stage.fold_indices(y_table["Biopsy"])):
        assert not set(train) & set(test)
        imputed = fitted.preprocessor_.transform(x.iloc[train])
        kept = [c for c in fitted.columns_ if c not in fitted.preprocessor_.indicators_]
        np.testing.assert_allclose(fitted.means_[: len(kept)], imputed[kept].mean().to_numpy())
        assert fitted.prevalence_ == pytest.approx(y_table["Biopsy"].iloc[train].mean())
        # the same training rows with every other row replaced by noise give the same model
        scrambled = x.copy()
        scrambled.iloc[test] = np.random.default_rng(0).normal(size=(len(test), x.shape[1]))
        refit = clone(small).fit(scrambled.iloc[train], y_table["Biopsy"].iloc[train])
        np.testing.assert_allclose(refit.predict_proba(probe), fitted.predict_proba(probe))
    assert result["scores"]["auc"].between(0, 1).all()


def _clinical_risk_model(tmp_path):
    """A two-stage risk model of one outcome on NIH age plus a clinical column 'Smokes', saved as JSON."""
    rng = np.random.default_rng(0)
    n = 400
    x = pd.DataFrame({"age": rng.integers(20, 90, n).astype(float), "Smokes": rng.integers(0, 2, n).astype(float)})
    x.loc[x.index[::9], "Smokes"] = np.nan
    y = ((x["Smokes"] == 1) & (x["age"] > 55)).astype(int).to_numpy()
    model = two_stage.TwoStageRiskModel(top_n=None).fit(x, y)
    path = tmp_path / "risk_model.json"
    fields = [{"name": "age", "parse": "age", "range": [0, 120]}, {"name": "Smokes", "kind": "binary"}]
    two_stage.save_models(path, {"Effusion": model}, tabular_fields=fields)
    return path, two_stage.load_models(path)["Effusion"]


def test_patient_risk_reads_nih_fields_and_clinical_columns(tmp_path):
    path, model = _clinical_risk_model(tmp_path)
    assessor = PatientRiskAssessor.load(path)
    assert assessor.features == ["age", "Smokes"]
    record = {"age": "070Y", "sex": "F", "clinical": {"Smokes": "1", "Other": "x"}}
    result = assessor.assess(record)
    frame = pd.DataFrame([{"age": 70.0, "Smokes": 1.0}])
    assert result["status"] == "ok" and result["unknown"] == []
    assert result["outcomes"]["Effusion"]["probability"] == pytest.approx(model.predict_proba(frame)[0, 1], abs=1e-6)
    assert result["level"] == result["outcomes"]["Effusion"]["level"] == model.predict_risk(frame)[0]
    expected_rules = [
        f"{r['feature']} {r['direction']} {r['threshold']:g}"
        for r in model.stage1_[: len(model.selected_features_)]
        if (model.preprocessor_.transform(frame).iloc[0][r["feature"]] > r["threshold"]) == (r["direction"] == ">")
    ]
    assert result["outcomes"]["Effusion"]["rules"] == expected_rules and expected_rules
    # a missing answer fires no rule and is listed; no field at all is "no tabular data"
    partial = assessor.assess({"age": 70, "clinical": {"Smokes": "?"}})
    assert partial["unknown"] == ["Smokes"] and not any("Smokes" in r for r in partial["outcomes"]["Effusion"]["rules"])
    assert assessor.assess({"name": "a.png"}) == {"status": "no tabular data", "unknown": ["age", "Smokes"]}
    unusable = assessor.assess({"age": 40, "clinical": {"Smokes": "often"}}, where="image 'b.png'")
    assert unusable["unknown"] == ["Smokes"] and unusable["invalid"] == {"Smokes": "'often' is not 0/1"}
    assert PatientRiskAssessor.load_if_present(tmp_path / "absent.json") is None


def test_combined_tier_is_the_higher_level():
    assert combine_tiers("low", "high") == "high" and combine_tiers("high", "medium") == "high"
    assert combine_tiers("medium", None) == "medium"
    document = decision_document(
        ["a.png", "b.png"],
        np.zeros((2, len(LABELS))),
        [0.5] * len(LABELS),
        RiskTierRule(),
        risks={"a.png": {"status": "ok", "level": "high"}},
    )
    first, second = document["images"]
    assert (first["tier"], first["combined_tier"]) == ("low", "high")
    assert second["tabular_risk"] == {"status": "no tabular data"} and second["combined_tier"] == "low"
    assert "higher of the image tier and the tabular risk level" in document["combined_rule"]
    assert "combined_rule" not in decision_document(["a.png"], np.zeros((1, len(LABELS))), [0.5] * 14, RiskTierRule())


def test_tabular_medfusionnet_learns_auxiliary_outcomes_from_training_rows_only(cervical):
    x, y_table = cervical
    model = TabularMedFusionNetClassifier(max_epochs=1, auxiliary_outcomes=True)
    result = two_stage.cross_validate(
        x, y_table, {"medfusionnet": model}, outcomes=["Biopsy"], repeats=1, keep_models=True
    )
    for _, _, train, fitted in result["folds"]:
        assert fitted.network_.label_queries.shape[0] == 4  # Biopsy first, then the three other outcomes
        assert fitted.prevalence_ == pytest.approx(y_table["Biopsy"].iloc[train].mean())
        assert fitted.predict_proba(x.iloc[:3]).shape == (3, 2)
    screening = two_stage.cross_validate(
        x, y_table, {"medfusionnet": model}, outcomes=["Biopsy"], repeats=1, keep_models=True, with_screening=True
    )
    assert all(f.network_.label_queries.shape[0] == 1 for *_, f in screening["folds"])  # (b): they are inputs
