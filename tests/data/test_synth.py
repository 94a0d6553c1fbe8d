"""Tests of the synthetic cohort generator (volcnn.data): determinism, geometry, values, CSVs, datalists, DICOM."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from volcnn.data import SIZES, synthesize_cohort, write_dicom_series

N_CASES = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort")
    summary = synthesize_cohort(out, cases=N_CASES, seed=0, size="tiny", dicom=True)
    return out, summary


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _load(out: Path, case: str) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Image]:
    img = nib.load(out / "images" / f"{case}.nii.gz")
    return np.asarray(img.dataobj), img.affine, img


def _voxel(affine: np.ndarray, ras: np.ndarray) -> np.ndarray:
    return np.rint(np.linalg.inv(affine) @ np.r_[ras, 1.0])[:3].astype(int)


def _canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    return apply_orientation(arr, ornt), affine @ inv_ornt_aff(ornt, arr.shape)


def _sitk_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a DICOM folder with SimpleITK; return the (i, j, k) array and its RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    aff = np.eye(4)
    aff[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    aff[:3, 3] = img.GetOrigin()
    return arr, np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # LPS -> RAS


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    a, b, c = (tmp_path / k for k in "abc")
    synthesize_cohort(a, cases=3, seed=5, size="tiny", dicom=True)
    synthesize_cohort(b, cases=3, seed=5, size="tiny", dicom=True)
    synthesize_cohort(c, cases=3, seed=6, size="tiny")
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert any(k.startswith("dicom/") for k in fa) and "images/case_000.nii.gz" in fa
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert not any(p.name.endswith(".tmp") for p in a.rglob("*"))
    gz = fa["images/case_000.nii.gz"]
    assert gz[:2] == b"\x1f\x8b" and gz[4:8] == b"\0\0\0\0"  # gzip mtime 0
    for name in ("images/case_000.nii.gz", "candidates.csv", "datalist.json"):
        assert fa[name] != fc[name], name


def test_nodule_centres_are_exact_in_world_coordinates(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    nodules = _rows(out / "nodules.csv")
    annotations = _rows(out / "annotations.csv")
    assert len(nodules) == len(annotations) > 0
    contrast = []
    for nod, ann in zip(nodules, annotations, strict=True):
        arr, affine, _ = _load(out, nod["case"])
        ras = np.array([float(nod["x_ras"]), float(nod["y_ras"]), float(nod["z_ras"])])
        lps = np.array([float(ann[k]) for k in ("coordX", "coordY", "coordZ")])
        assert ann["seriesuid"] == nod["case"]
        np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
        assert float(ann["diameter_mm"]) == float(nod["diameter_mm"])
        ijk = _voxel(affine, ras)
        assert np.all(ijk >= 0) and np.all(ijk < arr.shape)
        hu = int(arr[tuple(ijk)])
        assert hu > (-300 if nod["texture"] == "solid" else -720), (nod, hu)
        ring = []
        for d in np.vstack([np.eye(3), -np.eye(3)]):
            v = np.clip(_voxel(affine, ras + d * (float(nod["diameter_mm"]) / 2 + 5.0)), 0, np.array(arr.shape) - 1)
            ring.append(arr[tuple(v)])
        contrast.append(hu - np.median(ring))
    assert np.mean(contrast) > 300


def test_values_and_tissue_classes(cohort: tuple[Path, dict]) -> None:
    out, summary = cohort
    for entry in summary["case_list"]:
        arr, _, img = _load(out, entry["case"])
        assert img.get_data_dtype() == np.int16 and arr.dtype == np.int16
        assert arr.min() >= -1024 and arr.max() <= 3071
        n = arr.size
        assert np.count_nonzero(arr < -950) / n > 0.1  # air around the body
        assert np.count_nonzero((arr > -920) & (arr < -780)) / n > 0.03  # lung parenchyma
        assert np.count_nonzero((arr > -150) & (arr < 100)) / n > 0.1  # fat, muscle, mediastinum
        assert np.count_nonzero(arr > 200) > 50  # bone


def test_geometry_orientation_and_spacing(cohort: tuple[Path, dict]) -> None:
    out, summary = cohort
    spec = SIZES["tiny"]
    codes = set()
    for entry in summary["case_list"]:
        arr, affine, img = _load(out, entry["case"])
        codes.add(nib.aff2axcodes(affine))
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), affine, atol=1e-4)
        _, canonical = _canonical(arr, affine)
        sx, sy, sz = np.diag(canonical)[:3]
        assert sx == sy and spec.inplane_mm[0] <= sx <= spec.inplane_mm[1]
        assert spec.slice_mm[0] <= sz <= spec.slice_mm[1]
        assert sorted(arr.shape)[1:] == [64, 64] and spec.slices[0] <= min(arr.shape) <= spec.slices[1]
        assert "".join(nib.aff2axcodes(affine)) == entry["orientation"]
    assert len(codes) >= 2
    assert any(c[2] not in "SI" for c in codes)  # some volumes do not store slices last


def test_candidates_csv(cohort: tuple[Path, dict]) -> None:
    out, _ = cohort
    nodules = _rows(out / "nodules.csv")
    cands = _rows(out / "candidates.csv")
    assert list(cands[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert list(_rows(out / "annotations.csv")[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    hu_neg = []
    for cand in cands:
        ras = np.array([-float(cand["coordX"]), -float(cand["coordY"]), float(cand["coordZ"])])
        mine = [n for n in nodules if n["case"] == cand["seriesuid"]]
        dist = [np.linalg.norm(ras - [float(n[k]) for k in ("x_ras", "y_ras", "z_ras")]) for n in mine]
        radii = [float(n["diameter_mm"]) / 2 for n in mine]
        if cand["class"] == "1":
            assert min(dist) <= 1.0
        else:
            assert all(d >= r + 10.0 for d, r in zip(dist, radii, strict=True))
            arr, affine, _ = _load(out, cand["seriesuid"])
            hu_neg.append(arr[tuple(_voxel(affine, ras))])
    assert sum(c["class"] == "1" for c in cands) == len(nodules)
    assert min(hu_neg) < -700 and max(hu_neg) > -500  # parenchyma and vessel / tissue negatives


def test_datalists(cohort: tuple[Path, dict]) -> None:
    out, summary = cohort
    nodules = _rows(out / "nodules.csv")
    lists = {
        name: json.loads((out / f"{name}.json").read_text())
        for name in ("datalist", "datalist_malignancy", "datalist_volume", "datalist_dicom")
    }
    assert lists["datalist"]["labels"] == {"0": "non-nodule", "1": "nodule"}
    assert lists["datalist_malignancy"]["labels"] == {"0": "benign", "1": "malignant"}
    patients = {s: {e["patient"] for e in lists["datalist_volume"][s]} for s in ("training", "validation", "test")}
    assert all(patients.values())
    assert not (patients["training"] & patients["validation"] or patients["training"] & patients["test"])
    assert not patients["validation"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == N_CASES
    shapes = {}
    for name, dl in lists.items():
        for split, entries in dl.items():
            if split not in patients:
                continue
            for e in entries:
                assert e["patient"] in patients[split] and e["case"].endswith(e["patient"][1:])
                if name == "datalist_volume":
                    assert "center" not in e
                    continue
                assert e["image"] == (
                    f"dicom/{e['case']}" if name == "datalist_dicom" else f"images/{e['case']}.nii.gz"
                )
                if e["case"] not in shapes:
                    arr, affine, _ = _load(out, e["case"])
                    shapes[e["case"]] = (arr.shape, affine)
                shape, affine = shapes[e["case"]]
                ijk = _voxel(affine, np.array(e["center"]))
                assert np.all(ijk >= 0) and np.all(ijk < shape), (name, e)
    malig = [e for s in patients for e in lists["datalist_malignancy"][s]]
    assert sorted((e["case"], e["label"]) for e in malig) == sorted((n["case"], int(n["malignant"])) for n in nodules)
    with_nod = {n["case"] for n in nodules}
    for s in patients:
        assert all(e["label"] == int(e["case"] in with_nod) for e in lists["datalist_volume"][s])
        assert summary["splits"][s]["cases"] == len(patients[s])
    positives = sum(e["label"] for s in patients for e in lists["datalist"][s])
    assert positives == len(nodules)
    on_disk = json.loads((out / "cohort.json").read_text())
    assert on_disk["out_dir"] == "." and {**on_disk, "out_dir": summary["out_dir"]} == summary


def test_dicom_series_match_nifti(cohort: tuple[Path, dict]) -> None:
    out, summary = cohort
    studies = set()
    for entry in summary["case_list"]:
        case = entry["case"]
        arr, affine, _ = _load(out, case)
        d_arr, d_aff = _sitk_series(out / "dicom" / case)
        a1, f1 = _canonical(arr, affine)
        a2, f2 = _canonical(d_arr, d_aff)
        assert a1.shape == a2.shape
        np.testing.assert_array_equal(a1, a2.astype(np.int16))
        np.testing.assert_allclose(f1, f2, atol=1e-3)
        files = sorted((out / "dicom" / case).glob("IM*.dcm"))
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.PatientID == f"SYNTH-{entry['patient']}" and str(ds.PatientName) == "Synthetic^Phantom"
        assert [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files] == list(
            range(1, len(files) + 1)
        )
        studies.add(ds.StudyInstanceUID)
    assert len(studies) == N_CASES


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "R", "I"), ("I", "L", "A")])
def test_write_dicom_series_anisotropic(tmp_path: Path, codes: tuple[str, str, str]) -> None:
    rng = np.random.default_rng(0)
    canon = rng.integers(-1024, 3072, size=(7, 5, 4)).astype(np.int16)  # (X, Y, Z) RAS, distinct sizes
    base = np.diag([0.5, 0.75, 2.0, 1.0])
    base[:3, 3] = [-100.25, 20.5, -300.0]
    from nibabel.orientations import axcodes2ornt, ornt_transform

    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    arr = apply_orientation(canon, ornt)
    affine = base @ inv_ornt_aff(ornt, canon.shape)
    assert nib.aff2axcodes(affine) == codes
    files = write_dicom_series(arr, affine, tmp_path / "s", uid_entropy=["t"], patient_id="SYNTH-x")
    assert len(files) == 4  # slices run along S/I whatever the storage order
    ds = pydicom.dcmread(files[0])
    assert (int(ds.Rows), int(ds.Columns)) != (int(ds.Columns), int(ds.Rows))
    row_cos = np.array(ds.ImageOrientationPatient[:3], dtype=float)
    along_row = 0.5 if abs(row_cos[0]) == 1 else 0.75  # spacing between columns is along the row direction
    assert float(ds.PixelSpacing[1]) == along_row and float(ds.PixelSpacing[0]) == 1.25 - along_row
    d_arr, d_aff = _sitk_series(tmp_path / "s")
    a2, f2 = _canonical(d_arr, d_aff)
    np.testing.assert_array_equal(a2.astype(np.int16), canon)
    np.testing.assert_allclose(f2, base, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cases": 0},
        {"cases": 2.5},
        {"size": "huge"},
        {"seed": -1},
        {"val_fraction": 1.2},
        {"test_fraction": -0.1},
        {"val_fraction": 0.5, "test_fraction": 0.5},
        {"junctions": -1},
        {"junctions": True},
        {"juxtavascular": 1.5},
        {"juxtavascular": -0.1},
        {"juxtavascular": True},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"out_dir": tmp_path, "cases": 2, "seed": 0, "size": "tiny", **kwargs}
    with pytest.raises(ValueError):
        synthesize_cohort(**args)
    assert not (tmp_path / "images").exists()


def test_junction_negatives_add_candidates_and_leave_the_images_alone(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize_cohort(a, cases=3, seed=4, size="tiny", negatives=4)
    synthesize_cohort(b, cases=3, seed=4, size="tiny", negatives=4, junctions=3)
    fa, fb = _files(a), _files(b)
    assert [k for k in fa if k.startswith("images/") and fa[k] != fb[k]] == []
    before, after = _rows(a / "candidates.csv"), _rows(b / "candidates.csv")
    key = [tuple(r.values()) for r in before]
    assert set(key) < {tuple(r.values()) for r in after}  # the other candidates are kept as they were
    extra = [r for r in after if tuple(r.values()) not in set(key)]
    assert all(r["class"] == "0" for r in extra)
    assert 0 < len(extra) <= 3 * 3
    train = json.loads((b / "datalist.json").read_text())["training"]
    assert len(train) > len(json.loads((a / "datalist.json").read_text())["training"])


def test_sample_junctions_lie_at_branch_points_in_the_lung() -> None:
    from volcnn.data.cohort import sample_geometry
    from volcnn.data.nodules import sample_junctions
    from volcnn.data.phantom import build_phantom

    rng = np.random.default_rng(7)
    ph = build_phantom(sample_geometry(rng, SIZES["small"]), rng, SIZES["small"])
    pts = sample_junctions(ph, np.random.default_rng(0), [], 12, jitter_mm=1.5)
    assert len(pts) == 12
    assert ph.lookup(pts).all()
    starts = ph.vessels.p0
    nearest = np.linalg.norm(pts[:, None, :] - starts[None], axis=2).min(axis=1)
    assert nearest.max() <= 1.5 + 1e-3
    # segments' middles are not branch points: the points are nearer to a start than the segments are long
    lengths = np.linalg.norm(ph.vessels.p1 - ph.vessels.p0, axis=1)
    assert nearest.max() < np.median(lengths) / 2
    assert len(np.unique(np.round(pts, 0), axis=0)) == len(pts)
    far = sample_junctions(ph, np.random.default_rng(0), [], 12, jitter_mm=0.0)
    assert np.linalg.norm(far[:, None, :] - starts[None], axis=2).min(axis=1).max() < 1e-3


def _axis_distance(point: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment ``(N,)``: distance of ``point`` from the segment, and the position along it (0 at p0, 1 at p1)."""
    d = p1 - p0
    t = np.clip(((point - p0) * d).sum(axis=1) / np.maximum((d * d).sum(axis=1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(point - (p0 + t[:, None] * d), axis=1), t


def test_juxtavascular_nodules_touch_a_vessel_and_leave_the_other_nodules_alone(tmp_path: Path) -> None:
    """With a share of 1, every nodule that has room is moved so that a >= 1 mm vessel's surface lies inside it (its
    axis between vessel radius + 0.2 and + 0.8 nodule radii away); the unmoved nodules keep their centres and a case
    with none moved keeps its bytes."""
    from volcnn.data.cohort import synthesize_case

    spec = SIZES["small"]
    moved = kept = 0
    for i in range(4):
        plain = synthesize_case(f"c{i}", f"p{i}", spec, np.random.default_rng([9, i]))
        attached = synthesize_case(f"c{i}", f"p{i}", spec, np.random.default_rng([9, i]), juxtavascular=1.0,
                                   attach_rng=np.random.default_rng([9, i, 1]))  # fmt: skip
        assert len(plain.nodules) == len(attached.nodules)
        vt = _phantom_vessels(9, i)
        for a, b in zip(plain.nodules, attached.nodules, strict=True):
            assert not a.juxtavascular
            if not b.juxtavascular:
                assert b.center == a.center
                kept += 1
                continue
            moved += 1
            assert (b.diameter_mm, b.texture, b.malignant) == (a.diameter_mm, a.texture, a.malignant)
            dist, t = _axis_distance(np.asarray(b.center), vt.p0, vt.p1)
            vessel_r = vt.r0 + t * (vt.r1 - vt.r0)
            touching = (dist >= vessel_r + 0.2 * b.radius - 1e-2) & (dist <= vessel_r + 0.8 * b.radius + 1e-2)
            assert (touching & (0.5 * (vt.r0 + vt.r1) >= 1.0)).any(), f"case {i}: a moved nodule touches no vessel"
        if not any(n.juxtavascular for n in attached.nodules):
            assert np.array_equal(plain.image, attached.image)
    assert moved >= 3 and moved > kept


def _phantom_vessels(seed: int, i: int):  # noqa: ANN202 - a VesselTree
    """The vessel tree of :func:`synthesize_case`'s phantom for ``default_rng([seed, i])``."""
    from volcnn.data.cohort import sample_geometry
    from volcnn.data.phantom import build_phantom

    rng = np.random.default_rng([seed, i])
    return build_phantom(sample_geometry(rng, SIZES["small"]), rng, SIZES["small"]).vessels


def test_juxtavascular_share_in_the_cohort_tables(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize_cohort(a, cases=4, seed=4, size="tiny", negatives=4)
    summary = synthesize_cohort(b, cases=4, seed=4, size="tiny", negatives=4, juxtavascular=0.5)
    plain, attached = _rows(a / "nodules.csv"), _rows(b / "nodules.csv")
    assert "juxtavascular" not in plain[0] and "juxtavascular" not in json.loads((a / "cohort.json").read_text())
    flagged = [r for r in attached if r["juxtavascular"] == "1"]
    assert 0 < len(flagged) < len(attached)
    for r, q in zip(plain, attached, strict=True):  # an unflagged nodule keeps its centre
        if q["juxtavascular"] == "0":
            assert (r["x_ras"], r["y_ras"], r["z_ras"]) == (q["x_ras"], q["y_ras"], q["z_ras"])
    assert summary["juxtavascular"] == 0.5
    assert json.loads((b / "cohort.json").read_text())["juxtavascular"] == 0.5
