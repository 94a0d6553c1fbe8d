"""Unit tests of :class:`volcnn.engines.checkpoint.TrainingCheckpointer` on tiny real MONAI trainers (CPU).

Rotation, checkpoint content, interrupted and corrupt writes, the pieces of state a resume must put back
(GradScaler, transform and loader RNGs, the best-model and early-stopping handlers), and resuming format-1
checkpoints. Best-model tracking and early stopping themselves are in ``test_best_model.py`` and
``test_early_stopping.py``; the end-to-end bit-exact resume of the bundle is in ``test_resume.py``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.transforms import Compose, RandFlipd

import volcnn.core.atomic as atomic_mod
import volcnn.engines.checkpoint as ckpt_mod
from tests.engines import training_setup as ts
from volcnn.engines import rng_state
from volcnn.engines.checkpoint import CheckpointError, TrainingCheckpointer, load_training_checkpoint
from volcnn.engines.workflow import run_training

ITERS = ts.ITERS
KEY = ts.KEY


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("keep_last", [0, 1, -1])
def test_keep_last_below_two_is_refused(tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last"):
        TrainingCheckpointer(tmp_path, {"model": ts.net()}, keep_last=keep_last)


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model"):
        TrainingCheckpointer(tmp_path, {"optimizer": torch.optim.SGD(ts.net().parameters(), lr=0.1)})


def test_unattached_checkpointer_cannot_save(tmp_path):
    with pytest.raises(RuntimeError, match="not attached"):
        TrainingCheckpointer(tmp_path, {"model": ts.net()}).save()


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("keep_last", [2, 3])
def test_saves_every_epoch_and_keeps_the_newest(tmp_path, keep_last):
    run = ts.setup(tmp_path, max_epochs=5, keep_last=keep_last)
    seen: list[list[str]] = []
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(ts.names(tmp_path)))
    run.trainer.run()
    for epoch, names in enumerate(seen, start=1):
        assert names == [ts.ckpt_name(e) for e in range(max(1, epoch - keep_last + 1), epoch + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(ts.ckpt_name(e) for e in range(6 - keep_last, 6)), "model.pt", "best.json"]
    )
    assert run.ckpt.checkpoints() == [tmp_path / ts.ckpt_name(e) for e in range(6 - keep_last, 6)]


def test_checkpoint_content_loads_weights_only(tmp_path):
    run = ts.setup(tmp_path, max_epochs=3, keep_last=3)
    run.trainer.run()
    for epoch in (1, 2, 3):
        ckpt = torch.load(tmp_path / ts.ckpt_name(epoch), map_location="cpu", weights_only=True)
        assert ckpt["format"] == "volcnn-checkpoint"
        assert ckpt["trainer"] == {"epoch": epoch, "iteration": epoch * ITERS, "epoch_length": ITERS, "max_epochs": 3}
        assert ckpt["version"] == 2
        assert set(ckpt["state"]) == {"model", "optimizer", "lr_scheduler", "best_model", "early_stopping"}
        assert ts.equal(ckpt["state"]["model"], run.weights[epoch])
        assert ckpt["state"]["lr_scheduler"]["last_epoch"] == epoch  # saved after the scheduler stepped
        assert ckpt["state"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**epoch)
        assert len(ckpt["state"]["optimizer"]["state"]) == 2  # momentum buffers of weight and bias
        assert {"python", "numpy", "torch", "cuda", "transforms", "generators"} <= set(ckpt["rng"])
        assert torch.equal(ckpt["rng"]["torch"], run.rng[epoch])
        history = [{"epoch": e} for e in range(1, epoch + 1)]
        assert ckpt["state"]["best_model"] == {"metric": None, "value": None, "epoch": epoch, "history": history}
        assert ckpt["state"]["early_stopping"] == {"stopped": False, "ignite": None}  # patience 0: off
        assert not {"best", "early_stopping", "history"} & set(ckpt)  # format 1 kept these at the top level
        assert load_training_checkpoint(tmp_path / ts.ckpt_name(epoch))["trainer"]["epoch"] == epoch
    # without a validator every epoch is the best: model.pt holds the last weights
    assert ts.equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[3])


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    torch.save({"model": ts.net().state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a volcnn training checkpoint"):
        load_training_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_training_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- failed and corrupt writes


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    temps: list[Path] = []

    def failing_save(obj, f, *args, **kwargs):
        path = Path(f)
        if path.name.startswith(".checkpoint_epoch0002"):
            path.write_bytes(b"PK\x03\x04 half a zip")
            temps.append(path)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    run = ts.setup(tmp_path, max_epochs=3)
    with pytest.raises(OSError, match="No space left"):
        run.trainer.run()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert len(temps) == 1 and temps[0].parent == tmp_path
    assert ts.names(tmp_path) == [ts.ckpt_name(1)]
    assert not (tmp_path / ts.ckpt_name(2)).exists()
    assert ts.equal(load_training_checkpoint(tmp_path / ts.ckpt_name(1))["state"]["model"], run.weights[1])
    assert not list(tmp_path.glob(".*")), "the failed write left its temporary file"

    # a SIGKILL instead of an exception would leave the temp file: the next run's STARTED removes it
    temps[0].write_bytes(b"PK\x03\x04 half a zip")
    again = ts.setup(tmp_path, max_epochs=3)
    leftovers_at_start: list[list[Path]] = []
    again.trainer.add_event_handler(Events.STARTED, lambda e: leftovers_at_start.append(list(tmp_path.glob(".*"))))
    assert again.ckpt.resume() is False
    assert temps[0].exists()  # resume itself does not touch it
    again.trainer.run()
    assert leftovers_at_start == [[]]
    assert again.trainer.state.epoch == 3
    assert ts.names(tmp_path) == [ts.ckpt_name(2), ts.ckpt_name(3)]
    assert not list(tmp_path.glob(".*"))


def test_started_removes_every_kind_of_unfinished_write(tmp_path, monkeypatch):
    """A kill can land in any atomic write: full checkpoint, best weights or best.json; all their temp files go."""
    real_replace = atomic_mod.os.replace
    left: list[Path] = []
    kill_at: list[str] = []

    def killed_replace(src, dst):  # a SIGKILL between write and rename leaves the temp file
        if Path(dst).name in kill_at:
            left.append(Path(src))
            raise KeyboardInterrupt
        real_replace(src, dst)

    run = ts.setup(tmp_path, max_epochs=1, values=[0.7])
    monkeypatch.setattr(atomic_mod.os, "replace", killed_replace)
    monkeypatch.setattr(atomic_mod.Path, "unlink", lambda self, missing_ok=False: None)  # no cleanup after a kill
    for target, write in [
        ("model.pt", lambda: run.best._write(1, 0.7)),
        ("best.json", lambda: run.best._write(1, 0.7)),
        (ts.ckpt_name(0), lambda: run.ckpt.save(run.trainer)),
    ]:
        kill_at[:] = [target]
        with pytest.raises(KeyboardInterrupt):
            write()
    monkeypatch.undo()
    assert sorted(p.name.split(".")[1] for p in left) == ["best", "checkpoint_epoch0000", "model"]
    assert all(p.exists() for p in left)
    (tmp_path / ".gitkeep").write_text("")
    again = ts.setup(tmp_path, max_epochs=1, values=[0.7])
    at_start: list[list[Path]] = []
    again.trainer.add_event_handler(Events.STARTED, lambda e: at_start.append([p for p in left if p.exists()]))
    again.trainer.run()
    assert at_start == [[]]
    assert (tmp_path / ".gitkeep").exists()  # other hidden files are not ours to delete
    names = sorted(p.name for p in tmp_path.iterdir())
    archived = [n for n in names if n.startswith("previous-")]  # the first run's finished files, moved aside
    assert sorted(set(names) - set(archived)) == [".gitkeep", "best.json", ts.ckpt_name(1), "model.pt"]
    assert len(archived) == 1 and (tmp_path / archived[0] / "model.pt").is_file()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    run = ts.setup(tmp_path, max_epochs=2)
    run.trainer.run()
    _truncate(tmp_path / ts.ckpt_name(2))
    again = ts.setup(tmp_path, max_epochs=2, init_seed=1)
    assert not ts.equal(ts.weights(again.net), run.weights[1])
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.checkpoint"):
        assert again.ckpt.resume() is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(ts.ckpt_name(2) in w for w in warnings)
    assert again.trainer.state.epoch == 1
    assert again.trainer.state.iteration == ITERS
    assert ts.equal(ts.weights(again.net), run.weights[1])
    assert again.scheduler.last_epoch == 1
    again.trainer.run()  # epoch 2 is redone and its checkpoint rewritten
    assert again.trainer.state.epoch == 2
    assert load_training_checkpoint(tmp_path / ts.ckpt_name(2))["trainer"]["epoch"] == 2


def test_all_checkpoints_corrupt_raises_naming_them(tmp_path):
    run = ts.setup(tmp_path, max_epochs=2)
    run.trainer.run()
    for name in ts.names(tmp_path):
        _truncate(tmp_path / name)
    again = ts.setup(tmp_path, max_epochs=2)
    with pytest.raises(CheckpointError) as info:
        again.ckpt.resume()
    assert ts.ckpt_name(1) in str(info.value) and ts.ckpt_name(2) in str(info.value)


# ---------------------------------------------------------------- resuming


def test_resume_without_checkpoints_starts_at_epoch_one(tmp_path):
    run = ts.setup(tmp_path / "models", max_epochs=2)
    assert run.ckpt.resume() is False
    assert run.trainer.state.epoch == 0 and run.trainer.state.iteration == 0
    epochs: list[int] = []
    run.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    run.trainer.run()
    assert epochs == [1, 2]


def test_resume_restores_trainer_optimizer_and_scheduler(tmp_path):
    run = ts.setup(tmp_path, max_epochs=2)
    run.trainer.run()
    again = ts.setup(tmp_path, max_epochs=4, init_seed=1)
    assert again.ckpt.resume() is False  # max_epochs raised from 2 to 4: not finished
    assert again.trainer.state.epoch == 2 and again.trainer.state.max_epochs == 4
    assert ts.equal(ts.weights(again.net), run.weights[2])
    assert again.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    for p_old, p_new in zip(run.net.parameters(), again.net.parameters(), strict=True):
        assert torch.equal(run.opt.state[p_old]["momentum_buffer"], again.opt.state[p_new]["momentum_buffer"])
    epochs: list[int] = []
    again.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    again.trainer.run()
    assert epochs == [3, 4]
    assert again.best.history == [{"epoch": e} for e in (1, 2, 3, 4)]


def test_resume_of_a_finished_run_reports_done(tmp_path):
    run = ts.setup(tmp_path, max_epochs=2)
    run.trainer.run()
    again = ts.setup(tmp_path, max_epochs=2)
    assert again.ckpt.resume() is True
    assert again.trainer.state.epoch == 0  # nothing to continue


def test_resume_with_a_different_epoch_length_is_refused(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1)
    run.trainer.run()
    again = ts.setup(tmp_path, max_epochs=2, n=ts.N + ts.BATCH)
    with pytest.raises(CheckpointError, match=rf"written with {ITERS} iterations per epoch.*now gives {ITERS + 1}"):
        again.ckpt.resume()
    assert again.trainer.state.epoch == 0


def test_resume_refuses_a_checkpoint_missing_an_attached_state(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1)  # no GradScaler
    run.trainer.run()
    again = ts.setup(tmp_path, max_epochs=2, fp16_scaler=True)
    with pytest.raises(CheckpointError, match="scaler"):
        again.ckpt.resume()


def test_grad_scaler_state_is_saved_and_restored(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1, fp16_scaler=True)
    assert run.ckpt.save_dict["scaler"] is run.trainer.scaler
    run.trainer.run()
    run.trainer.scaler.update(new_scale=1234.0)
    run.ckpt.save(run.trainer)
    assert load_training_checkpoint(tmp_path / ts.ckpt_name(1))["state"]["scaler"]["scale"] == 1234.0
    again = ts.setup(tmp_path, max_epochs=2, fp16_scaler=True)
    assert again.trainer.scaler.get_scale() == 65536.0
    assert again.ckpt.resume() is False
    assert again.trainer.scaler.get_scale() == 1234.0
    again.trainer.run()
    assert again.trainer.scaler.get_scale() == 1234.0  # the same scaler object carried on training
    assert load_training_checkpoint(tmp_path / ts.ckpt_name(2))["state"]["scaler"]["scale"] == 1234.0


def _flips(dataset: Dataset, count: int = 24) -> list[bool]:
    original = torch.as_tensor(dataset.data[0]["image"])
    return [not torch.equal(torch.as_tensor(dataset[0]["image"]), original) for _ in range(count)]


def test_transform_random_states_are_restored(tmp_path):
    transform = Compose([RandFlipd(keys="image", prob=0.5)]).set_random_state(seed=3)
    run = ts.setup(tmp_path, max_epochs=1, transform=transform)
    run.trainer.run()  # draws from the transform's RandomState, then saves it
    expected = _flips(run.trainer.data_loader.dataset)
    assert 0 < sum(expected) < len(expected)
    again = ts.setup(tmp_path, max_epochs=2, transform=Compose([RandFlipd(keys="image", prob=0.5)]), init_seed=1)
    assert again.ckpt.resume() is False
    assert _flips(again.trainer.data_loader.dataset) == expected


def test_resume_refuses_a_changed_augmentation_chain(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1, transform=Compose([RandFlipd(keys="image", prob=0.5)]))
    run.trainer.run()
    longer = Compose([RandFlipd(keys="image", prob=0.5), RandFlipd(keys="image", prob=0.5, spatial_axis=0)])
    again = ts.setup(tmp_path, max_epochs=2, transform=longer, init_seed=1)
    before = ts.weights(again.net)
    with pytest.raises(CheckpointError, match=rf"{ts.ckpt_name(1)}.*augmentation chain changed"):
        again.ckpt.resume()
    assert ts.equal(ts.weights(again.net), before)  # refused before anything was loaded
    assert again.trainer.state.epoch == 0


def test_loader_generator_and_global_rngs_are_restored(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1, loader_generator=torch.Generator().manual_seed(5))
    run.trainer.run()
    order = list(iter(run.trainer.data_loader.sampler))
    after_save = (torch.rand(3), np.random.random(3))
    again = ts.setup(tmp_path, max_epochs=2, loader_generator=torch.Generator().manual_seed(77))
    assert again.ckpt.resume() is False
    assert list(iter(again.trainer.data_loader.sampler)) == order
    assert torch.equal(torch.rand(3), after_save[0])
    assert np.array_equal(np.random.random(3), after_save[1])


# ---------------------------------------------------------------- rng_state


def _draw() -> tuple:
    return random.random(), np.random.random(4).tolist(), torch.rand(4).tolist()


def test_capture_restore_round_trips_the_global_generators():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    state = rng_state.capture_rng()
    expected = _draw()
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    assert _draw() != expected
    rng_state.restore_rng(state)
    assert _draw() == expected


def test_rng_snapshot_survives_a_weights_only_round_trip(tmp_path):
    flip = Compose([RandFlipd(keys="image", prob=0.5), RandFlipd(keys="image", prob=0.5, spatial_axis=1)])
    flip.set_random_state(seed=4)
    gen = torch.Generator().manual_seed(8)
    torch.save(rng_state.capture_rng(flip, {"loader": gen}), tmp_path / "rng.pt")
    expected = (_draw(), [t.R.random_sample() for t in flip.transforms], torch.rand(3, generator=gen).tolist())
    flip.set_random_state(seed=5)
    gen.manual_seed(9)
    random.seed(0)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    rng_state.restore_rng(state, flip, {"loader": gen})
    assert (_draw(), [t.R.random_sample() for t in flip.transforms], torch.rand(3, generator=gen).tolist()) == expected


def test_transform_random_states_are_found_in_a_fixed_order():
    a, b = RandFlipd(keys="image", prob=0.5), RandFlipd(keys="image", prob=0.5)
    inner = Compose([b])
    chain = Compose([a, inner]).set_random_state(seed=1)  # Compose is Randomizable too: 4 generators
    states = rng_state.transform_random_states(chain)
    assert len(states) == 4
    assert all(s is r for s, r in zip(states, [chain.R, a.R, inner.R, b.R], strict=True))
    assert rng_state.transform_random_states(None) == []


def test_restore_with_a_different_transform_chain_is_refused_and_changes_nothing():
    state = rng_state.capture_rng(Compose([RandFlipd(keys="image", prob=0.5)]))
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    for chain in (None, Compose([RandFlipd(keys="image", prob=0.5), RandFlipd(keys="image", prob=0.5)])):
        with pytest.raises(ValueError, match="augmentation chain changed"):
            rng_state.restore_rng(state, chain)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


def test_fresh_run_moves_an_earlier_runs_files_aside(tmp_path):
    """A new run (resume false) into a folder with another run's checkpoints neither mixes with them nor
    deletes them: they move to previous-<time>/, still loadable."""
    first = ts.setup(tmp_path, max_epochs=3)
    first.trainer.run()
    before = sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt"))
    second = ts.setup(tmp_path, max_epochs=1)
    second.trainer.run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt")) == [ts.ckpt_name(1)]
    (archive,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in archive.glob("checkpoint_epoch*.pt")) == before
    for path in archive.glob("checkpoint_epoch*.pt"):
        load_training_checkpoint(path)


def test_resume_with_a_different_number_of_processes_is_refused(tmp_path):
    """A DDP checkpoint holds one RNG snapshot per rank; resuming it with another world size cannot continue each
    rank's streams, so it is refused with both counts named, before anything is restored."""
    run = ts.setup(tmp_path, max_epochs=1)
    run.trainer.run()
    path = tmp_path / ts.ckpt_name(1)
    ckpt = load_training_checkpoint(path)
    ckpt["rng_ranks"] = [ckpt["rng"], ckpt["rng"]]  # as rank 0 of a two-process run writes it
    torch.save(ckpt, path)
    again = ts.setup(tmp_path, max_epochs=2, init_seed=1)
    before = ts.weights(again.net)
    with pytest.raises(CheckpointError, match=r"2 process\(es\), but this run has 1"):
        again.ckpt.resume()
    assert ts.equal(before, ts.weights(again.net)) and again.trainer.state.epoch == 0


