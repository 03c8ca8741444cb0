import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medfusionnet.data.tabular import (
    FEATURE_NAMES,
    TabularEncoder,
    missing_tabular_vector,
    parse_age,
    parse_follow_up,
    parse_sex,
    parse_view,
)


@pytest.mark.parametrize(
    "raw, years",
    [
        (58, 58.0),
        ("58", 58.0),
        ("058Y", 58.0),
        ("013M", 13 / 12),
        ("001D", 1 / 365.25),
        ("002W", 2 / 52.1775),
        (0, 0.0),
        (120, 120.0),
    ],
)
def test_parse_age_valid(raw, years):
    assert parse_age(raw) == pytest.approx(years)


@pytest.mark.parametrize("raw", [412, 121, -1, "abc", "", "?", None, float("nan"), "58 years"])
def test_parse_age_missing_or_impossible(raw):
    assert math.isnan(parse_age(raw))


def test_parse_categories():
    assert parse_sex("m") == "M" and parse_sex("female") == "F" and parse_sex("O") is None and parse_sex("") is None
    assert parse_view("pa") == "PA" and parse_view("AP") == "AP" and parse_view("LL") is None
    assert parse_follow_up("3") == 3.0 and math.isnan(parse_follow_up("-1")) and math.isnan(parse_follow_up("x"))


def _records():
    return [
        {"age": 20, "sex": "M", "view": "PA", "follow_up": "0"},
        {"age": 40, "sex": "F", "view": "AP", "follow_up": "3"},
        {"age": 412, "sex": "M", "view": "PA", "follow_up": "1"},  # impossible age: ignored in the fit
    ]


def test_encoder_values_by_hand():
    enc = TabularEncoder().fit(_records())
    assert enc.stats_["age"] == pytest.approx({"mean": 30.0, "std": 10.0})
    assert enc.stats_["follow_up"] == pytest.approx({"scale": math.log1p(3)})
    vec = enc.encode({"age": "050Y", "sex": "F", "view": "AP", "follow_up": 3})
    expected = dict(zip(FEATURE_NAMES, vec))
    assert expected["age"] == pytest.approx(2.0) and expected["age_missing"] == 0
    assert (expected["sex_M"], expected["sex_F"], expected["sex_missing"]) == (0, 1, 0)
    assert (expected["view_PA"], expected["view_AP"], expected["view_missing"]) == (0, 1, 0)
    assert expected["follow_up"] == pytest.approx(1.0) and expected["follow_up_missing"] == 0


def test_encoder_missing_and_impossible_values():
    enc = TabularEncoder().fit(_records())
    for record in ({}, {"age": 412, "sex": "X", "view": "LL", "follow_up": "?"}, {"age": None, "sex": None}):
        vec = dict(zip(FEATURE_NAMES, enc.encode(record)))
        assert vec["age"] == 0 and vec["age_missing"] == 1
        assert vec["sex_missing"] == 1 and vec["sex_M"] == vec["sex_F"] == 0
        assert vec["view_missing"] == 1 and vec["follow_up_missing"] == 1
    assert enc.transform(_records()).shape == (3, len(FEATURE_NAMES))


def test_encoder_save_load_roundtrip(tmp_path):
    enc = TabularEncoder().fit(_records())
    path = tmp_path / "enc.json"
    enc.save(str(path))
    loaded = TabularEncoder.load(str(path))
    np.testing.assert_array_equal(loaded.transform(_records()), enc.transform(_records()))


def test_encoder_rejects_other_layout_and_unfitted(tmp_path):
    path = tmp_path / "enc.json"
    path.write_text('{"feature_names": ["age"], "age_mean": 1, "age_std": 1, "follow_up_scale": 1}')
    with pytest.raises(ValueError, match="expected"):
        TabularEncoder.load(str(path))
    with pytest.raises(RuntimeError, match="not fitted"):
        TabularEncoder().encode({})


def test_legacy_encoder_json_encodes_as_before(tmp_path):
    path = tmp_path / "enc.json"  # the 0.8.0 format: NIH fields only, scaling in three numbers
    path.write_text(
        json.dumps({"feature_names": list(FEATURE_NAMES), "age_mean": 40, "age_std": 20, "follow_up_scale": 2})
    )
    vec = TabularEncoder.load(str(path)).encode({"age": "060Y", "sex": "male", "view": "LL", "follow_up": 3})
    expected = [1.0, 0, 1, 0, 0, 0, 0, 1, math.log1p(3) / 2, 0]  # age (60-40)/20; M; view missing; follow-up
    np.testing.assert_allclose(vec, expected, rtol=1e-6)


