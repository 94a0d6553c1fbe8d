"""Exact resume of the bundle's training: in process (terminate + resume) and across SIGKILLs at random points.

The acceptance check of the training issue: a run killed with SIGKILL at several random moments and resumed
each time ends with weights equal bit for bit to an uninterrupted run (CPU, deterministic mode).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from volcnn.data import synthesize_cohort
from volcnn.engines import load_training_checkpoint

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"
EPOCHS = 5
TINY = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "amp": False, "max_epochs": EPOCHS, "seed": 7, "deterministic": True,
        "learning_rate": 0.003, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_cohort")
    synthesize_cohort(out, cases=6, seed=11, size="tiny", negatives=6)
    return out


def _overrides(cohort: Path, out: Path, **extra) -> dict:
    return {"dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"), "output_dir": str(out),
            **TINY, **extra}  # fmt: skip


def _workflow(cohort: Path, out: Path, **extra) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(TRAIN), workflow_type=None, run_id="training", **_overrides(cohort, out, **extra)
    )
    wf.initialize()
    return wf


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    path = out / "models" / f"checkpoint_epoch{EPOCHS:04d}.pt"
    return load_training_checkpoint(path)["state"]["model"]


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different}"


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    """An uninterrupted run, in process."""
    out = tmp_path_factory.mktemp("reference")
    wf = _workflow(cohort, out)
    wf.run()
    return out


def test_terminate_and_resume_in_process_is_bit_exact(cohort, reference, tmp_path):
    wf = _workflow(cohort, tmp_path)
    trainer = wf.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())
    wf.run()
    ckpts = sorted(p.name for p in (tmp_path / "models").glob("checkpoint_epoch*.pt"))
    assert ckpts == ["checkpoint_epoch0001.pt", "checkpoint_epoch0002.pt"]

    wf2 = _workflow(cohort, tmp_path, resume=True)
    wf2.run()
    trainer2 = wf2.parser.get_parsed_content("train#trainer")
    assert trainer2.state.epoch == EPOCHS
    _assert_bit_equal(_final_state(reference), _final_state(tmp_path))
    # the last N=2 full checkpoints are kept, plus the best weights
    kept = sorted(p.name for p in (tmp_path / "models").glob("checkpoint_epoch*.pt"))
    assert kept == [f"checkpoint_epoch{EPOCHS - 1:04d}.pt", f"checkpoint_epoch{EPOCHS:04d}.pt"]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_resume_of_a_finished_run_does_nothing(cohort, reference):
    before = {p.name: p.stat().st_mtime_ns for p in (reference / "models").iterdir()}
    wf = _workflow(cohort, reference, resume=True)
    wf.run()
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 0  # it did not start over
    after = {p.name: p.stat().st_mtime_ns for p in (reference / "models").iterdir()}
    assert before == after


def _bundle_cmd(cohort: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    for key, value in _overrides(cohort, out, resume=resume).items():
        text = str(value).replace(" ", "") if isinstance(value, list) else str(value).lower() if isinstance(
            value, bool) else str(value)  # fmt: skip
        cmd += [f"--{key}", text]
    return cmd


def test_sigkill_at_random_points_then_resume_is_bit_exact(cohort, reference, tmp_path):
    """Kill the bundle's training process with SIGKILL three times at random moments (each after it has made
    progress, so kills land anywhere in an epoch: mid-batch, mid-validation, mid-checkpoint-write), resuming
    with ``--resume true`` each time; the final weights equal the uninterrupted run's bit for bit."""
    rng = random.Random(int(os.environ.get("VOLCNN_KILL_SEED", "20261121")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    models = tmp_path / "models"
    kills = []
    for _ in range(3):
        before = {p.name for p in models.glob("checkpoint_epoch*.pt")} if models.is_dir() else set()
        proc = subprocess.Popen(_bundle_cmd(cohort, tmp_path, resume=True), cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            now = {p.name for p in models.glob("checkpoint_epoch*.pt")} if models.is_dir() else set()
            if now - before:  # it has written a new checkpoint: kill somewhere in the next epoch
                break
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(round(delay, 2))
        proc.wait(timeout=60)
    assert kills, "the run finished before any kill landed; the kill test did not test anything"
    done = subprocess.run(_bundle_cmd(cohort, tmp_path, resume=True), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_bit_equal(_final_state(reference), _final_state(tmp_path))
    assert not list(models.glob(".*")), "a temporary checkpoint file was left behind"
