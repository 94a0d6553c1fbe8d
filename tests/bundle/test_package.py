"""``volcnn package``: a run trained with overrides -> run.json -> a packaged bundle whose network gives the evaluate
overlay's probabilities; exit codes; a failed check publishes nothing; mismatched weights are refused by name."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from volcnn.cli import main
from volcnn.core.geometry import world_to_voxel
from volcnn.data import synthesize_cohort
from volcnn.engines.run_record import RunRecordError
from volcnn.inference import load_bundle_runner, window_probabilities
from volcnn.io import load_volume
from volcnn.transforms.volume_cache import preprocess_volume

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
TRAIN, EVALUATE = BUNDLE / "configs" / "train.json", BUNDLE / "configs" / "evaluate.json"
#: the run's overrides: every model setting differs from the bundle's defaults, so a setting the package forgot to
#: write would change the probabilities
OVERRIDES = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "pixdim": [2.0, 2.0, 2.0],
             "hu_window": [-900, 300], "margin": 2}  # fmt: skip
CHEAP = {"batch_size": 4, "num_workers": 0, "amp": False, "max_epochs": 2, "device": "cpu", "progress": False,
         "learning_rate": 0.003, "n_boot": 20}  # fmt: skip


def _workflow(config_file, run_id: str, cohort: Path, out: Path, **extra) -> ConfigWorkflow:
    paths = {"bundle_root": str(BUNDLE), "dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"),
             "output_dir": str(out)}  # fmt: skip
    overrides = {**paths, **OVERRIDES, **CHEAP, **extra}
    wf = ConfigWorkflow(config_file=config_file, workflow_type=None, run_id=run_id, **overrides)
    wf.initialize()
    return wf


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg_cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory) -> Path:
    """Trained (2 epochs) and evaluated on the test section with the evaluate overlay, in process."""
    out = tmp_path_factory.mktemp("pkg_run")
    _workflow(str(TRAIN), "training", cohort, out).run()
    _workflow([str(TRAIN), str(EVALUATE)], "run", cohort, out).run()
    assert (out / "models" / "model.pt").is_file() and (out / "predictions.csv").is_file()
    return out


@pytest.fixture(scope="module")
def packaged(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg_out") / "bundle"
    assert main(["package", str(run), "--out", str(out)]) == 0  # the bundle root the run recorded: no --bundle
    return out


def _cause(error: BaseException, kind: type) -> BaseException | None:
    """``error`` or the first of its causes of ``kind`` (MONAI wraps an expression's error in a RuntimeError)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_json_records_the_resolved_settings(run, cohort):
    record = json.loads((run / "run.json").read_text())
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert {k: record[k] for k in OVERRIDES} == OVERRIDES
    assert record["num_classes"] == 2 and record["channels_last"] is False
    assert record["mode"] == "candidate"
    assert record["labels"] == {"0": "non-nodule", "1": "nodule"}
    assert record["datalist"] == str(cohort / "datalist.json") and record["dataset_dir"] == str(cohort)
    assert record["datalist_sha256"] == _sha256(cohort / "datalist.json")
    assert record["bundle"] == {"name": meta["name"], "version": meta["version"], "root": str(BUNDLE)}
    assert record["volcnn_version"] and record["record_version"] == 1


def test_packaged_bundle_holds_the_run_settings(packaged, run):
    record = json.loads((run / "run.json").read_text())
    for name in ("train.json", "inference.json"):
        config = json.loads((packaged / "configs" / name).read_text())
        assert {k: config[k] for k in OVERRIDES} == OVERRIDES, name
        assert "datalist_sha256" not in config and config["datalist"] != record["datalist"]  # no machine paths
    assert json.loads((packaged / "configs" / "inference.json").read_text())["mode"] == "candidate"
    meta = json.loads((packaged / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == [16, 16, 16] and image["num_channels"] == 1
    assert pred["num_channels"] == 2 and pred["channel_def"] == {"0": "non-nodule", "1": "nodule"}
    weights_sha = _sha256(run / "models" / "model.pt")
    assert meta["version"] == f"0.7.0+{weights_sha[:12]}" and "seed_cnn3d" in meta["changelog"][meta["version"]]
    assert _sha256(packaged / "models" / "model.pt") == weights_sha
    assert (packaged / "models" / "model.ts").is_file()
    # the evaluate overlay fitted a calibration on the validation patients: the bundle carries exactly that one
    assert (packaged / "models" / "calibration.json").read_bytes() == (run / "calibration.json").read_bytes()


def _window_probabilities(bundle: Path, rows: list[dict], cohort: Path, **overrides) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's network (built as ``volcnn infer --bundle`` builds it) on each row's candidate window of the
    volume preprocessed with the bundle's settings, and whether that window lies inside the volume."""
    runner = load_bundle_runner(bundle, device="cpu", progress=False, **overrides)
    probs, inside = [], []
    for row in rows:
        image = preprocess_volume(load_volume(cohort / row["image"]), runner.pixdim, runner.hu_window, runner.intensity)
        voxel = np.rint(world_to_voxel(image.affine.numpy(), [float(row[f"center_{a}"]) for a in "xyz"])).astype(int)
        start = voxel - np.asarray(runner.patch_size) // 2
        inside.append(bool((start >= 0).all() and (start + runner.patch_size <= np.asarray(image.shape[1:])).all()))
        probs.append(window_probabilities(image, runner.network, voxel[None], runner.patch_size)[0])
    return np.asarray(probs), np.asarray(inside)


def test_round_trip_gives_the_evaluators_probabilities(packaged, run, cohort, tmp_path):
    """The packaged bundle's network, at the test section's candidate centres, gives the probabilities the evaluate
    overlay wrote; the same weights with the bundle's default settings do not (so a setting left out would fail).

    Compared where the window lies inside the volume: beyond the border the evaluator's crop pads with air and the
    heat map's windows replicate the border voxels (on purpose, see ``volcnn.inference.iter_window_batches``)."""
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = np.asarray([float(r["prob"]) for r in rows])
    got, inside = _window_probabilities(packaged, rows, cohort)
    assert inside.sum() >= 4 and expected[inside].std() > 1e-3
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-5, rtol=0)

    defaults = {k: json.loads((BUNDLE / "configs" / "inference.json").read_text())[k] for k in ("pixdim", "hu_window")}
    assert np.abs(_window_probabilities(packaged, rows, cohort, **defaults)[0] - expected).max() > 1e-3

    # and volcnn infer runs the packaged bundle with the run's preprocessing
    image = cohort / rows[0]["image"]
    assert (
        main(["infer", "--bundle", str(packaged), "--out", str(tmp_path / "inf"), "--device", "cpu", str(image)]) == 0
    )
    doc = json.loads((tmp_path / "inf" / image.name.split(".")[0] / "findings.json").read_text())
    meta = json.loads((packaged / "configs" / "metadata.json").read_text())
    assert doc["model"]["version"] == meta["version"] and doc["model"]["sha256"] == _sha256(run / "models" / "model.pt")
    assert doc["settings"]["pixdim"] == [2.0, 2.0, 2.0] and doc["settings"]["hu_window"] == [-900.0, 300.0]


def test_resume_refuses_other_settings_and_rewrites_only_paths(run, cohort, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = (copy / "run.json").read_bytes()
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "models").iterdir()}
    with pytest.raises(Exception) as info:
        _workflow(str(TRAIN), "training", cohort, copy, resume=True, patch_size=[12, 12, 12]).run()
    error = _cause(info.value, RunRecordError)
    assert isinstance(error, RunRecordError)
    assert "refusing to resume" in str(error) and "patch_size [16, 16, 16]" in str(error)
    assert "patch_size [12, 12, 12]" in str(error) and str(copy / "run.json") in str(error)
    assert (copy / "run.json").read_bytes() == record
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "models").iterdir()} == stamps  # nothing trained

    # the same settings with the datalist at another path: resumed (the run had finished: nothing to do), and the
    # record now names the new path
    moved = tmp_path / "moved.json"
    shutil.copyfile(cohort / "datalist.json", moved)
    _workflow(str(TRAIN), "training", cohort, copy, resume=True, datalist=str(moved)).run()
    assert json.loads((copy / "run.json").read_text())["datalist"] == str(moved)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "models").iterdir()} == stamps


