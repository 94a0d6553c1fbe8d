"""Clinical features in datalists: ``datalist check`` validates them, ``datalist from-csv --features`` writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from volcnn.cli import main
from volcnn.io import DatalistError, load_datalist
from volcnn.io.datalist_check import check_datalist
from volcnn.io.datalist_import import from_csv, parse_feature_columns
from volcnn.io.datalist_split import SECTIONS
from volcnn.io.features import attach_features, parse_feature_spec, read_feature_spec

DECL: dict[str, Any] = {
    "age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
    "smoker": {"type": "binary"},
    "sex": {"type": "categorical", "values": ["F", "M"]},
}


def _entry(i: int, features: Any = "full") -> dict[str, Any]:
    e: dict[str, Any] = {"image": f"v{i}.nii.gz", "label": i % 2, "patient": f"p{i}"}
    if features == "full":
        e["features"] = {"age": 50 + i, "smoker": i % 2, "sex": "FM"[i % 2]}
    elif features is not None:
        e["features"] = features
    return e


def _datalist(tmp_path: Path, body: dict[str, Any]) -> Path:
    for s in SECTIONS:
        for e in body.get(s, []):
            if isinstance(e, dict) and isinstance(e.get("image"), str):
                (tmp_path / e["image"]).write_bytes(b"")  # existence is all load_images=False checks
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"labels": {"0": "no", "1": "yes"}, **body}))
    return path


def _good(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "features": DECL,
        "training": [_entry(0), _entry(1), _entry(2)],
        "validation": [_entry(3)],
        "test": [_entry(4)],
    }
    return body | overrides


# --------------------------------------------------------------------------------------------- check


def test_check_good_features_and_counts(tmp_path: Path) -> None:
    body = _good()
    body["training"][2]["features"]["age"] = None  # missing: null
    del body["training"][1]["features"]["sex"]  # missing: absent
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    assert report.ok, report.format()
    assert report.features == DECL
    assert report.counts["training"]["features_missing"] == {"age": 1 / 3, "smoker": 0.0, "sex": 1 / 3}
    assert report.counts["validation"]["features_missing"] == {"age": 0.0, "smoker": 0.0, "sex": 0.0}
    assert report.counts["total"]["features_missing"]["age"] == pytest.approx(0.2)
    text = report.format()
    assert "feature (missing %)" in text
    age_row = next(line for line in text.splitlines() if line.startswith("age (numeric, years)"))
    assert age_row.split()[-4:] == ["33%", "0%", "0%", "20%"]


def test_check_without_features_has_no_feature_counts(tmp_path: Path) -> None:
    body = {"training": [_entry(0, None), _entry(1, {})], "validation": [_entry(2, None)]}
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    assert report.ok, report.format()
    assert report.features == {} and "features_missing" not in report.counts["training"]
    assert "feature (missing %)" not in report.format()


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"age": "63", "smoker": 1, "sex": "F"}, "feature 'age': '63' is not a number"),
        ({"age": float("nan"), "smoker": 1, "sex": "F"}, "feature 'age': NaN is not a value"),
        ({"age": 63, "smoker": 1, "sex": "U"}, "feature 'sex': 'U' is not one of the declared values"),
        ({"age": 163, "smoker": 1, "sex": "F"}, "feature 'age': 163 is outside the declared range"),
        ({"age": 63, "smoker": 3, "sex": "F"}, "feature 'smoker': 3 is not binary"),
        ({"age": 63, "smoker": 1, "sex": "F", "weight": 80}, "feature 'weight' is not declared"),
        ([63, 1, "F"], "'features' must be an object"),
    ],
)
def test_check_each_feature_problem_names_entry_and_feature(tmp_path: Path, features: Any, message: str) -> None:
    body = _good()
    body["training"][1] = _entry(1, features)
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith("training[1] v1.nii.gz: ")
    assert message in report.problems[0]
    assert "1 problem(s)" in report.format()


def test_check_keeps_going_past_every_feature_problem(tmp_path: Path) -> None:
    body = _good()
    body["training"][0]["features"] = {"age": "old", "smoker": "yes", "sex": "F", "bmi": 31}
    body["validation"][0]["features"]["sex"] = "female"
    body["test"].append({"image": "v9.nii.gz", "label": 7, "features": {"age": -4}})  # a label problem too
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    text = "\n".join(report.problems)
    assert len(report.problems) == 6, text
    for section_entry, feature in [
        ("training[0]", "'bmi'"),
        ("training[0]", "'age'"),
        ("training[0]", "'smoker'"),
        ("validation[0]", "'sex'"),
        ("test[1]", "'age'"),
    ]:
        assert any(p.startswith(section_entry) and feature in p for p in report.problems), (section_entry, feature)
    assert any(p.startswith("test[1]") and "label 7" in p for p in report.problems)


def test_check_feature_missing_in_every_entry_of_a_split(tmp_path: Path) -> None:
    body = _good()
    body["validation"] = [_entry(3, {"age": None, "smoker": 1, "sex": "M"}), _entry(5, {"smoker": 0})]
    body["test"] = [_entry(4, None)]  # no features at all: every feature missing
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    text = "\n".join(report.problems)
    assert len(report.problems) == 4, text
    assert any(p.startswith("validation: feature 'age' is missing") and "every entry" in p for p in report.problems)
    assert not any(p.startswith(("validation: feature 'smoker'", "validation: feature 'sex'")) for p in report.problems)
    assert sum(p.startswith("test: feature ") for p in report.problems) == 3
    assert not any(p.startswith("training") for p in report.problems)
    assert report.counts["validation"]["features_missing"] == {"age": 1.0, "smoker": 0.0, "sex": 0.5}
    assert report.counts["test"]["features_missing"] == {"age": 1.0, "smoker": 1.0, "sex": 1.0}


def test_check_empty_section_is_not_a_missing_feature(tmp_path: Path) -> None:
    report = check_datalist(_datalist(tmp_path, _good(test=[])), load_images=False)
    assert report.ok, report.format()
    assert report.counts["test"]["features_missing"] == {}
    age_row = next(line for line in report.format().splitlines() if line.startswith("age "))
    assert age_row.split()[-2:] == ["-", "0%"]  # test: no entries; total


def test_check_malformed_declaration_lists_each_and_checks_the_rest(tmp_path: Path) -> None:
    decl = {
        "age": {"type": "numeric"},
        "sex": {"type": "categorical"},  # no values
        "bmi": {"type": "float"},  # unknown type
        "smoker": {"type": "binary"},
    }
    body = _good(features=decl)
    body["training"][0]["features"] |= {"bmi": 31}  # its declaration is the problem, not the entry
    body["training"][1]["features"]["smoker"] = 5
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    text = "\n".join(report.problems)
    assert len(report.problems) == 3, text
    assert any("features: feature 'sex'" in p and "categorical needs 'values'" in p for p in report.problems)
    assert any("features: feature 'bmi'" in p and "type must be one of" in p for p in report.problems)
    assert any(p.startswith("training[1]") and "'smoker'" in p for p in report.problems)
    assert list(report.features) == ["age", "smoker"]


@pytest.mark.parametrize("decl", [{}, [], "age"])
def test_check_declaration_that_is_no_object(tmp_path: Path, decl: Any) -> None:
    report = check_datalist(_datalist(tmp_path, _good(features=decl)), load_images=False)
    assert len(report.problems) == 1 and "declares at least one feature" in report.problems[0]
    assert str(tmp_path / "dl.json") in report.problems[0]


def test_check_entry_features_without_declaration(tmp_path: Path) -> None:
    body = _good()
    del body["features"]
    body["training"][1]["features"] = None  # null: nothing to declare
    report = check_datalist(_datalist(tmp_path, body), load_images=False)
    assert len(report.problems) == 4, report.problems
    for where in ("training[0] v0.nii.gz", "training[2] v2.nii.gz", "validation[0] v3.nii.gz", "test[0] v4.nii.gz"):
        assert any(p.startswith(where) and "declares none" in p for p in report.problems), where


def test_load_datalist_keeps_features(tmp_path: Path) -> None:
    body = _good()
    body["training"][1]["features"] = {"age": None, "sex": "M"}
    path = _datalist(tmp_path, body)
    entries = load_datalist(path, "training")
    assert [e.get("features") for e in entries] == [e["features"] for e in body["training"]]


# --------------------------------------------------------------------------------------------- from CSV


def _csv(tmp_path: Path, columns: dict[str, list[str]], n: int = 10) -> Path:
    """A CSV with image/label/patient and the given extra columns (each a list of ``n`` cells)."""
    header = ["image", "label", "patient", *columns]
    lines = [",".join(header)]
    for i in range(n):
        (tmp_path / f"v{i}.nii.gz").write_bytes(b"")
        lines.append(",".join([f"v{i}.nii.gz", str(i % 2), f"p{i}", *(cells[i] for cells in columns.values())]))
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _by_image(out: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(out.read_text())
    return {e["image"]: e for s in SECTIONS for e in data[s]}


AGES = ["63", "", "41.5", "70", "58", "66", "39", "", "80", "52"]
SEXES = ["F", "M", "M", "", "F", "M", "F", "F", "M", "F"]
SMOKERS = ["yes", "No", "1", "0", "TRUE", "false", "", "1", "0", "1"]
GRADES = ["2", "1", "3", "2", "10", "1", "", "3", "2", "1"]


def test_from_csv_infers_each_type(tmp_path: Path) -> None:
    cols = {"age": AGES, "sex": SEXES, "smoker": SMOKERS, "grade": GRADES, "flag": ["0", "1"] * 5}
    out = tmp_path / "dl.json"
    summary = from_csv(_csv(tmp_path, cols), out, features="age,sex,smoker,grade,flag", seed=1)
    want_decl = {
        "age": {"type": "numeric"},
        "sex": {"type": "categorical", "values": ["F", "M"]},
        "smoker": {"type": "binary"},
        "grade": {"type": "numeric"},
        "flag": {"type": "binary"},
    }
    assert summary["features"] == want_decl
    assert json.loads(out.read_text())["features"] == want_decl
    entries = _by_image(out)
    assert len(entries) == 10
    for i in range(10):
        f = entries[f"v{i}.nii.gz"]["features"]
        assert set(f) == set(cols)
        assert f["age"] == (float(AGES[i]) if AGES[i] else None)
        assert f["sex"] == (SEXES[i] or None)
        assert f["smoker"] == ({"yes": 1, "true": 1, "1": 1, "no": 0, "false": 0, "0": 0}.get(SMOKERS[i].lower()))
        assert f["grade"] == (float(GRADES[i]) if GRADES[i] else None)
        assert f["flag"] == i % 2


def test_from_csv_categorical_values_are_sorted_distinct(tmp_path: Path) -> None:
    cols = {"site": ["upper", "lower", "middle", "upper", "", "lower", "upper", "x1", "middle", "lower"]}
    out = tmp_path / "dl.json"
    assert from_csv(_csv(tmp_path, cols), out, features=["site"])["features"] == {
        "site": {"type": "categorical", "values": ["lower", "middle", "upper", "x1"]}
    }
    assert _by_image(out)["v4.nii.gz"]["features"] == {"site": None}


def test_from_csv_explicit_types(tmp_path: Path) -> None:
    cols = {"grade": GRADES, "count": ["0", "1"] * 5, "smoker": SMOKERS}
    out = tmp_path / "dl.json"
    summary = from_csv(_csv(tmp_path, cols), out, features="grade:categorical, count:numeric,smoker:binary")
    assert summary["features"] == {
        "grade": {"type": "categorical", "values": ["1", "10", "2", "3"]},
        "count": {"type": "numeric"},
        "smoker": {"type": "binary"},
    }
    entries = _by_image(out)
    assert entries["v4.nii.gz"]["features"]["grade"] == "10" and entries["v6.nii.gz"]["features"]["grade"] is None
    assert entries["v1.nii.gz"]["features"]["count"] == 1.0 and isinstance(
        entries["v1.nii.gz"]["features"]["count"], float
    )
    # a cell that is not of the type given is an error naming the line and the feature
    with pytest.raises(DatalistError) as err:
        from_csv(_csv(tmp_path, {"smoker": SMOKERS, "age": AGES}), out, features="smoker:numeric,age:binary")
    msg = str(err.value)
    assert "line 2: feature 'smoker': 'yes' is not a number" in msg
    assert "line 2: feature 'age': '63' is not binary" in msg


def test_from_csv_refuses_nan(tmp_path: Path) -> None:
    ages = list(AGES)
    ages[2], ages[5] = "NaN", "nan"
    sexes = list(SEXES)
    sexes[5] = "NAN"
    out = tmp_path / "dl.json"
    csv_path = _csv(tmp_path, {"age": ages, "sex": sexes})
    with pytest.raises(DatalistError) as err:
        from_csv(csv_path, out, features="age,sex")
    msg = str(err.value)
    assert str(csv_path) in msg and "2 bad row(s)" in msg
    assert "line 4: feature 'age': 'NaN' is not a value" in msg
    assert "line 7: feature 'age': 'nan' is not a value" in msg and "feature 'sex': 'NAN' is not a value" in msg
    assert not out.exists()


def test_from_csv_refuses_out_of_range_and_infinite(tmp_path: Path) -> None:
    ages = list(AGES)
    ages[3] = "inf"
    out = tmp_path / "dl.json"
    with pytest.raises(DatalistError, match="line 5: feature 'age': inf is not a finite number"):
        from_csv(_csv(tmp_path, {"age": ages}), out, features="age")
    assert not out.exists()


def test_from_csv_refuses_missing_column(tmp_path: Path) -> None:
    out = tmp_path / "dl.json"
    with pytest.raises(DatalistError, match=r"feature column\(s\) \['weight'\] not in the CSV"):
        from_csv(_csv(tmp_path, {"age": AGES}), out, features="age,weight")
    assert not out.exists()


@pytest.mark.parametrize(
    ("cells", "features", "message"),
    [
        ([""] * 10, "age", "feature column 'age' is empty in every row"),
        (["M"] * 9 + [""], "sex", "feature column 'sex': a categorical needs 2+ distinct values, got ['M']"),
        (["1", "2"] * 5, "sex:categorical,", "no feature column given|are 'name' or 'name:type'"),
    ],
)
def test_from_csv_undeclarable_column(tmp_path: Path, cells: list[str], features: str, message: str) -> None:
    csv_path = _csv(tmp_path, {features.split(":")[0].split(",")[0]: cells})
    with pytest.raises((DatalistError, ValueError)) as err:
        from_csv(csv_path, tmp_path / "dl.json", features=features)
    assert any(m in str(err.value) for m in message.split("|")), str(err.value)


def test_from_csv_empty_column_with_explicit_type_is_all_missing(tmp_path: Path) -> None:
    out = tmp_path / "dl.json"
    from_csv(_csv(tmp_path, {"age": AGES, "bmi": [""] * 10}), out, features="age,bmi:numeric")
    assert all(e["features"]["bmi"] is None for e in _by_image(out).values())
    report = check_datalist(out, load_images=False)
    assert sum("feature 'bmi' is missing" in p for p in report.problems) == 3  # in every split


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ("age:float", "type must be one of"),
        ("age,age:numeric", "named twice"),
        ("label", "cannot also be a feature"),
        ("center_x", "cannot also be a feature"),
        ("age,,sex", "are 'name' or 'name:type'"),
        ([], "no feature column given"),
    ],
)
def test_parse_feature_columns_errors(features: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_feature_columns(features)


def test_parse_feature_columns() -> None:
    assert parse_feature_columns(" age , sex:categorical,smoker: binary") == {
        "age": None,
        "sex": "categorical",
        "smoker": "binary",
    }
    assert parse_feature_columns(["b", "a:numeric"]) == {"b": None, "a": "numeric"}


def test_from_csv_round_trip_check_and_attach(tmp_path: Path) -> None:
    cols = {"age": AGES, "sex": SEXES, "smoker": SMOKERS}
    out = tmp_path / "dl.json"
    from_csv(_csv(tmp_path, cols), out, features="age,sex,smoker", seed=2)
    report = check_datalist(out, load_images=False)
    assert report.ok, report.format()
    assert report.counts["total"]["features_missing"] == {"age": 0.2, "sex": 0.1, "smoker": 0.1}
    spec = read_feature_spec(out)
    assert spec is not None and spec == parse_feature_spec(json.loads(out.read_text())["features"])
    assert sorted(spec.columns) == ["age", "sex=F", "sex=M", "smoker"]
    encoded = {}
    for s in SECTIONS:
        entries = load_datalist(out, s)
        for e in attach_features(entries, spec, s):
            encoded[Path(e["image"]).name] = dict(zip(spec.columns, e["features"].tolist(), strict=True))
    assert len(encoded) == 10
    assert encoded["v0.nii.gz"] == {"age": 63.0, "sex=F": 1.0, "sex=M": 0.0, "smoker": 1.0}
    v3 = encoded["v3.nii.gz"]
    assert v3["age"] == 70.0 and np.isnan(v3["sex=F"]) and np.isnan(v3["sex=M"]) and v3["smoker"] == 0.0
    assert np.isnan(encoded["v1.nii.gz"]["age"]) and np.isnan(encoded["v6.nii.gz"]["smoker"])


def test_from_csv_without_features_writes_none(tmp_path: Path) -> None:
    out = tmp_path / "dl.json"
    summary = from_csv(_csv(tmp_path, {"age": AGES}), out)
    assert "features" not in summary and "features" not in json.loads(out.read_text())
    assert all("features" not in e for e in _by_image(out).values())


def test_cli_from_csv_features_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = _csv(tmp_path, {"age": AGES, "sex": SEXES, "smoker": SMOKERS})
    out = tmp_path / "dl.json"
    argv = ["datalist", "from-csv", str(csv_path), "--out", str(out)]
    assert main([*argv, "--features", "age,sex:categorical,smoker"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["features"]["smoker"] == {"type": "binary"}
    assert json.loads(out.read_text())["features"] == summary["features"]
    assert main(["datalist", "check", str(out), "--no-load"]) == 0
    assert "feature (missing %)" in capsys.readouterr().out
    assert main([*argv, "--features", "age:float"]) == 2
    assert main([*argv, "--features", "label"]) == 2
    assert main([*argv, "--features", "age,weight"]) == 1
    # a feature problem makes check fail
    data = json.loads(out.read_text())
    first = next(s for s in SECTIONS if data[s])
    data[first][0]["features"]["age"] = "sixty"
    out.write_text(json.dumps(data))
    assert main(["datalist", "check", str(out), "--no-load"]) == 1
    assert f"{first}[0]" in capsys.readouterr().out
