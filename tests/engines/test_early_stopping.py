"""Unit tests of :class:`volcnn.engines.early_stopping.ValidationEarlyStopping` (Ignite's ``EarlyStopping`` with
patience in epochs): when a run stops, with ``val_interval`` > 1 and undefined metrics, and what a checkpoint keeps."""

from __future__ import annotations

import json
import math

import pytest
from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

from tests.engines import training_setup as ts
from volcnn.engines.checkpoint import load_training_checkpoint
from volcnn.engines.early_stopping import ValidationEarlyStopping

KEY = ts.KEY
NAN = float("nan")


def _format1_stop_epoch(values: list[float], every: int, patience: int, mode: str, min_delta: float) -> int:
    """When the format-1 ``TrainingCheckpointer`` (before early stopping was Ignite's) stopped a run: its rule,
    copied. The last epoch when it ran to the end."""
    best_value: float | None = None
    best_epoch = 0
    for epoch, v in enumerate(values, start=1):
        value = v if epoch % every == 0 and math.isfinite(v) else None
        improved = value is not None and (
            best_value is None or (value > best_value + min_delta if mode == "max" else value < best_value - min_delta)
        )
        if improved:
            best_value, best_epoch = value, epoch
        elif value is None and best_value is None:
            best_epoch = epoch
        if value is not None and epoch - best_epoch >= patience:
            return epoch
    return len(values)


def _stop_epoch(values: list[float], every: int, patience: int, mode: str = "max", min_delta: float = 0.0) -> int:
    """Run a bare Ignite engine with a fake validator and the early stopping; the epoch it ended at."""
    engine = Engine(lambda e, b: None)
    validator = ts.FakeValidator(values, every)
    engine.add_event_handler(Events.EPOCH_COMPLETED, validator)
    ValidationEarlyStopping(patience, validator, KEY, mode=mode, min_delta=min_delta).attach(engine)
    engine.run([0], max_epochs=len(values))
    return engine.state.epoch


CASES = [
    # values, val_interval, patience, mode, min_delta
    ([0.5, 0.8, 0.6, 0.9, 0.95], 1, 1, "max", 0.0),
    ([0.5, 0.8, 0.6, 0.7, 0.9], 1, 2, "max", 0.0),
    ([0.5, 0.8, 0.6, 0.7, 0.75, 0.9], 1, 3, "max", 0.0),
    ([0.5, 0.2, 0.4, 0.3, 0.1, 0.6], 1, 2, "min", 0.0),
    ([0.5, 0.505, 0.51, 0.7, 0.6], 1, 2, "max", 0.01),  # small gains do not add up
    ([0.0, 0.8, 0.0, 0.7, 0.0, 0.9], 2, 2, "max", 0.0),  # stops at the first validation 2 epochs after the best
    ([0.0, 0.8, 0.0, 0.7, 0.0, 0.6, 0.0, 0.5], 2, 3, "max", 0.0),  # 3 epochs: the second validation after the best
    ([0.0, 0.0, 0.8, 0.0, 0.0, 0.7, 0.0, 0.0, 0.6], 3, 2, "max", 0.0),
    ([0.5, 0.8, NAN, NAN, NAN, 0.9], 1, 2, "max", 0.0),  # undefined epochs count but never stop
    ([0.5, 0.8, NAN, NAN, 0.6, 0.9], 1, 3, "max", 0.0),  # ... so the next defined one can
    ([NAN, NAN, 0.5, 0.4, 0.3, 0.2], 1, 2, "max", 0.0),  # nothing counts before the first defined value
    ([0.0, NAN, 0.0, 0.8, 0.0, NAN, 0.0, 0.7, 0.0, 0.9], 2, 4, "max", 0.0),
]


@pytest.mark.parametrize(("values", "every", "patience", "mode", "min_delta"), CASES)
def test_stops_where_the_format1_checkpointer_stopped(values, every, patience, mode, min_delta):
    """Patience keeps its documented meaning (epochs without improvement, checked at validations) now that
    Ignite's ``EarlyStopping`` counts: the stop epoch equals the format-1 rule's in every case."""
    expected = _format1_stop_epoch(values, every, patience, mode, min_delta)
    assert _stop_epoch(values, every, patience, mode, min_delta) == expected


def test_the_cases_do_stop_early():
    """The equivalence cases above are not all runs to the end, which any two implementations would agree on."""
    stops = [_format1_stop_epoch(*case) < len(case[0]) for case in CASES]
    assert 6 <= sum(stops) < len(stops)


