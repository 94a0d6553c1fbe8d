"""The batch runner: per-case heat map and findings on the input's own grid (both heat-map methods), summary,
failures, the dense method's check and fallback, resuming an interrupted batch, the bundle path."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import make_affine
from tests.inference import GEOMETRIES, NODULE_RAS, BlobNet, nodule_scan
from tests.inference.dense_nets import DenseBlobNet, padding_sensitive_net
from volcnn.commands.infer import infer
from volcnn.core.errors import VolcnnError
from volcnn.inference import InferenceRunner, load_bundle_runner
from volcnn.io import write_nifti
from volcnn.networks import create_network
from volcnn.transforms import voxel_to_world

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
#: 1.5 x stride (4 mm) + 1 voxel (2 mm) at the settings used here
TOL_MM = 6.0
PATCH = (12, 12, 12)


def infer_main(*args, **kwargs) -> int:
    """``volcnn infer``'s body with its errors mapped to exit codes and logged, as ``volcnn.cli.main`` does."""
    try:
        return infer(*args, **kwargs)
    except VolcnnError as e:
        logging.getLogger("volcnn").error("%s", e)
        return e.exit_code


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    aff = make_affine((1.5, 1.5, 2.0))
    good = folder / "full.nii.gz"
    write_nifti(good, nodule_scan((40, 40, 30), aff), aff)
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flat = folder / "flat.nii.gz"
    write_nifti(flat, np.zeros((30, 30), dtype=np.int16), aff)
    good.unlink()
    return {"truncated": truncated, "flat": flat, "missing": folder / "missing.nii.gz"}


@pytest.fixture(scope="module", params=["window", "dense"])
def batch(request, tmp_path_factory):
    """One runner pass over the four geometries, three bad inputs and a case-name clash, per heat-map method: window
    by window with :class:`BlobNet` (which cannot be split: ``auto`` picks the window method), densely with its
    pooling twin (inside the body mask, which for these lung-only scans holds the nodule)."""
    method = request.param
    root = tmp_path_factory.mktemp(f"runner_{method}")
    inputs: dict[str, Path] = {}
    for name, (shape, aff) in GEOMETRIES.items():
        inputs[name] = root / "in" / f"{name}.nii.gz"
        write_nifti(inputs[name], nodule_scan(shape, aff), aff)
    inputs.update(_write_bad_inputs(root / "bad"))
    shape, aff = GEOMETRIES["ras"]
    clash = root / "other" / "ras.nii"
    write_nifti(clash, nodule_scan(shape, aff), aff)
    order = ["ras", "truncated", "lps", "flat", "permuted", "missing", "oblique"]
    runner = InferenceRunner(
        BlobNet(PATCH) if method == "window" else DenseBlobNet(PATCH),
        patch_size=PATCH,
        pixdim=(2.0, 2.0, 2.0),
        stride_mm=4.0,
        batch_size=512,
        device="cpu",
        model_info={"name": "blob", "version": "0", "sha256": "abc"},
        progress=False,
    )
    assert runner.heatmap.split is None if method == "window" else runner.heatmap.split is not None
    out = root / "out"
    result = runner.run([str(inputs[k]) for k in order] + [str(clash)], out)
    return {"inputs": inputs, "out": out, "result": result, "method": method}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_heatmap_on_the_input_grid_peaks_at_the_nodule(batch, name):
    src = nib.load(batch["inputs"][name])
    heat_img = nib.load(batch["out"] / name / "heatmap.nii.gz")
    assert heat_img.shape == src.shape
    np.testing.assert_array_equal(heat_img.affine, src.affine)
    assert heat_img.get_data_dtype() == np.float32
    heat = np.asarray(heat_img.dataobj)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert np.linalg.norm(voxel_to_world(src.affine, peak) - NODULE_RAS) <= TOL_MM
    assert heat.max() > 0.9
    assert np.mean(heat > 0.5) < 0.01  # the response is local


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_findings_report_the_nodule_in_world_and_input_voxels(batch, name):
    src = nib.load(batch["inputs"][name])
    doc = json.loads((batch["out"] / name / "findings.json").read_text())
    assert set(doc) == {
        "case",
        "score",
        "score_method",
        "max_probability",
        "findings",
        "model",
        "input_sha256",
        "stride_mm",
        "threshold",
        "operating_threshold",
        "n_at_operating_threshold",
        "calibration",
        "heatmap",
        "settings",
    }
    assert doc["case"] == name and doc["score_method"] == "max"
    assert doc["heatmap"]["method"] == batch["method"] and doc["heatmap"]["grid_step_vox"] == [2, 2, 2]
    if batch["method"] == "dense":
        assert doc["heatmap"]["check"]["max_abs_diff"] < 1e-4 and doc["heatmap"]["check"]["points"] > 0
    assert doc["settings"]["method"] == "auto" and doc["settings"]["patch_size"] == list(PATCH)
    assert doc["max_probability"] == pytest.approx(doc["score"], abs=1e-4)
    assert doc["model"] == {"name": "blob", "version": "0", "sha256": "abc"}
    assert doc["input_sha256"] == _sha256(batch["inputs"][name])
    assert doc["stride_mm"] == 4.0 and doc["threshold"] == 0.5
    (finding,) = doc["findings"]
    assert set(finding) == {"center_ras_mm", "center_voxel", "probability", "diameter_mm"}
    assert 0 < finding["diameter_mm"] <= 30.0  # the blob of the size-aware suppression
    assert np.linalg.norm(np.asarray(finding["center_ras_mm"]) - NODULE_RAS) <= TOL_MM
    back = voxel_to_world(src.affine, finding["center_voxel"])
    half_diagonal = 0.5 * np.linalg.norm(np.sqrt((src.affine[:3, :3] ** 2).sum(axis=0)))
    assert np.linalg.norm(back - finding["center_ras_mm"]) <= half_diagonal + 1e-6
    assert doc["score"] == pytest.approx(finding["probability"], abs=1e-4)
    assert finding["probability"] > 0.9


