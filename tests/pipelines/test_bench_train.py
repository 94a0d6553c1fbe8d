"""The training benchmark compares what it says it compares: the bundle's data path vs the naive one, same model."""

from __future__ import annotations

import statistics

import pytest

from pipelines import bench_train
from volcnn.data import synthesize_cohort


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_train")
    synthesize_cohort(root / "data", cases=4, seed=3, size="tiny", negatives=6)
    configs = (("bundle", "fp32"), ("naive", "fp32"))
    setup = bench_train.TrainSetup(patch=32, margin=4, batch=4, epochs=3)
    return bench_train.run(root / "data", root / "work", setup, naive_epochs=2, naive_workers=0, configs=configs)


def test_each_path_is_measured_with_its_own_loader(summary):
    by = {r["path"]: r for r in summary["results"]}
    assert by["bundle"]["loader"] == "ThreadDataLoader"
    assert by["naive"]["loader"] == "DataLoader"
    assert [e["epoch"] for e in by["bundle"]["epochs"]] == [1, 2, 3]
    assert [e["epoch"] for e in by["naive"]["epochs"]] == [1, 2]
    # both paths see the same training set: the same number of patches per epoch
    assert {e["samples"] for e in by["bundle"]["epochs"]} == {e["samples"] for e in by["naive"]["epochs"]}


def test_ratios_are_the_measured_ones(summary):
    by = {r["path"]: r for r in summary["results"]}
    assert summary["epoch_speedup_vs_naive"] == pytest.approx(by["naive"]["epoch_s"] / by["bundle"]["epoch_s"])
    assert summary["data_wait_fraction"] == by["bundle"]["data_wait_fraction"]
    for r in summary["results"]:
        timed = [e for e in r["epochs"] if e["epoch"] > 1]
        assert r["epoch_s"] == pytest.approx(statistics.median(e["seconds"] for e in timed))
        assert 0.0 <= r["data_wait_fraction"] < 1.0
        assert 0.0 <= r["prepare_fraction"] < 1.0
        assert r["samples_per_s"] > 0


def test_naive_path_loads_every_volume_every_epoch(summary):
    """The naive path reads and resamples a whole CT per patch, so it waits for data far more than the bundle's."""
    by = {r["path"]: r for r in summary["results"]}
    assert by["naive"]["data_wait_fraction"] > by["bundle"]["data_wait_fraction"]
    assert summary["epoch_speedup_vs_naive"] > 1.0


def test_table_prints_every_configuration(summary):
    text = bench_train.table(summary)
    assert "epoch speed-up vs naive" in text
    assert text.count("\n") >= 1 + len(summary["results"])
