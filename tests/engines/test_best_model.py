"""Unit tests of :class:`volcnn.engines.best_model.BestModelSaver` on a tiny CPU trainer wired like the bundle."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.engines import training_setup as ts
from volcnn.engines.best_model import BestModelSaver
from volcnn.engines.checkpoint import load_training_checkpoint

KEY = ts.KEY


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        BestModelSaver(tmp_path, ts.net(), mode="maximum")


@pytest.mark.parametrize(("mode", "values"), [("max", [0.5, 0.8, 0.6]), ("min", [0.5, 0.2, 0.4])])
def test_best_model_follows_the_key_metric(tmp_path, mode, values):
    run = ts.setup(tmp_path, max_epochs=3, values=values, mode=mode, keep_last=3)
    run.trainer.run()
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ts.equal(best, run.weights[2])
    assert not ts.equal(best, run.weights[3])
    info = json.loads((tmp_path / "best.json").read_text())
    assert info == {"epoch": 2, "metric": KEY, "value": values[1], "file": "model.pt"}
    state = load_training_checkpoint(tmp_path / ts.ckpt_name(3))["state"]["best_model"]
    history = [{"epoch": e, KEY: v} for e, v in enumerate(values, start=1)]
    assert state == {"metric": KEY, "value": values[1], "epoch": 2, "history": history}


def test_improvement_smaller_than_min_delta_does_not_count(tmp_path):
    run = ts.setup(tmp_path, max_epochs=3, values=[0.5, 0.505, 0.7], min_delta=0.01)
    run.trainer.run()
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 3
    run = ts.setup(tmp_path / "b", max_epochs=2, values=[0.5, 0.505], min_delta=0.01)
    run.trainer.run()
    assert json.loads((tmp_path / "b" / "best.json").read_text())["epoch"] == 1
    assert ts.equal(torch.load(tmp_path / "b" / "model.pt", weights_only=True), run.weights[1])


def test_undefined_metric_keeps_the_latest_weights_until_one_is_defined(tmp_path, caplog):
    run = ts.setup(tmp_path, max_epochs=3, values=[float("nan"), float("nan"), 0.6])
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.best_model"):
        run.trainer.run()
    assert caplog.text.count("is undefined") == 2
    assert json.loads((tmp_path / "best.json").read_text())["value"] == 0.6
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[3])


def test_undefined_metric_after_a_best_keeps_the_best(tmp_path):
    run = ts.setup(tmp_path, max_epochs=3, values=[0.5, float("nan"), 0.4])
    run.trainer.run()
    assert json.loads((tmp_path / "best.json").read_text()) == {"epoch": 1, "metric": KEY, "value": 0.5,
                                                                 "file": "model.pt"}  # fmt: skip
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[1])
    assert run.best.history == [{"epoch": 1, KEY: 0.5}, {"epoch": 2}, {"epoch": 3, KEY: 0.4}]


def test_validation_every_second_epoch(tmp_path):
    """Epochs without validation are recorded without a metric and never replace the best weights."""
    run = ts.setup(tmp_path, max_epochs=4, values=[0.0, 0.8, 0.0, 0.7], every=2)
    run.trainer.run()
    assert run.best.history == [{"epoch": 1}, {"epoch": 2, KEY: 0.8}, {"epoch": 3}, {"epoch": 4, KEY: 0.7}]
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[2])


def test_state_survives_a_resume(tmp_path):
    """The best value is restored from the checkpoint: a later worse epoch does not overwrite model.pt."""
    values = [0.5, 0.8, 0.6, 0.7]
    first = ts.setup(tmp_path, max_epochs=2, values=values)
    first.trainer.run()
    again = ts.setup(tmp_path, max_epochs=4, values=values, init_seed=1)
    assert again.ckpt.resume() is False
    assert (again.best.best_value, again.best.best_epoch) == (0.8, 2)
    again.trainer.run()
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), first.weights[2])
    assert [r["epoch"] for r in again.best.history] == [1, 2, 3, 4]


def test_only_rank0_writes(tmp_path, monkeypatch):
    import volcnn.engines.best_model as best_mod

    monkeypatch.setattr(best_mod, "is_rank0", lambda: False)
    run = ts.setup(tmp_path, max_epochs=2, values=[0.5, 0.8])
    run.trainer.run()
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "best.json").exists()
    assert (run.best.best_value, run.best.best_epoch) == (0.8, 2)  # every rank tracks the best


@pytest.mark.parametrize(("latest_on_tie", "epoch"), [(True, 4), (False, 2)])
def test_a_tie_keeps_the_later_epoch_when_asked(tmp_path, latest_on_tie, epoch):
    """A saturated metric (validation AUC 1.0 from epoch 2 on): the later epoch's weights when asked for."""
    run = ts.setup(tmp_path, max_epochs=4, values=[0.9, 1.0, 0.95, 1.0], keep_last=4)
    run.best.latest_on_tie = latest_on_tie
    run.trainer.run()
    assert json.loads((tmp_path / "best.json").read_text()) == {"epoch": epoch, "metric": KEY, "value": 1.0,
                                                                 "file": "model.pt"}  # fmt: skip
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[epoch])