def test_batch_goes_on_past_bad_inputs(batch):
    out, result = batch["out"], batch["result"]
    failures = json.loads((out / "failures.json").read_text())
    assert failures == result["failures"]
    assert [Path(f["input"]).name for f in failures] == ["truncated.nii.gz", "flat.nii.gz", "missing.nii.gz"]
    for f in failures:
        assert f["input"] in f["error"]  # the message names the file
    assert "3D" in failures[1]["error"] and "does not exist" in failures[2]["error"]
    for bad in ("truncated", "flat", "missing"):
        assert not (out / bad / "heatmap.nii.gz").exists() and not (out / bad / "findings.json").exists()
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["ras", "truncated", "lps", "flat", "permuted", "missing", "oblique", "ras-2"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "ok", "failed", "ok", "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["n_findings"] == "1" and float(r["score"]) > 0.9 for r in ok)
    assert [p["case"] for p in result["processed"]] == ["ras", "lps", "permuted", "oblique", "ras-2"]
    assert result["skipped"] == []
    assert (out / "ras-2" / "heatmap.nii.gz").exists()  # same name from another folder: not overwritten


def _scan(folder: Path, name: str = "ras") -> Path:
    shape, aff = GEOMETRIES[name]
    path = folder / f"{name}.nii.gz"
    write_nifti(path, nodule_scan(shape, aff), aff)
    return path


def _runner(network, **kwargs) -> InferenceRunner:
    options = {"patch_size": PATCH, "pixdim": (2.0, 2.0, 2.0), "device": "cpu", "progress": False}
    options.update(kwargs)
    return InferenceRunner(network, **{"model_info": {"sha256": "abc"}, **options})


def test_auto_falls_back_to_windows_when_the_dense_map_disagrees(tmp_path, caplog):
    """A network that depends on its patches' zero padding: the check catches it; ``auto`` recomputes the map window
    by window, ``dense`` keeps the dense map; both say so in the log and in findings.json. After one disagreement
    ``auto`` goes straight to windows for the rest of the batch (the cause is the network, not the CT)."""
    path, other = _scan(tmp_path), _scan(tmp_path, "lps")
    caplog.set_level(logging.WARNING)
    auto = _runner(padding_sensitive_net(offset=0.12), skip_air=False, stride_mm=8.0)
    auto.run([str(path), str(other)], tmp_path / "auto")
    doc = json.loads((tmp_path / "auto" / "ras" / "findings.json").read_text())
    assert doc["heatmap"]["method"] == "window" and doc["heatmap"]["dense_check"]["max_abs_diff"] > 0.05
    assert "using the window method" in caplog.text and caplog.text.count("differs from window-by-window") == 1
    second = json.loads((tmp_path / "auto" / "lps" / "findings.json").read_text())["heatmap"]
    assert second["method"] == "window" and "dense_check" not in second
    caplog.clear()
    _runner(padding_sensitive_net(offset=0.12), skip_air=False, stride_mm=8.0, method="dense").run(
        [str(path)], tmp_path / "dense"
    )
    doc = json.loads((tmp_path / "dense" / "ras" / "findings.json").read_text())
    assert doc["heatmap"]["method"] == "dense" and doc["heatmap"]["check"]["max_abs_diff"] > 0.05
    assert "keeping the dense map" in caplog.text


def test_method_choice(caplog):
    caplog.set_level(logging.INFO)
    assert _runner(BlobNet(PATCH)).heatmap.split is None
    assert "window by window" in caplog.text and "BlobNet cannot be evaluated densely" in caplog.text
    with pytest.raises(ValueError, match="method 'dense'"):
        _runner(BlobNet(PATCH), method="dense")
    with pytest.raises(ValueError, match="unknown heat-map method"):
        _runner(BlobNet(PATCH), method="fast")
    assert _runner(DenseBlobNet(PATCH), method="window").heatmap.split is None
    assert _runner(DenseBlobNet(PATCH)).heatmap.split is not None


def test_done_cases_are_skipped_only_when_input_model_and_settings_match(tmp_path, caplog):
    path = _scan(tmp_path)
    out = tmp_path / "out"
    first = _runner(DenseBlobNet(PATCH)).run([str(path)], out)
    findings = out / "ras" / "findings.json"
    stamp = findings.stat().st_mtime_ns
    caplog.set_level(logging.INFO)
    again = _runner(DenseBlobNet(PATCH)).run([str(path)], out)
    assert again["skipped"] == ["ras"] and "ras: skipped (done)" in caplog.text
    assert again["processed"] == first["processed"] and findings.stat().st_mtime_ns == stamp
    for changed in ({"stride_mm": 6.0}, {"model_info": {"sha256": "def"}}, {"method": "window"}, {"resume": False}):
        result = _runner(DenseBlobNet(PATCH), **changed).run([str(path)], tmp_path / "other")
        assert result["skipped"] == []
        _runner(DenseBlobNet(PATCH)).run([str(path)], tmp_path / "other")  # back to the first settings
        result = _runner(DenseBlobNet(PATCH), **changed).run([str(path)], tmp_path / "other")
        assert result["skipped"] == [], changed
    findings.write_text("{not json")
    assert _runner(DenseBlobNet(PATCH)).run([str(path)], out)["skipped"] == []
    assert json.loads(findings.read_text())["input_sha256"] == _sha256(path)


# ---- the bundle path: configs/inference.json, models/model.pt, infer_main ----


@pytest.fixture
def bundle(tmp_path):
    """A copy of the real bundle's configs with a small seed_cnn3d state dict as models/model.pt."""
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    torch.manual_seed(0)
    net = create_network("seed_cnn3d", num_classes=2, spatial_size=(8, 8, 8))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


#: overrides making the bundle cheap: a small network and a coarse grid
SMALL = {
    "network_def": "seed_cnn3d",
    "patch_size": [8, 8, 8],
    "pixdim": [2.0, 2.0, 2.0],
    "stride_mm": 8.0,
    "device": "cpu",
    "progress": False,
}


def test_infer_main_exit_codes_and_outputs(bundle, tmp_path):
    shape, aff = GEOMETRIES["lps"]
    good = tmp_path / "good.nii.gz"
    write_nifti(good, nodule_scan(shape, aff), aff)
    bad = _write_bad_inputs(tmp_path / "bad")["truncated"]

    out = tmp_path / "out"
    assert infer_main(bundle, out, [str(good), str(bad)], **SMALL) == 1
    doc = json.loads((out / "good" / "findings.json").read_text())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert doc["model"] == {
        "name": meta["name"],
        "version": meta["version"],
        "sha256": _sha256(bundle / "models" / "model.pt"),
    }
    assert nib.load(out / "good" / "heatmap.nii.gz").shape == shape
    assert [f["input"] for f in json.loads((out / "failures.json").read_text())] == [str(bad)]

    assert infer_main(bundle, tmp_path / "out2", [str(good)], **SMALL) == 0
    assert json.loads((tmp_path / "out2" / "failures.json").read_text()) == []


def test_infer_main_bad_usage(bundle, tmp_path, caplog):
    shape, aff = GEOMETRIES["ras"]
    good = tmp_path / "good.nii.gz"
    write_nifti(good, nodule_scan(shape, aff), aff)
    caplog.set_level(logging.ERROR)
    assert infer_main(bundle, tmp_path / "o", [], **SMALL) == 2
    assert "no inputs" in caplog.text
    assert infer_main(tmp_path / "nowhere", tmp_path / "o", [str(good)], **SMALL) == 2
    assert "bundle folder not found" in caplog.text
    (bundle / "models" / "model.pt").unlink()
    caplog.clear()
    assert infer_main(bundle, tmp_path / "o", [str(good)], **SMALL) == 2
    assert str(bundle / "models" / "model.pt") in caplog.text and "not found" in caplog.text
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_bundle_runner(bundle, **SMALL)


def test_monai_bundle_run_over_the_datalist_test_section(bundle, tmp_path):
    """``python -m monai.bundle run --config_file configs/inference.json --bundle_root B --dataset_dir D``."""
    from monai.bundle import run

    data = tmp_path / "data"
    shape, aff = GEOMETRIES["ras"]
    write_nifti(data / "vols" / "a.nii.gz", nodule_scan(shape, aff), aff)
    datalist = {
        "training": [{"image": "vols/a.nii.gz", "label": 1}],
        "test": [{"image": "vols/a.nii.gz", "label": 1, "center": list(NODULE_RAS)}, {"image": "vols/a.nii.gz"}],
    }
    (data / "datalist.json").write_text(json.dumps(datalist))
    out = tmp_path / "eval"
    run(
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        dataset_dir=str(data),
        output_dir=str(out),
        **SMALL,
    )
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["status"]) for r in rows] == [("a", "ok")]  # each image once
    assert json.loads((out / "a" / "findings.json").read_text())["model"]["name"] == "Lung nodule CT classification"


