"""The scaling benchmark measures what it says: a real two-process torchrun world, samples counted over all ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipelines import bench_scaling
from pipelines.bench_train import TrainSetup
from volcnn.data import synthesize_cohort

BATCH = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


@pytest.mark.dist
def test_two_process_worker_counts_every_rank(cohort, tmp_path):
    """One real measurement: torchrun with 2 gloo processes of 1 thread; rank 0's JSON covers both ranks."""
    setup = TrainSetup(network="seed_cnn3d", patch=16, margin=2, batch=BATCH, epochs=2)
    result = bench_scaling._launch(2, 1, cohort, tmp_path / "run", setup)
    assert (result["processes"], result["backend"], result["device"]) == (2, "gloo", "cpu")
    assert result["threads_per_process"] == 1
    assert result["exit_code"] == 0
    assert result["global_batch"] == 2 * BATCH
    training = json.loads((cohort / "datalist.json").read_text())["training"]
    steps = math.ceil(len(training) / 2) // BATCH  # each rank's padded half, whole batches only
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    for e in result["epochs"]:
        assert e["steps_per_rank"] == steps
        assert e["samples"] == 2 * steps * BATCH  # both ranks' samples, not rank 0's alone
        assert e["samples_per_s"] == pytest.approx(e["samples"] / e["seconds"])
        assert 0.0 <= e["data_wait_fraction"] < 1.0
    assert result["samples_per_s"] == result["epochs"][1]["samples_per_s"]  # the first epoch is not timed
    assert result["wall_s"] > result["first_epoch_s"] + result["epoch_s"]


def _fake(procs: int, threads: int, samples_per_s: float) -> dict[str, Any]:
    epochs = [{"epoch": 1, "seconds": 1.0, "samples": 8.0, "steps_per_rank": 2.0, "samples_per_s": 8.0,
               "data_wait_fraction": 0.0}]  # fmt: skip
    return {"processes": procs, "threads_per_process": threads, "samples_per_s": samples_per_s, "epoch_s": 1.0,
            "epochs": epochs, "data_wait_fraction": 0.01}  # fmt: skip


def test_run_alternates_counts_splits_cores_and_takes_medians(monkeypatch, tmp_path):
    calls: list[tuple[int, int]] = []
    speeds = {1: iter([10.0, 30.0, 20.0]), 2: iter([50.0, 34.0, 36.0])}

    def launch(procs: int, threads: int, *args: Any) -> dict[str, Any]:
        calls.append((procs, threads))
        return _fake(procs, threads, next(speeds[procs]))

    monkeypatch.setattr(bench_scaling, "_launch", launch)
    monkeypatch.setattr(bench_scaling, "cpu_cores", lambda: 2)
    summary = bench_scaling.run(tmp_path, tmp_path, repeats=3)
    assert calls == [(1, 2), (2, 1)] * 3  # same cores for both; interleaved so that load drifts hit both
    assert summary["ddp_samples_per_s_1proc"] == 20.0
    assert summary["ddp_samples_per_s_2proc"] == 36.0
    assert summary["ddp_scaling_ratio"] == pytest.approx(1.8)
    assert summary["ddp_scaling_efficiency"] == pytest.approx(0.9)
    json.dumps(summary)
    text = bench_scaling.table(summary)
    assert "1.80x" in text and "90%" in text


def test_more_processes_than_cores_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_scaling, "cpu_cores", lambda: 2)
    with pytest.raises(ValueError, match="cores"):
        bench_scaling.run(tmp_path, tmp_path, procs=3)
