"""DDP training on CPU (gloo, two processes under torchrun) with the bundle's ``multi_gpu_train.json`` overlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.torchrun_output import failure_report
from volcnn.data import synthesize_cohort

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
SMALL = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "amp": False,
         "progress": False, "device": "cpu"}  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


def _bundle_args(cohort: Path, out: Path, **extra: object) -> list[str]:
    args = ["--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist.json"), "--output_dir", str(out)]
    for key, value in {**SMALL, **extra}.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _torchrun(cohort: Path, out: Path, epochs: int, resume: bool = False) -> subprocess.CompletedProcess:
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    args = _bundle_args(cohort, out, max_epochs=epochs, resume=resume)
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee=3",
                 "-m", "monai.bundle", "run", "training", "--config_file", configs, *args])  # fmt: skip


def _single_process_val_auc(cohort: Path, weights: Path) -> float:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"), **SMALL})
    parser.parse()
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    return float(evaluator.state.metrics["val_auc"])


@pytest.fixture(scope="module")
def ddp_run(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    done = _torchrun(cohort, out, epochs=2)
    assert done.returncode == 0, failure_report(done)
    (out / "torchrun.log").write_text(done.stdout + done.stderr)
    return out


def test_validation_auc_is_over_the_whole_set_and_matches_the_saved_weights(cohort, ddp_run):
    """The AUC the two ranks computed (each on its shard, gathered) equals one process evaluating model.pt on
    the whole validation set: the metric is gathered, not averaged, and describes the weights rank 0 saved."""
    best = json.loads((ddp_run / "models" / "best.json").read_text())
    single = _single_process_val_auc(cohort, ddp_run / "models" / best["file"])
    assert best["value"] == pytest.approx(single, abs=1e-9)


def test_rank0_writes_plain_state_dicts(ddp_run):
    state = torch.load(ddp_run / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)  # loadable without DDP
    assert sorted(p.name for p in (ddp_run / "models").glob("checkpoint_epoch*.pt")) == [
        "checkpoint_epoch0001.pt", "checkpoint_epoch0002.pt"]  # fmt: skip


def test_only_rank0_logs_progress_and_metrics(ddp_run):
    """``--tee 3`` prefixes each worker's lines with ``[default<rank>]``: after MONAI's own preamble (its input
    summary, printed before the bundle's ``initialize``), rank 1 prints neither INFO records (epoch metrics,
    checkpoints, class counts) nor cache-filling progress bars; rank 0 prints both."""
    log = (ddp_run / "torchrun.log").read_text()
    rank1 = [line for line in log.splitlines() if line.startswith("[default1]")]
    preamble = ("Setting logging properties", "input summary", " - INFO - > ", " - INFO - ---")
    chatter = [line for line in rank1 if (" - INFO - " in line and not any(p in line for p in preamble))
               or "Loading dataset" in line]  # fmt: skip
    assert not chatter, chatter[:20]
    rank0 = "\n".join(line for line in log.splitlines() if line.startswith("[default0]"))
    assert "Metrics -- val_auc" in rank0 and "Loading dataset" in rank0


def test_resume_under_ddp_continues_from_the_last_checkpoint(cohort, ddp_run, tmp_path):
    out = tmp_path / "resumed"
    (out / "models").mkdir(parents=True)
    first = ddp_run / "models" / "checkpoint_epoch0001.pt"
    (out / "models" / first.name).write_bytes(first.read_bytes())
    done = _torchrun(cohort, out, epochs=2, resume=True)
    assert done.returncode == 0, failure_report(done)
    assert (out / "models" / "checkpoint_epoch0002.pt").is_file()
    assert not (out / "models" / "checkpoint_epoch0003.pt").exists()
    log = done.stdout + done.stderr
    assert "epoch 2" in log.lower()


def test_distributed_evaluation_writes_what_one_process_writes(cohort, ddp_run, tmp_path):
    """``multi_gpu_evaluate.json``: two ranks evaluate their blocks of the test (and threshold) sections; the gathered
    metrics and per-case predictions equal a single-process evaluation of the same weights, row for row."""
    outs = {}
    for name, overlay in (("single", []), ("ddp", ["multi_gpu_evaluate.json"])):
        out = tmp_path / name
        (out / "models").mkdir(parents=True)
        (out / "models" / "model.pt").write_bytes((ddp_run / "models" / "model.pt").read_bytes())
        configs = str([str(CONFIGS / c) for c in ["train.json", "evaluate.json", *overlay]])
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if overlay else []
        done = _run([sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", configs,
                     *_bundle_args(cohort, out, n_boot=50)])  # fmt: skip
        assert done.returncode == 0, failure_report(done)
        outs[name] = out
    single, ddp = (json.loads((outs[n] / "metrics.json").read_text()) for n in ("single", "ddp"))
    assert ddp["num_samples"] == single["num_samples"] > 0
    # the ranks' batches differ from one process's, so a probability may differ in its last float32 bit (6e-8
    # measured): rank-based metrics are equal, the calibration fitted on those probabilities equal to 1e-5
    calibration = {n: m["metrics"].pop("calibration") for n, m in (("single", single), ("ddp", ddp))}
    assert calibration["ddp"].keys() == calibration["single"].keys()
    for key, value in calibration["single"].items():
        assert calibration["ddp"][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    assert ddp["metrics"] == single["metrics"]  # AUC, its bootstrap CI, threshold, confusion matrix, ECE...
    rows = [(outs[n] / "predictions.csv").read_text().splitlines() for n in ("single", "ddp")]
    assert rows[0] == rows[1]
