"""Tests for volcnn.io.ingest: batch conversion with manifest, failures, re-run skipping, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import make_affine
from volcnn.core.atomic import atomic_path
from volcnn.data import synthesize_cohort
from volcnn.io import ingest as ingest_mod
from volcnn.io import load_volume
from volcnn.io.ingest import IngestError, ingest
from volcnn.io.sources import has_dicom_preamble

FIELDS = {
    "output",
    "source",
    "sha256",
    "source_sha256",
    "shape",
    "spacing",
    "orientation",
    "n_slices",
    "dtype",
    "kind",
    "checks_passed",
    "warnings",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(root, cases=2, seed=0, size="tiny", dicom=True)
    return root


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture
def mixed(tmp_path: Path, cohort: Path) -> Path:
    """A folder mixing good and bad inputs of every kind."""
    src = tmp_path / "src"
    (src / "good").mkdir(parents=True)
    shutil.copy(cohort / "images" / "case_000.nii.gz", src / "good" / "case_000.nii.gz")
    shutil.copytree(cohort / "dicom" / "case_000", src / "dicom" / "case_000")
    gap = shutil.copytree(cohort / "dicom" / "case_001", src / "dicom" / "case_001_gap")
    slices = sorted(gap.iterdir())
    slices[len(slices) // 2].unlink()
    data = (cohort / "images" / "case_001.nii.gz").read_bytes()
    (src / "bad").mkdir()
    (src / "bad" / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    nan = np.zeros((6, 7, 8), np.float32)
    nan[1, 2, 3] = np.nan
    _save(src / "bad" / "nan.nii.gz", nan, make_affine())
    frac = (np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8) - 100.0) / 4.0
    _save(src / "frac" / "frac value.nii.gz", frac, make_affine((0.5, 0.5, 2.0), (-1, -1, 1), (10.0, 20.0, -30.0)))
    (src / "junk").mkdir()
    (src / "junk" / "IM0001.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    (src / "junk" / "notes.txt").write_text("not an image\n")
    return src


def _by_source(manifest: list[dict], suffix: str) -> dict:
    hits = [e for e in manifest if e["source"].endswith(suffix)]
    assert len(hits) == 1, (suffix, [e["source"] for e in manifest])
    return hits[0]


def test_is_dicom_file_uses_the_magic(cohort, tmp_path):
    first = sorted((cohort / "dicom" / "case_000").iterdir())[0]
    assert has_dicom_preamble(first)
    renamed = tmp_path / "noext"
    shutil.copy(first, renamed)
    assert has_dicom_preamble(renamed)
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICX" + b"\0" * 100)
    assert not has_dicom_preamble(tmp_path / "fake.dcm")


def test_mixed_folder(mixed, tmp_path):
    out = tmp_path / "out"
    result = ingest([mixed, tmp_path / "missing.nii.gz"], out)
    assert result.exit_code == 1
    assert len(result.converted) == 3 and not result.skipped

    manifest = json.loads((out / "manifest.json").read_text())
    failures = json.loads((out / "failures.json").read_text())
    assert len(manifest) == 3
    for entry in manifest:
        assert set(entry) >= FIELDS
        assert (out / entry["output"]).is_file() and entry["output"].endswith(".nii.gz")
        assert set(entry["output"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    assert len({e["output"] for e in manifest}) == 3  # case_000 twice (NIfTI and DICOM) made unique

    # the good ones: same values and geometry as the source, int16 for integral HU, float32 otherwise
    for suffix, dtype, kind in [
        ("good/case_000.nii.gz", np.int16, "nifti"),
        ("dicom/case_000", np.int16, "dicom"),
        ("frac/frac value.nii.gz", np.float32, "nifti"),
    ]:
        entry = _by_source(manifest, suffix)
        assert entry["kind"] == kind and entry["dtype"] == np.dtype(dtype).name
        written = nib.load(str(out / entry["output"]))
        assert written.get_data_dtype() == dtype
        assert int(written.header["sform_code"]) == 1 and int(written.header["qform_code"]) == 1
        src_vol, out_vol = load_volume(entry["source"]), load_volume(out / entry["output"])
        np.testing.assert_array_equal(out_vol.array, src_vol.array)
        np.testing.assert_allclose(out_vol.affine, src_vol.affine, atol=1e-5)
        assert entry["shape"] == list(src_vol.array.shape) and entry["n_slices"] == src_vol.array.shape[2]
        np.testing.assert_allclose(entry["spacing"], src_vol.spacing, atol=1e-4)
        assert entry["orientation"] == list(nib.aff2axcodes(src_vol.affine))
        assert {"read to end", "finite", "3D", "affine non-degenerate"} <= set(entry["checks_passed"])
    dicom = _by_source(manifest, "dicom/case_000")
    assert "uniform slice spacing" in dicom["checks_passed"]
    assert len(dicom["series_uid_hash"]) == 12 and int(dicom["series_uid_hash"], 16) >= 0
    assert "series_uid_hash" not in _by_source(manifest, "good/case_000.nii.gz")

    # the bad ones, each with a message naming its file
    errors = {Path(f["source"]).name: f["error"] for f in failures}
    assert set(errors) == {"truncated.nii.gz", "nan.nii.gz", "case_001_gap", "IM0001.dcm", "missing.nii.gz"}
    for f in failures:
        assert f["error"].startswith(f["source"])
    assert "NaN" in errors["nan.nii.gz"]
    assert "missing slice" in errors["case_001_gap"]
    assert "DICM" in errors["IM0001.dcm"]
    assert "does not exist" in errors["missing.nii.gz"]
    assert result.failures == failures

    # no patient identifiers anywhere in the outputs' metadata
    text = (out / "manifest.json").read_text() + (out / "failures.json").read_text()
    for needle in ("SYNTH", "Phantom", "PatientName", "PatientID"):
        assert needle.lower() not in text.lower()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_rerun_skips_everything_done(mixed, tmp_path, caplog):
    out = tmp_path / "out"
    first = ingest([mixed], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    manifest_before = json.loads((out / "manifest.json").read_text())
    caplog.set_level("INFO", logger="volcnn.io.ingest")
    second = ingest([mixed], out, progress=True)
    assert not second.converted and len(second.skipped) == len(first.converted) == 3
    assert second.exit_code == 1 and len(second.failures) == len(first.failures)  # bad inputs still bad
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before
    assert json.loads((out / "manifest.json").read_text()) == manifest_before
    assert sum(r.getMessage().startswith("skipped ") for r in caplog.records) == 3

    # a changed source is converted again, in place; a damaged output is rewritten
    frac = next(mixed.rglob("frac value.nii.gz"))
    _save(frac, np.full((4, 5, 6), 2.5, np.float32), make_affine())
    damaged = _by_source(manifest_before, "good/case_000.nii.gz")["output"]
    (out / damaged).write_bytes(b"garbage")
    third = ingest([mixed], out)
    assert sorted(Path(e["source"]).name for e in third.converted) == ["case_000.nii.gz", "frac value.nii.gz"]
    assert len(third.skipped) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == 3
    assert _by_source(manifest, "frac value.nii.gz")["shape"] == [4, 5, 6]
    np.testing.assert_array_equal(
        load_volume(out / damaged).array, load_volume(mixed / "good" / "case_000.nii.gz").array
    )


def test_all_good_exit_zero_and_single_file_source(cohort, tmp_path):
    out = tmp_path / "out"
    result = ingest([cohort / "images" / "case_001.nii.gz", cohort / "dicom" / "case_001"], out)
    assert result.exit_code == 0 and len(result.converted) == 2
    assert json.loads((out / "failures.json").read_text()) == []
    names = sorted(e["output"] for e in result.converted)
    assert names == ["case_001.nii.gz", "case_001_2.nii.gz"]


def test_folder_with_two_series_gives_two_outputs(cohort, tmp_path):
    both = tmp_path / "src" / "scan"
    shutil.copytree(cohort / "dicom" / "case_000", both)
    for f in sorted((cohort / "dicom" / "case_001").iterdir()):
        shutil.copy(f, both / f"B_{f.name}")
    out = tmp_path / "out"
    result = ingest([tmp_path / "src"], out)
    assert result.exit_code == 0, result.failures
    assert len(result.converted) == 2
    hashes = {e["series_uid_hash"] for e in result.converted}
    assert len(hashes) == 2
    assert sorted(e["output"] for e in result.converted) == sorted(f"scan_{h[:8]}.nii.gz" for h in hashes)
    for entry in result.converted:
        assert entry["source"] == str(both) and entry["kind"] == "dicom"
    arrays = sorted((load_volume(out / e["output"]).array for e in result.converted), key=lambda a: float(a.sum()))
    expected = sorted(
        (load_volume(cohort / "dicom" / c).array for c in ("case_000", "case_001")), key=lambda a: float(a.sum())
    )
    for got, want in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    again = ingest([tmp_path / "src"], out)
    assert not again.converted and len(again.skipped) == 2


def test_junk_folder_alone_is_a_failure(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    result = ingest([tmp_path / "junk"], tmp_path / "out")
    assert result.exit_code == 1 and not result.converted
    assert "no NIfTI, MetaImage or DICOM files" in result.failures[0]["error"]


def test_output_inside_source_is_not_ingested(cohort, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(cohort / "images" / "case_000.nii.gz", src / "a.nii.gz")
    ingest([src], src / "out")
    result = ingest([src], src / "out")
    assert len(result.skipped) == 1 and not result.converted and not result.failures


def test_interrupted_write_leaves_no_partial_file(cohort, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(cohort / "images" / "case_000.nii.gz", src / "a.nii.gz")
    out = tmp_path / "out"
    ingest([src], out)
    manifest_before = (out / "manifest.json").read_bytes()
    shutil.copy(cohort / "images" / "case_001.nii.gz", src / "b.nii.gz")

    def killed(path, array, affine):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(ingest_mod, "write_nifti", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest([src], out)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "failures.json", "manifest.json"]
    assert (out / "manifest.json").read_bytes() == manifest_before

    def disk_full(path, array, affine):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest_mod, "write_nifti", disk_full)
    result = ingest([src], out)
    assert result.exit_code == 1 and len(result.skipped) == 1
    assert "b.nii.gz" in result.failures[0]["error"] and "No space left" in result.failures[0]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "failures.json", "manifest.json"]
    assert (out / "manifest.json").read_bytes() == manifest_before

    monkeypatch.undo()
    result = ingest([src], out)
    assert result.exit_code == 0 and len(result.converted) == 1 and len(result.skipped) == 1


def test_unreadable_manifest_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(IngestError, match="manifest"):
        ingest([tmp_path], out)


def test_metaimage_source_hash_covers_the_data_file(tmp_path):
    import SimpleITK as sitk

    arr = (np.arange(5 * 6 * 7, dtype=np.int16).reshape(7, 6, 5) - 500).astype(np.int16)  # (Z, Y, X)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    src = tmp_path / "src"
    src.mkdir()
    sitk.WriteImage(image, str(src / "scan.mhd"))
    assert (src / "scan.raw").is_file()
    out = tmp_path / "out"
    first = ingest([src], out)
    assert first.exit_code == 0 and len(first.converted) == 1
    entry = first.converted[0]
    assert entry["kind"] == "metaimage" and entry["dtype"] == "int16" and entry["output"] == "scan.nii.gz"
    np.testing.assert_allclose(entry["spacing"], [0.8, 0.8, 2.5])
    np.testing.assert_array_equal(load_volume(out / "scan.nii.gz").array, load_volume(src / "scan.mhd").array)
    np.testing.assert_allclose(load_volume(out / "scan.nii.gz").affine, load_volume(src / "scan.mhd").affine, atol=1e-5)
    # rewriting only the data file changes the source hash: converted again
    header = (src / "scan.mhd").read_bytes()
    (src / "scan.raw").write_bytes((arr + 1).astype("<i2").tobytes())
    assert (src / "scan.mhd").read_bytes() == header
    again = ingest([src], out)
    assert len(again.converted) == 1 and again.converted[0]["source_sha256"] != entry["source_sha256"]
    np.testing.assert_array_equal(load_volume(out / "scan.nii.gz").array, arr.transpose(2, 1, 0) + 1)


def test_dicom_through_ingest_keeps_world_coordinates_of_planted_nodules(tmp_path):
    """Synthetic DICOM series (several storage orientations) -> ingest -> NIfTI: every planted nodule centre
    (the generator's RAS mm) lands on nodule-bright voxels, and the ingested affine equals the generator's
    NIfTI affine within 0.5 mm over the whole field of view."""
    import csv

    import nibabel as nib

    from volcnn.data import synthesize_cohort
    from volcnn.io.ingest import ingest

    cohort = tmp_path / "cohort"
    synthesize_cohort(cohort, cases=4, seed=11, size="tiny", dicom=True)
    result = ingest([cohort / "dicom"], tmp_path / "out")
    assert result.exit_code == 0 and len(result.converted) == 4
    with open(cohort / "nodules.csv", newline="") as f:
        nodules = list(csv.DictReader(f))
    assert nodules
    for row in nodules:
        img = nib.load(tmp_path / "out" / f"{row['case']}.nii.gz")
        ref = nib.load(cohort / "images" / f"{row['case']}.nii.gz")
        corners = np.array(
            [[i, j, k, 1] for i in (0, ref.shape[0] - 1) for j in (0, ref.shape[1] - 1) for k in (0, ref.shape[2] - 1)]
        )
        world_ref = corners @ ref.affine.T
        ijk = np.rint((world_ref @ np.linalg.inv(img.affine).T)[:, :3]).astype(int)
        assert np.abs((ijk @ img.affine[:3, :3].T + img.affine[:3, 3]) - world_ref[:, :3]).max() < 0.5
        centre = np.array([float(row["x_ras"]), float(row["y_ras"]), float(row["z_ras"])])
        v = np.rint(np.linalg.inv(img.affine) @ np.append(centre, 1.0))[:3].astype(int)
        patch = np.asarray(img.dataobj)[v[0] - 1 : v[0] + 2, v[1] - 1 : v[1] + 2, v[2] - 1 : v[2] + 2]
        assert patch.max() > -500, (row["case"], row["texture"], patch.max())  # lung is about -850 HU