def test_declared_fields_encode_binary_numeric_and_categorical_by_hand():
    fields = [
        {"name": "smokes", "kind": "binary", "column": "Smokes"},
        {"name": "bmi", "kind": "numeric", "range": [10, 80], "missing": ["unknown"]},
        {"name": "stage", "kind": "categorical", "categories": ["i", "ii"], "aliases": {"1": "I"}},
    ]
    records = [{"clinical": {"Smokes": "1"}, "bmi": 20, "stage": "I"}, {"clinical": {"Smokes": "no"}, "bmi": 30}]
    enc = TabularEncoder(fields).fit(records)
    assert enc.feature_names == [
        "smokes",
        "smokes_missing",
        "bmi",
        "bmi_missing",
        "stage_I",
        "stage_II",
        "stage_missing",
    ]
    assert enc.field_slices() == [(0, 2, 1), (2, 4, 3), (4, 7, 6)]
    assert enc.stats_ == {"bmi": {"mean": 25.0, "std": 5.0}}
    np.testing.assert_array_equal(
        enc.encode({"clinical": {"Smokes": "yes"}, "bmi": 35, "stage": "1"}), [1, 0, 2, 0, 1, 0, 0]
    )
    np.testing.assert_array_equal(enc.encode({"bmi": "unknown", "stage": "ii"}), [0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(missing_tabular_vector(7, enc.field_slices()), [0, 1, 0, 1, 0, 0, 1])


def test_out_of_range_and_unseen_values_are_missing_and_counted(caplog):
    enc = TabularEncoder(
        [{"name": "bmi", "range": [10, 80]}, {"name": "stage", "kind": "categorical", "categories": ["I"]}]
    )
    records = [{"bmi": 25, "stage": "I"}, {"bmi": 400, "stage": "IV"}, {"bmi": "x", "stage": "IV"}, {"bmi": None}]
    enc.fit(records)
    assert enc.stats_["bmi"]["mean"] == 25.0  # the implausible 400 and the text are not fitted on
    with caplog.at_level("WARNING"):
        counts = enc.report_invalid(records, "test rows")
    assert counts == {"bmi": 2, "stage": 2}
    assert "test rows: 2 value(s) of field 'stage' encoded as missing (e.g. 'IV' is not one of ['I'])" in caplog.text
    assert "400 is outside the plausible range [10, 80]" in caplog.text
    np.testing.assert_array_equal(enc.encode(records[1]), [0, 1, 0, 1])


def test_encoder_json_round_trip_is_exact(tmp_path):
    fields = [{"name": "age", "parse": "age", "range": [0, 120]}, {"name": "n", "range": [0, None], "scale": "log1p"}]
    enc = TabularEncoder(fields).fit([{"age": 33.3, "n": 7}, {"age": "041Y", "n": 0}, {"age": 58.1}])
    enc.save(str(tmp_path / "enc.json"))
    loaded = TabularEncoder.load(str(tmp_path / "enc.json"))
    assert loaded.state_dict() == enc.state_dict() and loaded.fields == enc.fields
    probe = [{"age": a, "n": n} for a, n in ((12.5, 3), ("090Y", None), (None, 1e6))]
    np.testing.assert_array_equal(loaded.transform(probe), enc.transform(probe))


@pytest.mark.parametrize(
    "fields, match",
    [
        ([{"name": "a", "kind": "ordinal"}], "field 'a': kind 'ordinal' is not one of"),
        ([{"name": "a", "range": [5, 1]}], "field 'a': range \\[5, 1\\] must be \\[low, high\\] with low < high"),
        ([{"name": "a", "kind": "categorical"}], "field 'a': a categorical field needs 'categories'"),
        ([{"name": "a", "unit": "kg"}], "field 'a': unknown key\\(s\\) \\['unit'\\]"),
        (
            [{"name": "a", "kind": "categorical", "categories": ["x"], "aliases": {"y": "z"}}],
            "field 'a': aliases point to",
        ),
        ([{"name": "a"}, {"name": "a"}], "field name\\(s\\) \\['a'\\] declared more than once"),
        ([{"kind": "numeric"}], "every field needs a 'name'"),
        ([], "non-empty list"),
    ],
)
def test_schema_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        TabularEncoder(fields)


def test_declared_fields_and_a_patient_csv_reach_the_network(nih_dir, tmp_path, caplog):
    # a clinical table keyed by patient: one declared numeric field ("smoking years") beside NIH's four
    from medfusionnet.data.nih import prepare_datasets
    from medfusionnet.data.tabular import NIH_FIELDS
    from medfusionnet.data.transforms import xray_transforms
    from medfusionnet.networks.medfusionnet import MedFusionNet

    table = pd.read_csv(nih_dir / "labels.csv", dtype=str)
    patients = table["Patient ID"].drop_duplicates()
    smoking = pd.DataFrame({"Patient ID": patients, "Smoking years": [str(i % 30) for i in range(len(patients))]})
    smoking.loc[smoking.index[:3], "Smoking years"] = "400"  # implausible: encoded as missing, and counted
    smoking.to_csv(tmp_path / "clinical.csv", index=False)
    fields = [f.to_dict() for f in NIH_FIELDS] + [{"name": "smoking", "column": "Smoking years", "range": [0, 80]}]
    data = prepare_datasets(
        str(nih_dir),
        labels_csv=str(nih_dir / "labels.csv"),
        images_dir=str(nih_dir / "images_256"),
        tabular_fields=fields,
        tabular_csv=str(tmp_path / "clinical.csv"),
        output_dir=str(tmp_path / "run"),
    )
    encoder = data.encoder
    flagged = [r.getMessage() for r in caplog.records if "of field 'smoking' encoded as missing" in r.getMessage()]
    assert flagged and "400 is outside the plausible range [0, 80]" in flagged[0]
    assert sum(int(m.split(": ")[1].split(" ")[0]) for m in flagged) == 3  # the three patients, over the splits
    assert encoder.feature_names[-2:] == ["smoking", "smoking_missing"] and encoder.num_features == 12
    first = data.train[0]
    assert (
        first["clinical"]["Smoking years"] == smoking.set_index("Patient ID").loc[first["patient_id"], "Smoking years"]
    )
    saved = TabularEncoder.load(str(tmp_path / "run" / "tabular_encoder.json"))
    assert saved.state_dict() == encoder.state_dict()
    # the same encoder object gives the risk model its frame and the network its vector, with one notion of missing
    records = data.train[:20]
    frame, vectors = encoder.frame(records), encoder.transform(records)
    np.testing.assert_array_equal(frame["smoking"].isna().to_numpy(), vectors[:, -1] == 1)
    network = MedFusionNet(
        num_tabular_features=encoder.num_features,
        network_size="tiny",
        image_size=64,
        tabular_fields=encoder.field_slices(),
    ).eval()
    assert len(network.tabular_tokens.fields) == 5
    item = xray_transforms(encoder, 64, with_label=False)(dict(first))
    with torch.no_grad():
        logits = network(item["image"][None], item["tabular"][None])
    assert logits.shape == (1, 14) and torch.isfinite(logits).all()


def test_risk_model_features_and_probabilities_become_the_tabular_input(nih_dir, tmp_path):
    from medfusionnet.data.nih import read_nih_csv
    from medfusionnet.data.tabular import NIH_FIELDS
    from medfusionnet.risk import two_stage

    frame = read_nih_csv(nih_dir / "labels.csv")
    x, y_table = two_stage.nih_tables(frame)
    models = {o: two_stage.TwoStageRiskModel(top_n=2).fit(x, y_table[o]) for o in ("Effusion", "Infiltration")}
    two_stage.save_models(tmp_path / "risk.json", models, tabular_fields=NIH_FIELDS)
    records = frame.to_dict("records")
    encoder = TabularEncoder.for_risk_model(str(tmp_path / "risk.json")).fit(records)
    selected = {c for m in models.values() for c in m.selected_features_}
    by_field = {
        "age": "age",
        "sex_M": "sex",
        "sex_F": "sex",
        "view_PA": "view",
        "view_AP": "view",
        "follow_up": "follow_up",
    }
    assert {f.name for f in encoder.fields} == {by_field[c.removesuffix(" missing")] for c in selected}
    assert encoder.feature_names[-3:] == ["risk_Effusion", "risk_Infiltration", "risk_missing"]
    *_, (start, end, flag) = encoder.field_slices()
    assert (end, flag) == (encoder.num_features, encoder.num_features - 1) and end - start == 3
    vectors = encoder.transform(records[:5])
    for o, column in (("Effusion", start), ("Infiltration", start + 1)):
        np.testing.assert_allclose(vectors[:, column], models[o].predict_proba(x.iloc[:5])[:, 1], rtol=1e-6)
    assert (vectors[:, flag] == 0).all() and encoder.encode({})[flag] == 1  # no field at all: the risk token is missing
    base = TabularEncoder(encoder.fields).fit(records).transform(records[:5])
    np.testing.assert_array_equal(vectors[:, :start], base)
    encoder.save(str(tmp_path / "enc.json"))  # the risk model travels inside the encoder's JSON
    (tmp_path / "risk.json").unlink()
    np.testing.assert_array_equal(TabularEncoder.load(str(tmp_path / "enc.json")).transform(records[:5]), vectors)
