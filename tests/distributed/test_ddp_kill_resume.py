"""Exact resume of DDP training (two gloo processes under torchrun) after the whole node is SIGKILLed.

The DDP analogue of ``tests/engines/test_resume.py::test_sigkill_at_random_points_then_resume_is_bit_exact``:
torchrun (the elastic agent and both workers) is killed with SIGKILL at random moments, each time soon after a
new checkpoint appeared, and resumed with ``--resume true``; the run then ends with weights equal bit for bit to
an uninterrupted run. Each rank draws its own augmentations (``seed + rank``), so this also checks that every
rank resumes its *own* random streams, not rank 0's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.torchrun_output import failure_report
from volcnn.data import synthesize_cohort
from volcnn.engines import load_training_checkpoint

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc"),
]

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
EPOCHS = 6
KILLS = 2
# device is left to the overlay (cpu + gloo here); augmentation stays on (train#augmentation, BatchRandAugment)
SETTINGS: dict[str, object] = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4,
            "amp": False, "progress": False, "deterministic": True, "seed": 7, "max_epochs": EPOCHS}  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kill_cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


def _torchrun_cmd(cohort: Path, out: Path, resume: bool) -> list[str]:
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    args = ["--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist.json"), "--output_dir", str(out),
            "--resume", str(resume).lower()]  # fmt: skip
    for key, value in SETTINGS.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]  # lists as JSON, bools as true
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "monai.bundle", "run", "training", "--config_file", configs, *args]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _checkpoints(models: Path) -> set[str]:
    return {p.name for p in models.glob("checkpoint_epoch*.pt")} if models.is_dir() else set()


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_training_checkpoint(out / "models" / f"checkpoint_epoch{EPOCHS:04d}.pt")["state"]["model"]


def _epoch_seconds(out: Path) -> float:
    """How long an epoch (training, validation, checkpoint) took in a finished run: the time between its last two
    checkpoints (``keep_last`` is 2), within [0.2, 5] s."""
    last, previous = (out / "models" / f"checkpoint_epoch{e:04d}.pt" for e in (EPOCHS, EPOCHS - 1))
    return min(max(last.stat().st_mtime - previous.stat().st_mtime, 0.2), 5.0)


def _proc_table() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, state letter)`` of every process, from ``/proc/<pid>/stat``."""
    table: dict[int, tuple[int, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> list[int]:
    table = _proc_table()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += children
        todo += children
    return found


def _alive(pids: list[int]) -> list[int]:
    table = _proc_table()
    return [p for p in pids if p in table and table[p][1] not in "ZX"]  # zombies are dead, only not yet reaped


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers, as a dying node would. The agent runs in its own session
    (``start_new_session=True``), but torch's elastic agent starts every worker in a session of its own too, so
    ``os.killpg`` of the agent's group alone would leave the workers training (and writing checkpoints)."""
    workers = _descendants(proc.pid)
    for pgid in [proc.pid, *workers]:  # the agent first, so it cannot react to its workers dying
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(workers), f"torchrun workers {_alive(workers)} survived the SIGKILL"


@pytest.fixture(scope="module")
def reference(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted DDP run."""
    out = tmp_path_factory.mktemp("ddp_reference")
    done = subprocess.run(_torchrun_cmd(cohort, out, resume=False), cwd=out, env=_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, failure_report(done)
    return out


def test_ddp_sigkill_of_the_node_at_random_points_then_resume_is_bit_exact(
    cohort: Path, reference: Path, tmp_path: Path
) -> None:
    """Kill the whole torchrun process tree (agent + both ranks) with SIGKILL ``KILLS`` times, each at a random
    moment within an epoch's time after a new checkpoint appeared (mid-batch, mid-validation, mid-write), resume with
    ``--resume true`` each time, then let the run finish: the final checkpoint's model state equals the
    uninterrupted DDP run's bit for bit, and no temporary file is left in ``models/``."""
    rng = random.Random(int(os.environ.get("VOLCNN_KILL_SEED", "20261121")))
    epoch = _epoch_seconds(reference)  # kills land in the epoch after the new checkpoint, rarely the next one
    models = tmp_path / "models"
    kills: list[tuple[str, float]] = []
    for _ in range(KILLS):
        before = _checkpoints(models)
        proc = subprocess.Popen(_torchrun_cmd(cohort, tmp_path, resume=True), cwd=tmp_path, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None and not _checkpoints(models) - before:
                time.sleep(0.05)
            new = sorted(_checkpoints(models) - before)
            delay = rng.uniform(0.0, epoch)
            time.sleep(delay)
            if proc.poll() is None:
                _kill_node(proc)
                kills.append((new[-1] if new else "none", round(delay, 2)))
        finally:
            if proc.poll() is None:  # a failed assertion above: do not leave a run training
                _kill_node(proc)
        assert proc.returncode in (0, -signal.SIGKILL), f"torchrun failed (exit {proc.returncode}) before the kill"
    assert len(kills) == KILLS, f"the run finished before every kill landed (kills: {kills})"
    assert len(_checkpoints(models)) >= 1 and f"checkpoint_epoch{EPOCHS:04d}.pt" not in _checkpoints(models)

    done = subprocess.run(_torchrun_cmd(cohort, tmp_path, resume=True), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, failure_report(done)
    assert "resumed from" in done.stdout + done.stderr, "the last run did not resume from a checkpoint"
    ref, got = _final_state(reference), _final_state(tmp_path)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"tensors differ from the uninterrupted run after kills {kills}: {different}"
    assert not list(models.glob(".*")), "a temporary checkpoint file was left behind"