def _run_copy(run: Path, dest: Path, **record_changes) -> Path:
    dest.mkdir(parents=True)
    (dest / "models").mkdir()
    shutil.copyfile(run / "models" / "model.pt", dest / "models" / "model.pt")
    record = {**json.loads((run / "run.json").read_text()), **record_changes}
    (dest / "run.json").write_text(json.dumps(record))
    return dest


def test_package_exit_codes(run, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    out = str(tmp_path / "b")
    assert main(["package", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "training run folder not found" in caplog.text
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["package", str(bare), "--out", out]) == 2
    assert str(bare / "run.json") in caplog.text
    no_weights = _run_copy(run, tmp_path / "no_weights")
    (no_weights / "models" / "model.pt").unlink()
    assert main(["package", str(no_weights), "--out", out]) == 2
    assert str(no_weights / "models" / "model.pt") in caplog.text
    rootless = _run_copy(run, tmp_path / "rootless", bundle={"name": "x", "version": "1", "root": str(tmp_path)})
    caplog.clear()
    assert main(["package", str(rootless), "--out", out]) == 2
    assert "pass the bundle to copy with --bundle SRC" in caplog.text
    assert main(["package", str(rootless), "--out", out, "--bundle", str(tmp_path / "nobundle")]) == 2
    assert main(["package", str(run), "--out", str(run.parent)]) == 2  # would replace the run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["package", str(run), "--out", str(tmp_path / "other")]) == 2  # not a bundle: never replaced
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    broken = _run_copy(run, tmp_path / "broken")
    (broken / "run.json").write_text("{not json")
    assert main(["package", str(broken), "--out", out]) == 1
    assert not Path(out).exists()
    # with --bundle, a run without a usable recorded root packages
    assert main(["package", str(rootless), "--out", out, "--bundle", str(BUNDLE)]) == 0
    assert (Path(out) / "models" / "model.ts").is_file()


def test_a_failing_check_publishes_nothing(run, packaged, tmp_path, caplog):
    """A source bundle whose metadata fails the schema: exit 1, no new bundle, an earlier one left as it was, no
    hidden build folder left behind. The calibration a run holds is installed with the weights."""
    src = tmp_path / "src"
    shutil.copytree(BUNDLE, src, ignore=shutil.ignore_patterns("models", "eval"))
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    del meta["authors"]
    (src / "configs" / "metadata.json").write_text(json.dumps(meta))
    caplog.set_level(logging.ERROR)
    assert main(["package", str(run), "--out", str(tmp_path / "new"), "--bundle", str(src)]) == 1
    assert "FAIL metadata" in caplog.text and "'authors' is a required property" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    earlier = tmp_path / "earlier"
    shutil.copytree(packaged, earlier)
    before = {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    assert main(["package", str(run), "--out", str(earlier), "--bundle", str(src)]) == 1
    assert {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "src"]

    calibrated = _run_copy(run, tmp_path / "calibrated")
    (calibrated / "calibration.json").write_text('{"method": "temperature", "temperature": 1.5}')
    assert main(["package", str(calibrated), "--out", str(earlier)]) == 0  # replaces the earlier bundle
    assert json.loads((earlier / "models" / "calibration.json").read_text())["temperature"] == 1.5


def test_mismatched_weights_are_refused_naming_both(packaged, run, cohort, tmp_path, caplog):
    """Weights of a seed_cnn3d under a bundle whose network_def (or num_classes) says otherwise: ``volcnn infer`` and
    ``volcnn export`` exit 2 with one message naming the weights file, the bundle's settings and the first mismatched
    keys or shapes (not MONAI's "Failed to evaluate ConfigExpression"); ``volcnn package`` of such a record exits 1
    and writes nothing."""
    bundle = tmp_path / "bundle"
    shutil.copytree(packaged, bundle)
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "network_def": "valid_cnn3d", "patch_size": [32, 32, 32]}))
    scan = sorted((cohort / "images").glob("*.nii.gz"))[0]
    weights = bundle / "models" / "model.pt"
    caplog.set_level(logging.ERROR)
    for argv in (["infer", "--bundle", str(bundle), "--out", str(tmp_path / "o"), "--device", "cpu", str(scan)],
                 ["export", "--bundle", str(bundle), "--formats", "onnx"]):  # fmt: skip
        caplog.clear()
        assert main(argv) == 2, argv
        text = caplog.text
        assert f"{weights}: these weights do not fit the network of bundle {bundle}" in text, text
        assert "network_def 'valid_cnn3d', patch_size [32, 32, 32], num_classes 2" in text
        assert "missing from the weights" in text and "Failed to evaluate" not in text
    assert not (tmp_path / "o").exists() and not (bundle / "models" / "model.onnx").exists()

    config_file.write_text(json.dumps({**config, "num_classes": 3}))
    caplog.clear()
    assert main(["infer", "--bundle", str(bundle), "--out", str(tmp_path / "o"), "--device", "cpu", str(scan)]) == 2
    assert "shape mismatch" in caplog.text and "weights (2," in caplog.text and "network (3," in caplog.text

    wrong = _run_copy(run, tmp_path / "wrong", network_def="valid_cnn3d", patch_size=[32, 32, 32])
    caplog.clear()
    assert main(["package", str(wrong), "--out", str(tmp_path / "never")]) == 1
    assert f"{wrong / 'models' / 'model.pt'}: these weights do not fit" in caplog.text and "valid_cnn3d" in caplog.text
    assert not (tmp_path / "never").exists()


def test_a_run_kept_inside_the_source_bundle_is_not_copied(run, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(BUNDLE, src, ignore=shutil.ignore_patterns("models", "eval"))
    inner = _run_copy(run, src / "runs" / "r1")
    assert main(["package", str(inner), "--out", str(src / "packaged"), "--bundle", str(src)]) == 2  # inside SRC
    assert main(["package", str(inner), "--out", str(tmp_path / "out"), "--bundle", str(src)]) == 0
    assert (tmp_path / "out" / "runs").is_dir() and not (tmp_path / "out" / "runs" / "r1").exists()
    assert (tmp_path / "out" / "models" / "model.pt").is_file()