def test_interrupted_batch_resumes_and_retries_failures(bundle, tmp_path, caplog):
    """Two good inputs and a bad one; the first run stops after the bad one (an interruption). The re-run skips the
    finished case (its files untouched), retries the bad one, does the rest; a third run only retries."""
    good_a, good_b = _scan(tmp_path / "in", "lps"), _scan(tmp_path / "in", "oblique")
    bad = _write_bad_inputs(tmp_path / "bad")["truncated"]
    out = tmp_path / "out"
    assert infer_main(bundle, out, [str(good_a), str(bad)], **SMALL) == 1
    assert [f["input"] for f in json.loads((out / "failures.json").read_text())] == [str(bad)]
    files = [out / "lps" / "findings.json", out / "lps" / "heatmap.nii.gz"]
    stamps = [f.stat().st_mtime_ns for f in files]

    caplog.set_level(logging.INFO)
    inputs = [str(good_a), str(bad), str(good_b)]
    assert infer_main(bundle, out, inputs, **SMALL) == 1
    assert "lps: skipped (done)" in caplog.text and "oblique: skipped" not in caplog.text
    assert "truncated failed" in caplog.text  # retried
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert [f["input"] for f in json.loads((out / "failures.json").read_text())] == [str(bad)]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["status"]) for r in rows] == [("lps", "ok"), ("truncated", "failed"), ("oblique", "ok")]
    assert rows[0]["score"] == str(json.loads(files[0].read_text())["score"])

    caplog.clear()
    oblique = (out / "oblique" / "findings.json").stat().st_mtime_ns
    assert infer_main(bundle, out, inputs, **SMALL) == 1
    assert caplog.text.count("skipped (done)") == 2 and "truncated failed" in caplog.text
    assert (out / "oblique" / "findings.json").stat().st_mtime_ns == oblique