# ---------------------------------------------------------------- format 1 (before the best model and early
# stopping became handlers of their own)


def _as_format_1(path: Path, patience: int) -> None:
    """Rewrite a checkpoint in the layout the format-1 ``TrainingCheckpointer`` wrote (its ``state_dict()`` at commit
    e48f647): ``state`` with the model, optimizer and scheduler only; the best value and epoch, the early-stopping
    patience and flag and the metric history at the top level."""
    ckpt = load_training_checkpoint(path)
    state = dict(ckpt["state"])
    best, early = state.pop("best_model"), state.pop("early_stopping")
    old = {
        "format": ckpt["format"],
        "version": 1,
        "trainer": ckpt["trainer"],
        "state": state,
        "rng": ckpt["rng"],
        "rng_ranks": ckpt["rng_ranks"],
        "best": {"metric": best["metric"], "value": best["value"], "epoch": best["epoch"]},
        "early_stopping": {"patience": patience, "stopped": early["stopped"]},
        "history": best["history"],
    }
    torch.save(old, path)


def _random_run(folder: Path, seed: int = 3, init_seed: int = 0, **kwargs):
    """A run with random augmentation. (Not with a shuffling loader of its own ``torch.Generator``: torch's
    ``RandomSampler`` draws one more permutation when the exhausted iterator is advanced at the next epoch's start,
    which a resumed run never does; the bundle's loaders shuffle from the global generator instead.)"""
    flip = Compose([RandFlipd(keys="image", prob=0.5)]).set_random_state(seed=seed)
    return ts.setup(folder, transform=flip, init_seed=init_seed, **kwargs)


