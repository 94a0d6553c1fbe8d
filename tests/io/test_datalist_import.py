"""Datalist importers (LUNA16, plain CSV) and the whole-datalist checker."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_affine
from volcnn.data import synthesize_cohort
from volcnn.io import DatalistError, load_datalist, write_nifti
from volcnn.io.datalist_check import check_datalist
from volcnn.io.datalist_import import from_csv, from_luna16
from volcnn.io.datalist_split import SECTIONS, split_patients


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=5, seed=0, size="tiny")
    return out


def _triples(datalist: dict) -> list[tuple[str, int, tuple[float, ...]]]:
    return sorted((e["image"], e["label"], tuple(e["center"])) for s in SECTIONS for e in datalist[s])


def _sections_of_patients(datalist: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in SECTIONS:
        for e in datalist[s]:
            out.setdefault(e["patient"], set()).add(s)
    return out


# --------------------------------------------------------------------------------------------- LUNA16


def test_from_luna16_reproduces_synthetic_datalist(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "dl.json"
    summary = from_luna16(
        cohort / "candidates.csv",
        cohort / "images",
        out,
        annotations_csv=cohort / "annotations.csv",
        dataset_dir=cohort,
        seed=3,
    )
    got = json.loads(out.read_text())
    want = json.loads((cohort / "datalist.json").read_text())
    assert got["labels"] == {"0": "non-nodule", "1": "nodule"}
    assert set(SECTIONS) <= set(got) and got["name"] and got["description"]
    g, w = _triples(got), _triples(want)
    assert len(g) == len(w) == summary["entries"] == summary["rows"]
    for (gi, gl, gc), (wi, wl, wc) in zip(g, w, strict=True):
        assert (gi, gl) == (wi, wl)
        np.testing.assert_allclose(gc, wc, atol=1e-3)
    # every entry names its case and patient (= seriesuid); positives matched to an annotation carry a diameter
    entries = [e for s in SECTIONS for e in got[s]]
    assert all(e["case"] == e["patient"] == Path(e["image"]).name.split(".")[0] for e in entries)
    positives = [e for e in entries if e["label"] == 1]
    assert positives and all(e.get("diameter_mm", 0) > 0 for e in positives)
    assert all("diameter_mm" not in e for e in entries if e["label"] == 0)
    assert summary["with_diameter"] == len(positives)
    # loads through the project's loader relative to dataset_dir
    assert all(Path(e["image"]).is_file() for e in load_datalist(out, "training", dataset_dir=cohort))
    # the sum of per-split counts is the whole
    assert sum(summary["splits"][s]["entries"] for s in SECTIONS) == len(entries)
    assert summary["problems"] == []


def test_from_luna16_default_paths_are_relative_to_image_dir_and_subfolders_found(cohort: Path, tmp_path: Path) -> None:
    images = tmp_path / "luna"
    (images / "subset0").mkdir(parents=True)
    (images / "subset1").mkdir()
    for i, f in enumerate(sorted((cohort / "images").iterdir())):
        shutil.copy(f, images / f"subset{i % 2}" / f.name)
    out = tmp_path / "dl.json"
    from_luna16(cohort / "candidates.csv", images, out)
    got = json.loads(out.read_text())
    imgs = {e["image"] for s in SECTIONS for e in got[s]}
    assert imgs == {f"subset{i % 2}/case_{i:03d}.nii.gz" for i in range(5)}
    assert check_datalist(out, images).ok


def test_from_luna16_splits_patient_disjoint_deterministic_stratified(cohort: Path, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    from_luna16(cohort / "candidates.csv", cohort / "images", a, seed=7)
    from_luna16(cohort / "candidates.csv", cohort / "images", b, seed=7)
    assert a.read_bytes() == b.read_bytes()
    got = json.loads(a.read_text())
    assert all(len(secs) == 1 for secs in _sections_of_patients(got).values())
    assert all(got[s] for s in SECTIONS)  # 5 patients -> every split non-empty
    # another seed gives another (still valid) assignment for some seed
    assignments = set()
    for seed in range(6):
        from_luna16(cohort / "candidates.csv", cohort / "images", c, seed=seed)
        d = json.loads(c.read_text())
        assert all(d[s] for s in SECTIONS)
        assignments.add(tuple(sorted((p, min(s)) for p, s in _sections_of_patients(d).items())))
    assert len(assignments) > 1


def test_split_patients_rules() -> None:
    strata = {f"p{i:02d}": int(i < 6) for i in range(20)}
    split = split_patients(strata, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert split == split_patients(dict(reversed(list(strata.items()))), val_fraction=0.2, test_fraction=0.2, seed=1)
    assert sorted(split) == sorted(strata)
    for s in SECTIONS:
        assert any(strata[p] for p, v in split.items() if v == s), f"{s} has no positive patient"
    assert sum(v == "training" for v in split.values()) == 12
    three = split_patients({"a": 0, "b": 0, "c": 1}, seed=0)
    assert sorted(three.values()) == sorted(SECTIONS)
    assert set(split_patients({"a": 1, "b": 0}, seed=0).values()) <= {"training", "validation", "test"}
    assert split_patients({"only": 1}, seed=0) == {"only": "training"}
    with pytest.raises(ValueError, match="val_fraction"):
        split_patients(strata, val_fraction=0.6, test_fraction=0.5)


def test_from_luna16_missing_image_reported(cohort: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(cohort / "images", images)
    (images / "case_002.nii.gz").unlink()
    out = tmp_path / "dl.json"
    with pytest.raises(DatalistError, match="case_002") as err:
        from_luna16(cohort / "candidates.csv", images, out)
    assert "1 series" in str(err.value) and "candidates.csv" in str(err.value)
    assert not out.exists()
    summary = from_luna16(cohort / "candidates.csv", images, out, skip_missing=True)
    assert len(summary["problems"]) == 1 and "case_002" in summary["problems"][0]
    n_missing = sum(1 for line in (cohort / "candidates.csv").read_text().splitlines() if line.startswith("case_002"))
    assert summary["skipped_rows"] == n_missing > 0
    got = json.loads(out.read_text())
    assert all(e["case"] != "case_002" for s in SECTIONS for e in got[s])


def test_from_luna16_bad_rows_and_patient_column(cohort: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "cand.csv"
    csv_path.write_text(
        "seriesuid,coordX,coordY,coordZ,class\n"
        "case_000,1.0,2.0,3.0,1\n"
        "case_000,1.0,abc,3.0,0\n"
        "case_001,1.0,2.0,3.0,yes\n"
    )
    with pytest.raises(DatalistError) as err:
        from_luna16(csv_path, cohort / "images", tmp_path / "dl.json")
    msg = str(err.value)
    assert "cand.csv" in msg and "line 3" in msg and "coordY" in msg and "line 4" in msg and "class" in msg
    csv_path.write_text("seriesuid,coordX,coordY,coordZ,class,patient\ncase_000,1,-2,3,1,P1\ncase_001,0,0,0,0,P1\n")
    from_luna16(csv_path, cohort / "images", tmp_path / "dl.json")
    got = json.loads((tmp_path / "dl.json").read_text())
    entries = got["training"]
    assert len(entries) == 2 and {e["patient"] for e in entries} == {"P1"}
    assert entries[0]["center"] == [-1.0, 2.0, 3.0]
    with pytest.raises(DatalistError, match="missing column"):
        csv_path.write_text("seriesuid,x,y,z,class\n")
        from_luna16(csv_path, cohort / "images", tmp_path / "dl.json")


def test_from_luna16_dicom_folder_and_suffix_preference(cohort: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    (images / "sub" / "1.2.3").mkdir(parents=True)
    (images / "sub" / "1.2.3" / "IM0001.dcm").write_bytes(b"")
    shutil.copy(cohort / "images" / "case_000.nii.gz", images / "case_000.nii.gz")
    (images / "case_000.mhd").write_text("")  # .mhd comes first in image_suffixes
    (images / "case_001.nii.gz").symlink_to(cohort / "images" / "case_001.nii.gz")  # stays relative
    csv_path = tmp_path / "cand.csv"
    csv_path.write_text("seriesuid,coordX,coordY,coordZ,class\n1.2.3,0,0,0,1\ncase_000,0,0,0,0\ncase_001,0,0,0,0\n")
    from_luna16(csv_path, images, tmp_path / "dl.json")
    got = json.loads((tmp_path / "dl.json").read_text())
    assert sorted(e["image"] for s in SECTIONS for e in got[s]) == ["case_000.mhd", "case_001.nii.gz", "sub/1.2.3"]
    (images / "other").mkdir()
    shutil.copy(cohort / "images" / "case_000.nii.gz", images / "other" / "case_000.nii.gz")
    with pytest.raises(DatalistError, match="ambiguous"):
        from_luna16(csv_path, images, tmp_path / "dl.json")


# --------------------------------------------------------------------------------------------- plain CSV


def _touch_images(root: Path, names: list[str]) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def test_from_csv_happy_path(tmp_path: Path) -> None:
    names = [f"vols/v{i}.nii.gz" for i in range(8)]
    _touch_images(tmp_path, names)
    rows = ["image,label,patient,center_x,center_y,center_z"]
    for i, n in enumerate(names):
        centre = "1.5,-2,3" if i % 2 else ",,"
        rows.append(f"{n},{int(i < 3)},pat{i // 2},{centre}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "dl.json"
    summary = from_csv(tmp_path / "list.csv", out, labels=["benign", "malignant"], seed=0)
    got = json.loads(out.read_text())
    assert got["labels"] == {"0": "benign", "1": "malignant"}
    entries = [e for s in SECTIONS for e in got[s]]
    assert sorted(e["image"] for e in entries) == names
    assert all(len(secs) == 1 for secs in _sections_of_patients(got).values())
    assert all(got[s] for s in SECTIONS)
    assert all(e["center"] == [1.5, -2.0, 3.0] for e in entries if int(e["image"][6]) % 2)
    assert all("center" not in e for e in entries if not int(e["image"][6]) % 2)
    assert summary["entries"] == 8 and summary["problems"] == []
    # default labels and patients
    (tmp_path / "plain.csv").write_text("image,label\n" + "".join(f"{n},{i % 3}\n" for i, n in enumerate(names)))
    from_csv(tmp_path / "plain.csv", out)
    got = json.loads(out.read_text())
    assert got["labels"] == {"0": "0", "1": "1", "2": "2"}
    assert all(e["patient"] == e["image"] for s in SECTIONS for e in got[s])
    assert check_datalist(out, load_images=False).ok


def test_from_csv_bad_rows_name_csv_and_line(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["a.nii.gz"])
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(
        "image,label,center_x,center_y,center_z\na.nii.gz,1,,,\na.nii.gz,one,,,\n,0,,,\na.nii.gz,0,1,,\n"
    )
    with pytest.raises(DatalistError) as err:
        from_csv(csv_path, tmp_path / "dl.json")
    msg = str(err.value)
    assert str(csv_path) in msg and "3 bad row(s)" in msg
    assert "line 3: label 'one' is not an integer" in msg
    assert "line 4: empty image" in msg
    assert "line 5: partial centre" in msg
    assert "line 2" not in msg
    csv_path.write_text("image,label\na.nii.gz,2\n")
    with pytest.raises(DatalistError, match="line 2: label 2 is not among the declared"):
        from_csv(csv_path, tmp_path / "dl.json", labels={0: "no", 1: "yes"})
    csv_path.write_text("image,label\na.nii.gz,1\nmissing.nii.gz,0\n")
    with pytest.raises(DatalistError, match="line 3: image missing.nii.gz not found"):
        from_csv(csv_path, tmp_path / "dl.json")
    assert not (tmp_path / "dl.json").exists()


# --------------------------------------------------------------------------------------------- check


def test_check_datalist_good(cohort: Path) -> None:
    report = check_datalist(cohort / "datalist.json")
    assert report.ok, report.format()
    want = json.loads((cohort / "datalist.json").read_text())
    for s in SECTIONS:
        assert report.counts[s]["entries"] == len(want[s])
        for lab in ("0", "1"):
            assert report.counts[s]["labels"][lab] == sum(e["label"] == int(lab) for e in want[s])
    assert report.counts["total"]["images"] == report.images_loaded == 5
    text = report.format()
    assert "0:non-nodule" in text and "1:nodule" in text and "OK" in text and "training" in text


def test_check_datalist_lists_every_problem(cohort: Path, tmp_path: Path) -> None:
    affine = make_affine(spacing=(2.0, 2.0, 2.0), origin=(-10.0, -10.0, -10.0))
    write_nifti(tmp_path / "good.nii.gz", np.full((10, 10, 10), -1000, dtype=np.int16), affine)
    (tmp_path / "corrupt.nii.gz").write_bytes((cohort / "images" / "case_000.nii.gz").read_bytes()[:300])
    datalist = {
        "name": "bad",
        "labels": {"0": "no", "1": "yes"},
        "training": [
            {"image": "good.nii.gz", "label": 0, "center": [0.0, 0.0, 0.0], "patient": "A"},
            {"image": "good.nii.gz", "label": 7, "center": [0.0, 0.0, 0.0], "patient": "A"},  # unknown label
            {"image": "good.nii.gz", "label": 1, "center": [0.0, 0.0, 50.0], "patient": "A"},  # outside
            {"image": "missing.nii.gz", "label": 1, "patient": "B"},  # missing
            {"image": "missing.nii.gz", "label": 0, "patient": "B"},  # same missing image: listed once
        ],
        "validation": [
            {"image": "corrupt.nii.gz", "label": 1, "patient": "C"},  # corrupt
            {"image": "good.nii.gz", "label": 0, "center": [8.0, 8.0, 8.0], "patient": "A"},  # leak of A
        ],
        "test": [{"image": "good.nii.gz", "label": "1", "patient": "D"}],  # string label
    }
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(datalist))
    report = check_datalist(path)
    assert not report.ok
    text = "\n".join(report.problems)
    assert len(report.problems) == 6, text
    assert any("training[1]" in p and "label 7" in p for p in report.problems)
    assert any("training[2]" in p and "outside the volume" in p for p in report.problems)
    assert any("training[3]" in p and "missing.nii.gz" in p and "not found" in p for p in report.problems)
    assert any("validation[0]" in p and "corrupt.nii.gz" in p and "cannot load" in p for p in report.problems)
    assert any("patient A" in p and "training" in p and "validation" in p for p in report.problems)
    assert any("test[0]" in p and "not an integer" in p for p in report.problems)
    assert report.images_loaded == 1  # good.nii.gz loaded once for its 5 entries; corrupt failed
    assert report.counts["training"]["labels"] == {"0": 2, "1": 2, "7": 1}
    assert report.counts["total"]["entries"] == 8
    formatted = report.format()
    assert "6 problem(s)" in formatted and "7:?" in formatted
    # without loading, only existence (and the non-image checks) are reported
    quick = check_datalist(path, load_images=False)
    assert len(quick.problems) == 4 and quick.images_loaded == 0


def test_check_datalist_unreadable_json(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatalistError, match="x.json"):
        check_datalist(tmp_path / "x.json")