def test_bundle_heatmap_method(bundle):
    assert load_bundle_runner(bundle, **SMALL).method == "auto"
    assert load_bundle_runner(bundle, heatmap_method="window", **SMALL).method == "window"
    with pytest.raises(RuntimeError, match="Failed to instantiate") as info:  # MONAI wraps the runner's error
        load_bundle_runner(bundle, heatmap_method="fast", **SMALL)
    assert "unknown heat-map method 'fast'" in str(info.value.__cause__)


def test_infer_main_explains_the_top_finding(bundle, tmp_path):
    """``volcnn infer --explain 1``: a Grad-CAM NIfTI on the input's grid and a PNG for the most probable finding."""
    shape, aff = GEOMETRIES["lps"]
    good = tmp_path / "good.nii.gz"
    write_nifti(good, nodule_scan(shape, aff), aff)
    out = tmp_path / "out"
    settings = {**SMALL, "threshold": 0.0}  # an untrained network: report whatever peaks there are
    assert infer_main(bundle, out, [str(good)], explain=1, **settings) == 0
    doc = json.loads((out / "good" / "findings.json").read_text())
    assert doc["findings"], "no finding to explain"
    (expl,) = doc["explanations"]
    img = nib.load(out / "good" / expl["nifti"])
    assert img.shape == shape and np.allclose(img.affine, aff)
    assert (out / "good" / expl["png"]).read_bytes().startswith(b"\x89PNG")