def test_format1_checkpoint_resumes_bit_exact(tmp_path):
    """A run whose checkpoints were written in format 1 resumes (augmentation and loader streams, best model and
    early-stopping counter included) and ends with the weights of an uninterrupted run, bit for bit."""
    settings = {"max_epochs": 5, "values": [0.5, 0.8, 0.6, 0.7, 0.9], "early_stop_patience": 3}
    whole = _random_run(tmp_path / "whole", **settings)
    whole.trainer.run()
    part = _random_run(tmp_path / "part", **settings)
    part.trainer.add_event_handler(Events.EPOCH_COMPLETED(once=3), lambda e: e.terminate())
    part.trainer.run()
    for epoch in (2, 3):
        _as_format_1(tmp_path / "part" / ts.ckpt_name(epoch), patience=3)
    assert load_training_checkpoint(tmp_path / "part" / ts.ckpt_name(3))["version"] == 1

    again = _random_run(tmp_path / "part", seed=30, init_seed=1, **settings)
    assert again.ckpt.resume() is False
    assert again.trainer.state.epoch == 3
    assert (again.best.best_value, again.best.best_epoch) == (0.8, 2)
    assert again.best.history == [{"epoch": 1, KEY: 0.5}, {"epoch": 2, KEY: 0.8}, {"epoch": 3, KEY: 0.6}]
    assert (again.early.handler.counter, again.early.handler.best_score, again.early.stopped) == (1, 0.8, False)
    again.trainer.run()
    assert again.trainer.state.epoch == 5
    assert ts.equal(ts.weights(again.net), whole.weights[5])
    ours, theirs = (load_training_checkpoint(f / ts.ckpt_name(5)) for f in (tmp_path / "part", tmp_path / "whole"))
    assert ours["version"] == 2
    assert ours["state"]["best_model"] == theirs["state"]["best_model"]
    assert ours["state"]["early_stopping"] == theirs["state"]["early_stopping"]


def test_format1_checkpoint_of_a_run_that_stopped_early_does_nothing_more(tmp_path):
    settings = {"max_epochs": 5, "values": [0.5, 0.8, 0.6, 0.9, 0.95], "early_stop_patience": 1}
    first = ts.setup(tmp_path, **settings)
    first.trainer.run()
    assert first.trainer.state.epoch == 3
    for epoch in (2, 3):
        _as_format_1(tmp_path / ts.ckpt_name(epoch), patience=1)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = ts.setup(tmp_path, **settings)
    assert run_training(again.trainer, again.ckpt, resume=True) is again.trainer.state
    assert again.trainer.state.epoch == 0 and again.early.stopped
    assert (again.best.best_value, again.best.best_epoch) == (0.8, 2)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_checkpoint_of_a_newer_format_is_refused(tmp_path):
    run = ts.setup(tmp_path, max_epochs=1)
    run.trainer.run()
    path = tmp_path / ts.ckpt_name(1)
    ckpt = load_training_checkpoint(path)
    torch.save({**ckpt, "version": 3}, path)
    with pytest.raises(CheckpointError, match=r"format 3 is newer than this volcnn reads \(2\)"):
        load_training_checkpoint(path)
