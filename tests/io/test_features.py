"""Clinical feature declarations, value checks, raw encoding, training statistics and the features CSV."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from volcnn.io.features import (
    COVARIANCE_SHRINKAGE,
    FeatureError,
    attach_features,
    feature_matrix,
    fit_feature_stats,
    parse_feature_spec,
    read_feature_spec,
    read_features_csv,
)

DECL: dict[str, Any] = {
    "age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
    "sex": {"type": "categorical", "values": ["F", "M", "X"]},
    "smoker": {"type": "binary"},
}


# --------------------------------------------------------------------------------------------- declaration


@pytest.mark.parametrize(
    ("decl", "message"),
    [
        ([], "declares at least one feature"),
        ({}, "declares at least one feature"),
        ({"age": "numeric"}, "feature 'age': a declaration is an object"),
        ({"age": {"type": "float"}}, "feature 'age': type must be one of"),
        ({"age": {"type": "numeric", "scale": 2}}, "feature 'age': unknown key"),
        ({"sex": {"type": "categorical"}}, "feature 'sex': a categorical needs 'values'"),
        ({"sex": {"type": "categorical", "values": ["F"]}}, "feature 'sex': a categorical needs 'values'"),
        ({"sex": {"type": "categorical", "values": ["F", "F"]}}, "feature 'sex': a categorical needs 'values'"),
        ({"sex": {"type": "categorical", "values": [True, False]}}, "feature 'sex': categories are strings"),
        ({"smoker": {"type": "binary", "values": [0, 1]}}, "feature 'smoker': 'values' is for categorical"),
        ({"smoker": {"type": "binary", "min": 0}}, "feature 'smoker': 'min' is a finite number"),
        ({"age": {"type": "numeric", "max": float("inf")}}, "feature 'age': 'max' is a finite number"),
        ({"age": {"type": "numeric", "min": 5, "max": 1}}, "feature 'age': min 5.0 > max 1.0"),
        ({"age": {"type": "numeric", "unit": 3}}, "feature 'age': unit is a string"),
        ({"": {"type": "numeric"}}, "feature names are non-empty strings"),
    ],
)
def test_bad_declarations_name_the_feature(decl: Any, message: str) -> None:
    with pytest.raises(FeatureError, match=message) as err:
        parse_feature_spec(decl, "dl.json: features")
    assert str(err.value).startswith("dl.json: features")


def test_declaration_layout_and_round_trip() -> None:
    spec = parse_feature_spec(DECL)
    assert spec.names == ["age", "sex", "smoker"]
    assert spec.columns == ["age", "sex=F", "sex=M", "sex=X", "smoker"]
    assert spec.n_columns == 5
    assert spec.column_slice("sex") == slice(1, 4) and spec.column_slice("smoker") == slice(4, 5)
    assert spec.column_groups() == [0, 1, 1, 1, 2]
    assert spec.numeric_columns() == [True, False, False, False, False]
    assert spec.to_json() == DECL
    assert parse_feature_spec(spec.to_json()) == spec
    assert parse_feature_spec(spec) is spec


def test_read_feature_spec(tmp_path: Path) -> None:
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": []}))
    assert read_feature_spec(path) is None
    path.write_text(json.dumps({"features": DECL, "training": []}))
    spec = read_feature_spec(path)
    assert spec is not None and spec.names == ["age", "sex", "smoker"]
    path.write_text(json.dumps({"features": {"age": {"type": "int"}}}))
    with pytest.raises(FeatureError, match=f"{path}: features: feature 'age'"):
        read_feature_spec(path)


# --------------------------------------------------------------------------------------------- values


def test_encode_layout_one_hot_and_nan_for_missing() -> None:
    spec = parse_feature_spec(DECL)
    got = spec.encode({"age": 63, "sex": "M", "smoker": True}, "e")
    assert got.dtype == np.float32 and got.shape == (5,)
    np.testing.assert_array_equal(got, [63.0, 0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(spec.encode({"age": 40.5, "sex": "X", "smoker": 0}, "e"), [40.5, 0, 0, 1, 0])
    missing_age = spec.encode({"sex": "F", "smoker": None}, "e")
    assert np.isnan(missing_age[0]) and np.isnan(missing_age[4])
    np.testing.assert_array_equal(missing_age[1:4], [1.0, 0.0, 0.0])
    assert np.isnan(spec.encode({"age": 1, "sex": None, "smoker": 1}, "e")[1:4]).all()
    assert np.isnan(spec.encode(None, "e")).all() and np.isnan(spec.encode({}, "e")).all()
    assert spec.missing({"age": 3, "sex": None}) == ["sex", "smoker"]
    assert spec.missing(None) == ["age", "sex", "smoker"]


def test_integer_categories_match_by_type() -> None:
    spec = parse_feature_spec({"grade": {"type": "categorical", "values": [1, 2, 3]}})
    np.testing.assert_array_equal(spec.encode({"grade": 2}, "e"), [0.0, 1.0, 0.0])
    assert "'2' is not one of the declared values" in spec.check({"grade": "2"}, "e")[0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"age": "63"}, "feature 'age': '63' is not a number"),
        ({"age": float("nan")}, "feature 'age': NaN is not a value"),
        ({"age": float("inf")}, "feature 'age': inf is not a finite number"),
        ({"age": True}, "feature 'age': True is not a number"),
        ({"age": 121}, "feature 'age': 121 is outside the declared range"),
        ({"age": -1}, "feature 'age': -1 is outside the declared range"),
        ({"sex": "m"}, "feature 'sex': 'm' is not one of the declared values"),
        ({"smoker": 2}, "feature 'smoker': 2 is not binary"),
        ({"smoker": "yes"}, "feature 'smoker': 'yes' is not binary"),
        ({"weight": 70}, "feature 'weight' is not declared"),
        ([63, "M"], "'features' must be an object"),
    ],
)
def test_bad_values_name_entry_and_feature(values: Any, message: str) -> None:
    spec = parse_feature_spec(DECL)
    problems = spec.check(values, "training[3] (a.nii.gz)")
    assert len(problems) == 1 and problems[0].startswith("training[3] (a.nii.gz): ")
    assert message in problems[0]
    with pytest.raises(FeatureError, match="training\\[3\\]"):
        spec.encode(values, "training[3] (a.nii.gz)")


def test_check_lists_every_problem_of_an_entry() -> None:
    problems = parse_feature_spec(DECL).check({"age": "x", "sex": "Q", "smoker": 1, "bmi": 20}, "e")
    assert len(problems) == 3 and all(p.startswith("e: feature ") for p in problems)
    assert any("'bmi' is not declared" in p for p in problems)
    assert any("'age': 'x' is not a number" in p for p in problems)
    assert any("'sex': 'Q' is not one of" in p for p in problems)


def test_attach_features_collects_all_entries() -> None:
    entries = [
        {"image": "/d/a.nii.gz", "label": 0, "features": {"age": 50, "sex": "F", "smoker": 0}},
        {"image": "/d/b.nii.gz", "label": 1},
    ]
    out = attach_features(entries, DECL, "training")
    assert out[0]["label"] == 0 and out[0]["image"] == "/d/a.nii.gz"
    np.testing.assert_array_equal(out[0]["features"], [50, 1, 0, 0, 0])
    assert np.isnan(out[1]["features"]).all()
    assert entries[0]["features"] == {"age": 50, "sex": "F", "smoker": 0}  # the input is not changed
    np.testing.assert_array_equal(feature_matrix(out)[0], out[0]["features"])
    assert feature_matrix(out).shape == (2, 5)
    bad = [*entries, {"image": "/d/c.nii.gz", "features": {"age": "old"}}, {"image": "d.nii.gz", "features": {"x": 1}}]
    with pytest.raises(FeatureError) as err:
        attach_features(bad, DECL, "validation")
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("validation[2] (c.nii.gz)") and "'age'" in lines[0]
    assert lines[1].startswith("validation[3] (d.nii.gz)") and "'x'" in lines[1]


# --------------------------------------------------------------------------------------------- statistics


def test_fit_feature_stats_uses_only_the_rows_given() -> None:
    spec = parse_feature_spec(DECL)
    rows = [
        {"age": 40, "sex": "F", "smoker": 1},
        {"age": 60, "sex": "M", "smoker": 0},
        {"age": None, "sex": "M", "smoker": 1},
        {"age": 80, "sex": None, "smoker": 1},
    ]
    other = [{"age": 100, "sex": "X", "smoker": 0}, {"age": 110, "sex": "X", "smoker": 0}]
    raw = np.stack([spec.encode(r, f"row {i}") for i, r in enumerate(rows + other)])
    stats = fit_feature_stats(spec, raw[: len(rows)])
    # age: mean and population std of 40, 60, 80 (the missing one ignored)
    assert stats["mean"][0] == pytest.approx(60.0) and stats["std"][0] == pytest.approx(math.sqrt(800 / 3))
    # sex: prevalence among the three with a value; smoker: 3 of 4; 0/1 columns are not scaled
    np.testing.assert_allclose(stats["mean"][1:], [1 / 3, 2 / 3, 0.0, 0.75])
    assert stats["std"][1:] == [1.0, 1.0, 1.0, 1.0]
    everything = fit_feature_stats(spec, raw)
    assert everything["mean"][3] > 0 and everything["mean"][0] != pytest.approx(60.0)


def test_fit_feature_stats_constant_numeric_has_unit_std() -> None:
    spec = parse_feature_spec({"age": {"type": "numeric"}})
    stats = fit_feature_stats(spec, np.array([[5.0], [5.0], [np.nan]]))
    assert stats == {"mean": [5.0], "std": [1.0], "precision": [[1.0]]}  # no variance: unit, uncorrelated


def test_fit_feature_stats_precision_is_the_inverse_of_the_shrunk_pairwise_covariance() -> None:
    spec = parse_feature_spec({"a": {"type": "numeric"}, "b": {"type": "numeric"}, "c": {"type": "numeric"}})
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 1.0]])
    scale = np.diag([2.0, 1.0, 1.0])  # standardised away
    raw = rng.multivariate_normal([5.0, -2.0, 0.0], scale @ cov @ scale, 20000)
    raw[rng.random(raw.shape) < 0.2] = np.nan  # pairs are estimated where both are present
    got = np.linalg.inv(np.array(fit_feature_stats(spec, raw)["precision"]))  # the covariance of (x - mean) / std
    shrunk = (1 - COVARIANCE_SHRINKAGE) * cov + COVARIANCE_SHRINKAGE * np.eye(3)
    np.testing.assert_allclose(got, shrunk, atol=0.03)


def test_fit_feature_stats_refuses_a_feature_without_value() -> None:
    spec = parse_feature_spec(DECL)
    raw = np.stack([spec.encode({"age": 50, "smoker": 1}, "a"), spec.encode({"age": 60, "smoker": None}, "b")])
    with pytest.raises(FeatureError, match=r"\['sex'\] have no value in any training entry"):
        fit_feature_stats(spec, raw)
    with pytest.raises(FeatureError, match="expected \\(N, 5\\)"):
        fit_feature_stats(spec, raw[:, :4])
    with pytest.raises(FeatureError, match="no entries"):
        feature_matrix([])


# --------------------------------------------------------------------------------------------- features CSV


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "features.csv"
    path.write_text(text)
    return path


def test_read_features_csv(tmp_path: Path) -> None:
    path = _csv(tmp_path, "case,age,smoker,sex\nA,63,yes,M\nB,,No,\nC,41.5,0,X\n")
    got = read_features_csv(path, DECL)
    assert got == {
        "A": {"age": 63.0, "smoker": 1, "sex": "M"},
        "B": {"age": None, "smoker": 0, "sex": None},
        "C": {"age": 41.5, "smoker": 0, "sex": "X"},
    }
    # a declared feature without a column is missing for every case
    got = read_features_csv(_csv(tmp_path, "id,age\nA,63\n"), DECL, key="id")
    assert got == {"A": {"age": 63.0}}
    assert np.isnan(parse_feature_spec(DECL).encode(got["A"], "A")[1:]).all()


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        ("case,age,weight\nA,63,70\n", ["column(s) ['weight'] are not declared"]),
        ("case,age\nA,63\nA,64\n", ["line 3: case 'A' appears twice"]),
        ("case,age\nA,NaN\nB,nan\n", ["line 2 (case A): feature 'age': NaN", "line 3 (case B): feature 'age': NaN"]),
        ("case,smoker\nA,2\n", ["line 2 (case A): feature 'smoker': '2' is not binary"]),
        ("case,age\nA,old\n", ["line 2 (case A): feature 'age': 'old' is not a number"]),
        ("case,age\nA,130\n", ["line 2 (case A): feature 'age': 130.0 is outside the declared range"]),
        ("case,sex\nA,Z\n", ["line 2 (case A): feature 'sex': 'Z' is not one of"]),
        ("case,age\n,63\n", ["line 2: empty 'case'"]),
        ("name,age\nA,63\n", ["missing column(s) ['case']"]),
        ("case,age\n", ["no rows"]),
    ],
)
def test_read_features_csv_errors(tmp_path: Path, text: str, messages: list[str]) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(FeatureError) as err:
        read_features_csv(path, DECL)
    msg = str(err.value)
    assert str(path) in msg
    for m in messages:
        assert m in msg
    assert len(msg.splitlines()) == len(messages)


def test_read_features_csv_header_with_spaces(tmp_path: Path) -> None:
    got = read_features_csv(_csv(tmp_path, "case, age\nA, 63\n"), DECL)
    assert got == {"A": {"age": 63.0}}


def test_read_features_csv_row_longer_than_header(tmp_path: Path) -> None:
    with pytest.raises(FeatureError):
        read_features_csv(_csv(tmp_path, "case,age\nA,63,70\n"), DECL)