@pytest.mark.parametrize(
    ("patience", "values", "stop_epoch"), [(1, [0.5, 0.8, 0.6, 0.9, 0.95], 3), (2, [0.5, 0.8, 0.6, 0.7, 0.9], 4)]
)
def test_early_stopping_ends_the_run_and_is_remembered(tmp_path, patience, values, stop_epoch):
    run = ts.setup(tmp_path, max_epochs=5, values=values, early_stop_patience=patience)
    run.trainer.run()
    assert run.trainer.state.epoch == stop_epoch
    assert run.early.stopped
    assert isinstance(run.early.handler, EarlyStopping)
    assert ts.names(tmp_path) == [ts.ckpt_name(stop_epoch - 1), ts.ckpt_name(stop_epoch)]
    last = load_training_checkpoint(tmp_path / ts.ckpt_name(stop_epoch))["state"]["early_stopping"]
    assert last == {"stopped": True, "ignite": {"counter": stop_epoch - 2, "best_score": 0.8, "threshold_mode": "abs"}}
    assert last["ignite"] == dict(run.early.handler.state_dict())  # Ignite's own state, as saved
    assert not load_training_checkpoint(tmp_path / ts.ckpt_name(stop_epoch - 1))["state"]["early_stopping"]["stopped"]
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    # a resumed run knows it is finished, although max_epochs was not reached
    again = ts.setup(tmp_path, max_epochs=5, values=values, early_stop_patience=patience)
    assert again.ckpt.resume() is True
    assert again.early.stopped and again.trainer.state.epoch == 0
    assert again.best.best_epoch == 2 and again.best.best_value == 0.8


def test_patience_counts_epochs_with_validation_every_second_epoch(tmp_path):
    """With validation every 2nd epoch, patience 2 stops at the first validation without improvement (2 epochs after
    the best), not after two such validations."""
    run = ts.setup(tmp_path, max_epochs=6, values=[0.0, 0.8, 0.0, 0.7, 0.0, 0.9], early_stop_patience=2, every=2)
    run.trainer.run()
    assert run.trainer.state.epoch == 4 and run.early.stopped
    assert run.best.history == [{"epoch": 1}, {"epoch": 2, KEY: 0.8}, {"epoch": 3}, {"epoch": 4, KEY: 0.7}]


def test_resume_mid_patience_keeps_counting(tmp_path):
    """A run killed between its best epoch and the stop resumes Ignite's counter and stops where an uninterrupted run
    stops, with the same weights."""
    values = [0.5, 0.8, 0.6, 0.7, 0.75, 0.9]
    whole = ts.setup(tmp_path / "whole", max_epochs=6, values=values, early_stop_patience=3)
    whole.trainer.run()
    assert whole.trainer.state.epoch == 5

    part = ts.setup(tmp_path / "part", max_epochs=6, values=values, early_stop_patience=3)
    part.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda e: e.terminate())
    part.trainer.run()
    saved = load_training_checkpoint(tmp_path / "part" / ts.ckpt_name(3))["state"]["early_stopping"]
    assert saved == {"stopped": False, "ignite": {"counter": 1, "best_score": 0.8, "threshold_mode": "abs"}}
    again = ts.setup(tmp_path / "part", max_epochs=6, values=values, early_stop_patience=3, init_seed=1)
    assert again.ckpt.resume() is False
    assert (again.early.handler.counter, again.early.handler.best_score) == (1, 0.8)
    again.trainer.run()
    assert again.trainer.state.epoch == 5 and again.early.stopped
    assert ts.equal(ts.weights(again.net), whole.weights[5])


def test_off_attaches_nothing_and_checks_nothing():
    engine = Engine(lambda e, b: None)
    before = sum(len(v) for v in engine._event_handlers.values())
    off = ValidationEarlyStopping(0)  # no validator needed when off
    off.attach(engine)
    assert off.handler is None and sum(len(v) for v in engine._event_handlers.values()) == before
    assert off.state_dict() == {"stopped": False, "ignite": None}


def test_bad_arguments_are_refused():
    validator = ts.FakeValidator([0.5])
    with pytest.raises(ValueError, match="patience"):
        ValidationEarlyStopping(-1, validator, KEY)
    with pytest.raises(ValueError, match="validator"):
        ValidationEarlyStopping(3, None, KEY)
    with pytest.raises(ValueError, match="validator"):
        ValidationEarlyStopping(3, validator, None)
    with pytest.raises(ValueError, match="mode"):
        ValidationEarlyStopping(3, validator, KEY, mode="maximum")
    with pytest.raises(ValueError, match="min_delta"):
        ValidationEarlyStopping(3, validator, KEY, min_delta=-0.1)


def test_state_loaded_before_attach_is_applied_at_attach():
    validator = ts.FakeValidator([0.5])
    early = ValidationEarlyStopping(3, validator, KEY)
    early.load_state_dict({"stopped": False, "ignite": {"counter": 2, "best_score": 0.9, "threshold_mode": "abs"}})
    assert early.state_dict()["ignite"]["counter"] == 2
    early.attach(Engine(lambda e, b: None))
    assert early.handler is not None and (early.handler.counter, early.handler.best_score) == (2, 0.9)