def test_infer_main_runs_an_exported_model_alone(bundle, tmp_path):
    """``volcnn infer --model model.onnx``: no bundle needed; same heat map as the bundle's own network."""
    from volcnn.bundle import configure_bundle, export_bundle

    shape, aff = GEOMETRIES["ras"]
    scan = tmp_path / "scan.nii.gz"
    write_nifti(scan, nodule_scan(shape, aff), aff)
    configured = configure_bundle(bundle, tmp_path / "b2", {k: v for k, v in SMALL.items() if k != "progress"})
    (configured / "models").mkdir(exist_ok=True)
    shutil.copy(bundle / "models" / "model.pt", configured / "models" / "model.pt")
    paths = export_bundle(configured, formats=("onnx",))
    common = {"stride_mm": 8.0, "device": "cpu", "progress": False}
    assert infer_main(None, tmp_path / "onnx", [str(scan)], model=paths["onnx"], **common) == 0
    assert infer_main(configured, tmp_path / "pt", [str(scan)], heatmap_method="window", **common) == 0
    a = nib.load(tmp_path / "onnx" / "scan" / "heatmap.nii.gz").get_fdata()
    b = nib.load(tmp_path / "pt" / "scan" / "heatmap.nii.gz").get_fdata()
    assert np.abs(a - b).max() < 1e-4
    assert infer_main(configured, tmp_path / "x", [str(scan)], model=paths["onnx"]) == 2  # both given
    assert infer_main(None, tmp_path / "y", [str(scan)], model=paths["onnx"], heatmap_method="dense") == 2
    assert not (tmp_path / "y").exists()


def test_input_hash_agrees_with_ingest(tmp_path):
    """The same scan gets one sha256: ``input_sha256`` in findings.json equals ``source_sha256`` in ingest's manifest,
    for a NIfTI file, a MetaImage header with its data file, and a DICOM series folder (with a stray non-DICOM file
    beside the slices). Before, inference hashed every file's bytes joined and ingest each file's name and hash."""
    import SimpleITK as sitk

    from volcnn.data import write_dicom_series
    from volcnn.io.ingest import ingest

    shape, aff = GEOMETRIES["ras"]
    scan = nodule_scan(shape, aff)
    src = tmp_path / "src"
    write_nifti(src / "nifti_case.nii.gz", scan, aff)
    image = sitk.GetImageFromArray(np.ascontiguousarray(scan.transpose(2, 1, 0)))  # (Z, Y, X)
    image.SetSpacing([float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))])
    sitk.WriteImage(image, str(src / "meta_case.mhd"))
    series = src / "dicom_case"
    write_dicom_series(scan.astype(np.int16), aff, series, uid_entropy=["hash-test"], patient_id="SYNTH-0")
    (series / "README.txt").write_text("not a slice")
    inputs = [src / "nifti_case.nii.gz", src / "meta_case.mhd", series]

    manifest = {Path(e["source"]).name: e["source_sha256"] for e in ingest([src], tmp_path / "ingested").converted}
    out = tmp_path / "out"
    result = _runner(BlobNet(PATCH), stride_mm=8.0).run([str(p) for p in inputs], out)
    assert result["failures"] == []
    for path, case in zip(inputs, ["nifti_case", "meta_case", "dicom_case"], strict=True):
        digest = json.loads((out / case / "findings.json").read_text())["input_sha256"]
        assert digest == manifest[path.name], case
    assert manifest["nifti_case.nii.gz"] == _sha256(src / "nifti_case.nii.gz")  # one file: its own sha256
