"""The bundle trains and evaluates through ``python -m monai.bundle`` on any datalist in the DESIGN format."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volcnn.data import synthesize_cohort

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
SMALL = ["--network_def", "seed_cnn3d", "--patch_size", "[16,16,16]", "--margin", "2", "--batch_size", "4",
         "--num_workers", "0", "--amp", "false", "--max_epochs", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=5, seed=3, size="tiny", dicom=True)
    return out


def _bundle(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_candidate_mode_trains_then_evaluates(cohort, tmp_path):
    out = tmp_path / "run"
    common = ["--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist.json"), "--output_dir", str(out)]
    overrides = ["--device", "cpu", "--pixdim", "[1.5,1.5,1.5]", "--hu_window", "[-1000,500]", "--seed", "1",
                 "--learning_rate", "0.001", "--num_classes", "2", "--max_epochs", "2"]  # fmt: skip
    _ok(_bundle(["training", "--config_file", str(CONFIGS / "train.json"), *common, *SMALL, *overrides], tmp_path))
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("classifier") for k in state)  # a seed_cnn3d state dict
    _check_tensorboard(out / "tensorboard", epochs=2)

    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
    _ok(_bundle(["--config_file", configs, *common, *SMALL], tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = len(json.loads((cohort / "datalist.json").read_text())["test"])
    assert metrics["section"] == "test" and metrics["num_samples"] == n_test
    m = metrics["metrics"]
    # the report's AUC agrees with the engine's val_auc (volcnn.engines.RocAuc) of the same evaluation
    assert m["auc"] == pytest.approx(metrics["engine_metrics"]["val_auc"], abs=1e-9)
    assert m["tp"] + m["fn"] == m["num_positive"] and m["tn"] + m["fp"] == m["num_negative"]
    assert m["threshold_source"] == "validation (Youden)"
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_test and "patient" not in rows[0]
    test_entries = json.loads((cohort / "datalist.json").read_text())["test"]
    assert [r["image"] for r in rows] == [e["image"] for e in test_entries]  # the datalist's relative paths
    assert sum(int(r["predicted"]) == 1 and int(r["label"]) == 1 for r in rows) == m["tp"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "https://" not in html and "http://" not in html
    for png in ("roc.png", "confusion.png", "calibration.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")


def _check_tensorboard(log_dir: Path, epochs: int) -> None:
    """The run's event files read back with TensorBoard's EventAccumulator hold the scalars and images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss_epoch", "train/lr/group_0", "train/samples_per_s", "train/train_auc", "val/val_auc"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, epochs + 1)), tag
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
    assert acc.Scalars("train/lr/group_0")[0].value == pytest.approx(0.001)
    assert "val/patches" in tags["images"] and len(acc.Images("val/patches")) == epochs


def test_volume_mode_runs_with_run_alias(cohort, tmp_path):
    out = tmp_path / "vol"
    args = ["--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort), "--output_dir", str(out),
            "--datalist", str(cohort / "datalist_volume.json"), *SMALL]  # fmt: skip
    _ok(_bundle(args, tmp_path))  # no run id: "run" is an alias of "training"
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch0001.pt").is_file()


def test_dicom_series_datalist_trains(cohort, tmp_path):
    """Also runs with class-balanced sampling (instead of loss weights)."""
    out = tmp_path / "dcm"
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(out), "--datalist", str(cohort / "datalist_dicom.json"), *SMALL,
            "--sampling", "balanced", "--class_weighting", "none"]  # fmt: skip
    result = _bundle(args, tmp_path)
    _ok(result)
    assert "balanced sampling draws about" in result.stdout + result.stderr
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch0001.pt").is_file()


def test_bad_bool_option_is_refused(cohort, tmp_path):
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(tmp_path / "x"), *SMALL[:-4], "--amp", "maybe", "--max_epochs", "1"]  # fmt: skip
    result = _bundle(args, tmp_path)
    assert result.returncode != 0 and "expected a boolean" in result.stderr


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_bad_scan_fails_training_with_the_readers_message(cohort, tmp_path, cache):
    """Training loads through the same validated reader as ingest and inference: a truncated scan is refused at
    load with the reader's message naming the file, not as a shape error inside the network. With the disk cache
    the scan is first read inside the loader's thread during the epoch: the error must still stop the run (MONAI's
    ThreadDataLoader ended the epoch early instead and training went on)."""
    data = json.loads((cohort / "datalist.json").read_text())
    good = cohort / data["training"][0]["image"]
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[:2000])
    data["training"][0]["image"] = str(bad)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(data))
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--datalist", str(datalist), "--output_dir", str(tmp_path / "o"), *SMALL, "--cache", cache]  # fmt: skip
    result = _bundle(args, tmp_path)
    assert result.returncode != 0
    assert f"{bad}: cannot read NIfTI" in result.stdout + result.stderr


def test_nan_loss_exits_non_zero_and_keeps_the_last_good_checkpoint(cohort, tmp_path):
    """A loss that turns NaN at the first batch of epoch 2 stops training with a message naming the epoch and
    iteration; the process exits non-zero and the epoch-1 checkpoint stays loadable."""
    n = len(json.loads((cohort / "datalist.json").read_text())["training"])
    epoch_length = n // 4 if n > 4 else 1  # batch_size 4, drop_last when there is more than one batch
    out = tmp_path / "nan"
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(out), *SMALL, "--max_epochs", "3",
            "--loss#_target_", "tests.engines.nan_loss.NaNAfterLoss", "--loss#after", str(epoch_length)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode != 0
    expected = f"training loss is nan at epoch 2, iteration {epoch_length + 1} (batch 1 of {epoch_length}"
    assert expected in result.stderr, result.stderr[-3000:]
    assert "last good checkpoint" in result.stderr and "checkpoint_epoch0001.pt" in result.stderr
    assert sorted(p.name for p in (out / "models").glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch0001.pt"]
    ckpt = torch.load(out / "models" / "checkpoint_epoch0001.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["state"]["model"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bundle_trains_with_cuda_amp(cohort, tmp_path, dtype):
    out = tmp_path / dtype
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(out), *SMALL[:-4], "--device", "cuda", "--amp", "true", "--amp_dtype", dtype,
            "--max_epochs", "2"]  # fmt: skip
    result = _bundle(args, tmp_path)
    _ok(result)
    assert f"training precision: {dtype} autocast on cuda" in result.stdout + result.stderr
    ckpt = torch.load(out / "models" / "checkpoint_epoch0002.pt", map_location="cpu", weights_only=True)
    assert ("scaler" in ckpt["state"]) == (dtype == "float16")


def test_channels_last_option_puts_weights_and_batches_in_channels_last(cohort, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"), "device": "cpu",
                   "output_dir": str(tmp_path / "o"), "network_def": "valid_cnn3d", "patch_size": [32, 32, 32],
                   "margin": 2, "batch_size": 2})  # fmt: skip
    for flag in (True, False):
        parser["channels_last"] = flag
        parser.parse(reset=True)
        net = parser.get_parsed_content("network")
        # with one input channel both layouts are contiguous; the other convolutions tell them apart
        weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1]
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) == flag for w in weights)
        prepare = parser.get_parsed_content("train#prepare_batch")
        batch = {"image": torch.rand(2, 1, 36, 36, 36), "label": torch.tensor([0, 1])}
        image, _ = prepare(batch, torch.device("cpu"))
        assert image.shape == (2, 1, 32, 32, 32)  # one channel: both layouts are the same strides
        logits = net(image)
        assert logits.shape == (2, 2)
