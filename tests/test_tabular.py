import math

import numpy as np
import pytest

from medfusionnet.data.tabular import FEATURE_NAMES, TabularEncoder, parse_age, parse_follow_up, parse_sex, parse_view


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
    assert enc.age_mean_ == pytest.approx(30.0) and enc.age_std_ == pytest.approx(10.0)
    assert enc.follow_up_scale_ == pytest.approx(math.log1p(3))
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
