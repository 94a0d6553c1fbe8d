"""The bundle trains and evaluates through ``python -m monai.bundle`` on any datalist in the DESIGN format."""

from __future__ import annotations

import json
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
                 "--learning_rate", "0.001", "--num_classes", "2"]  # fmt: skip
    _ok(_bundle(["training", "--config_file", str(CONFIGS / "train.json"), *common, *SMALL, *overrides], tmp_path))
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("classifier") for k in state)  # a seed_cnn3d state dict
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
    _ok(_bundle(["--config_file", configs, *common, *SMALL], tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    n_test = len(json.loads((cohort / "datalist.json").read_text())["test"])
    assert metrics["section"] == "test" and metrics["num_samples"] == n_test
    assert "val_auc" in metrics["metrics"]


def test_volume_mode_runs_with_run_alias(cohort, tmp_path):
    out = tmp_path / "vol"
    args = ["--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort), "--output_dir", str(out),
            "--datalist", str(cohort / "datalist_volume.json"), *SMALL]  # fmt: skip
    _ok(_bundle(args, tmp_path))  # no run id: "run" is an alias of "training"
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch0001.pt").is_file()


def test_dicom_series_datalist_trains(cohort, tmp_path):
    out = tmp_path / "dcm"
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(out), "--datalist", str(cohort / "datalist_dicom.json"), *SMALL]  # fmt: skip
    _ok(_bundle(args, tmp_path))
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "checkpoint_epoch0001.pt").is_file()


def test_bad_bool_option_is_refused(cohort, tmp_path):
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--output_dir", str(tmp_path / "x"), *SMALL[:-4], "--amp", "maybe", "--max_epochs", "1"]  # fmt: skip
    result = _bundle(args, tmp_path)
    assert result.returncode != 0 and "expected a boolean" in result.stderr


def test_bad_scan_fails_training_with_the_readers_message(cohort, tmp_path):
    """Training loads through the same validated reader as ingest and inference: a truncated scan is refused at
    load with the reader's message naming the file, not as a shape error inside the network."""
    data = json.loads((cohort / "datalist.json").read_text())
    good = cohort / data["training"][0]["image"]
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[:2000])
    data["training"][0]["image"] = str(bad)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(data))
    args = ["training", "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(cohort),
            "--datalist", str(datalist), "--output_dir", str(tmp_path / "o"), *SMALL]  # fmt: skip
    result = _bundle(args, tmp_path)
    assert result.returncode != 0
    assert f"{bad}: cannot read NIfTI" in result.stdout + result.stderr
