"""Unit tests of :class:`volcnn.engines.checkpoint.TrainingCheckpointer` on tiny real MONAI trainers (CPU).

Rotation, checkpoint content, best-model tracking, early stopping, interrupted and corrupt writes, and the
pieces of state a resume must put back (GradScaler, transform and loader RNGs). The end-to-end bit-exact resume
of the bundle is in ``test_resume.py``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandFlipd

import volcnn.core.atomic as atomic_mod
import volcnn.engines.checkpoint as ckpt_mod
from volcnn.engines import rng_state
from volcnn.engines.amp import AmpPolicy
from volcnn.engines.checkpoint import CheckpointError, TrainingCheckpointer, load_training_checkpoint
from volcnn.engines.trainer import SchedulerStepper, VolcnnTrainer

N = 8
BATCH = 4
ITERS = N // BATCH
KEY = "val_auc"


class _FakeValidator:
    """Stands in for the evaluator: at each trainer epoch end its ``state`` gets that epoch's metric value.

    ``values[i]`` is the metric of epoch ``i + 1``; ``every`` mimics ``val_interval``.
    """

    def __init__(self, values: list[float], every: int = 1):
        self.values = values
        self.every = every
        self.state = SimpleNamespace(epoch=0, metrics={})

    def __call__(self, trainer) -> None:
        epoch = trainer.state.epoch
        if epoch % self.every == 0:
            self.state.epoch = epoch
            self.state.metrics = {KEY: self.values[epoch - 1]}


def _net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())


def _data(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.random((1, 8, 8, 8), dtype=np.float32), "label": i % 2} for i in range(n)]


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _setup(
    ckpt_dir: Path,
    max_epochs: int = 3,
    values: list[float] | None = None,
    n: int = N,
    transform=None,
    loader_generator: torch.Generator | None = None,
    fp16_scaler: bool = False,
    init_seed: int = 0,
    **ckpt_kwargs,
) -> SimpleNamespace:
    """A trainer wired like the bundle: (fake) validation, then the LR scheduler, then the checkpointer last."""
    torch.manual_seed(init_seed)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(
        Dataset(_data(n), transform=transform),
        batch_size=BATCH,
        shuffle=loader_generator is not None,
        generator=loader_generator,
        num_workers=0,
    )
    trainer = VolcnnTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(),
    )  # fmt: skip
    if fp16_scaler:
        trainer.amp_policy = AmpPolicy("cpu", torch.float16)
        trainer.scaler = trainer.amp_policy.make_scaler()
    validator = _FakeValidator(values) if values is not None else None
    if validator is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, validator)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    SchedulerStepper(scheduler).attach(trainer)
    # per-epoch weights and torch RNG, recorded just before the checkpointer runs
    weights: dict[int, dict[str, torch.Tensor]] = {}
    rng_at_save: dict[int, torch.Tensor] = {}

    def record(engine) -> None:
        weights[engine.state.epoch] = _weights(net)
        rng_at_save[engine.state.epoch] = torch.get_rng_state()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    checkpointer = TrainingCheckpointer(
        ckpt_dir,
        {"model": net, "optimizer": opt, "lr_scheduler": scheduler},
        validator=validator,
        key_metric=KEY if validator is not None else None,
        **ckpt_kwargs,
    )
    checkpointer.attach(trainer)
    return SimpleNamespace(
        trainer=trainer, ckpt=checkpointer, net=net, opt=opt, scheduler=scheduler, weights=weights, rng=rng_at_save
    )


def _names(folder: Path, pattern: str = "checkpoint_epoch*.pt") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def _ckpt_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pt"


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("keep_last", [0, 1, -1])
def test_keep_last_below_two_is_refused(tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last"):
        TrainingCheckpointer(tmp_path, {"model": _net()}, keep_last=keep_last)


def test_bad_mode_and_missing_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        TrainingCheckpointer(tmp_path, {"model": _net()}, mode="maximum")
    with pytest.raises(ValueError, match="model"):
        TrainingCheckpointer(tmp_path, {"optimizer": torch.optim.SGD(_net().parameters(), lr=0.1)})


def test_unattached_checkpointer_cannot_save(tmp_path):
    with pytest.raises(RuntimeError, match="not attached"):
        TrainingCheckpointer(tmp_path, {"model": _net()}).save()


# ---------------------------------------------------------------- saving


@pytest.mark.parametrize("keep_last", [2, 3])
def test_saves_every_epoch_and_keeps_the_newest(tmp_path, keep_last):
    run = _setup(tmp_path, max_epochs=5, keep_last=keep_last)
    seen: list[list[str]] = []
    run.trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(_names(tmp_path)))
    run.trainer.run()
    for epoch, names in enumerate(seen, start=1):
        assert names == [_ckpt_name(e) for e in range(max(1, epoch - keep_last + 1), epoch + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(_ckpt_name(e) for e in range(6 - keep_last, 6)), "model.pt", "best.json"]
    )
    assert run.ckpt.checkpoints() == [tmp_path / _ckpt_name(e) for e in range(6 - keep_last, 6)]


def test_checkpoint_content_loads_weights_only(tmp_path):
    run = _setup(tmp_path, max_epochs=3, keep_last=3)
    run.trainer.run()
    for epoch in (1, 2, 3):
        ckpt = torch.load(tmp_path / _ckpt_name(epoch), map_location="cpu", weights_only=True)
        assert ckpt["format"] == "volcnn-checkpoint"
        assert ckpt["trainer"] == {"epoch": epoch, "iteration": epoch * ITERS, "epoch_length": ITERS, "max_epochs": 3}
        assert set(ckpt["state"]) == {"model", "optimizer", "lr_scheduler"}
        assert _equal(ckpt["state"]["model"], run.weights[epoch])
        assert ckpt["state"]["lr_scheduler"]["last_epoch"] == epoch  # saved after the scheduler stepped
        assert ckpt["state"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5**epoch)
        assert len(ckpt["state"]["optimizer"]["state"]) == 2  # momentum buffers of weight and bias
        assert {"python", "numpy", "torch", "cuda", "transforms", "generators"} <= set(ckpt["rng"])
        assert torch.equal(ckpt["rng"]["torch"], run.rng[epoch])
        assert ckpt["best"] == {"metric": None, "value": None, "epoch": epoch}
        assert ckpt["early_stopping"] == {"patience": 0, "stopped": False}
        assert ckpt["history"] == [{"epoch": e} for e in range(1, epoch + 1)]
        assert load_training_checkpoint(tmp_path / _ckpt_name(epoch))["trainer"]["epoch"] == epoch
    # without a validator every epoch is the best: model.pt holds the last weights
    assert _equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[3])


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    torch.save({"model": _net().state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a volcnn training checkpoint"):
        load_training_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_training_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------- best model and early stopping


@pytest.mark.parametrize(("mode", "values"), [("max", [0.5, 0.8, 0.6]), ("min", [0.5, 0.2, 0.4])])
def test_best_model_follows_the_key_metric(tmp_path, mode, values):
    run = _setup(tmp_path, max_epochs=3, values=values, mode=mode, keep_last=3)
    run.trainer.run()
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert _equal(best, run.weights[2])
    assert not _equal(best, run.weights[3])
    info = json.loads((tmp_path / "best.json").read_text())
    assert info == {"epoch": 2, "metric": KEY, "value": values[1], "file": "model.pt"}
    last = load_training_checkpoint(tmp_path / _ckpt_name(3))
    assert last["best"] == {"metric": KEY, "value": values[1], "epoch": 2}
    assert last["history"] == [{"epoch": e, KEY: v} for e, v in enumerate(values, start=1)]


def test_improvement_smaller_than_min_delta_does_not_count(tmp_path):
    run = _setup(tmp_path, max_epochs=3, values=[0.5, 0.505, 0.7], min_delta=0.01)
    run.trainer.run()
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 3
    run = _setup(tmp_path / "b", max_epochs=2, values=[0.5, 0.505], min_delta=0.01)
    run.trainer.run()
    assert json.loads((tmp_path / "b" / "best.json").read_text())["epoch"] == 1
    assert _equal(torch.load(tmp_path / "b" / "model.pt", weights_only=True), run.weights[1])


def test_undefined_metric_keeps_the_latest_weights_until_one_is_defined(tmp_path, caplog):
    run = _setup(tmp_path, max_epochs=3, values=[float("nan"), float("nan"), 0.6])
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.checkpoint"):
        run.trainer.run()
    assert caplog.text.count("is undefined") == 2
    assert json.loads((tmp_path / "best.json").read_text())["value"] == 0.6
    assert _equal(torch.load(tmp_path / "model.pt", weights_only=True), run.weights[3])


@pytest.mark.parametrize(
    ("patience", "values", "stop_epoch"), [(1, [0.5, 0.8, 0.6, 0.9, 0.95], 3), (2, [0.5, 0.8, 0.6, 0.7, 0.9], 4)]
)
def test_early_stopping_ends_the_run_and_is_remembered(tmp_path, patience, values, stop_epoch):
    run = _setup(tmp_path, max_epochs=5, values=values, early_stop_patience=patience)
    run.trainer.run()
    assert run.trainer.state.epoch == stop_epoch
    assert run.ckpt.stopped_early
    assert _names(tmp_path) == [_ckpt_name(stop_epoch - 1), _ckpt_name(stop_epoch)]
    last = load_training_checkpoint(tmp_path / _ckpt_name(stop_epoch))
    assert last["early_stopping"] == {"patience": patience, "stopped": True}
    assert not load_training_checkpoint(tmp_path / _ckpt_name(stop_epoch - 1))["early_stopping"]["stopped"]
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 2
    # a resumed run knows it is finished, although max_epochs was not reached
    again = _setup(tmp_path, max_epochs=5, values=values, early_stop_patience=patience)
    assert again.ckpt.resume() is True
    assert again.ckpt.stopped_early
    assert again.ckpt.best_epoch == 2 and again.ckpt.best_value == 0.8


def test_early_stopping_waits_for_validation_epochs(tmp_path):
    """With validation every 2nd epoch, epochs without a metric do not count towards patience."""
    run = _setup(tmp_path, max_epochs=6, values=[0.0, 0.8, 0.0, 0.7, 0.0, 0.9], early_stop_patience=2)
    run.ckpt.validator.every = 2
    run.trainer.run()
    assert run.trainer.state.epoch == 4
    assert run.ckpt.history == [{"epoch": 1}, {"epoch": 2, KEY: 0.8}, {"epoch": 3}, {"epoch": 4, KEY: 0.7}]


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
    run = _setup(tmp_path, max_epochs=3)
    with pytest.raises(OSError, match="No space left"):
        run.trainer.run()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert len(temps) == 1 and temps[0].parent == tmp_path
    assert _names(tmp_path) == [_ckpt_name(1)]
    assert not (tmp_path / _ckpt_name(2)).exists()
    assert _equal(load_training_checkpoint(tmp_path / _ckpt_name(1))["state"]["model"], run.weights[1])
    assert not list(tmp_path.glob(".*")), "the failed write left its temporary file"

    # a SIGKILL instead of an exception would leave the temp file: the next run's STARTED removes it
    temps[0].write_bytes(b"PK\x03\x04 half a zip")
    again = _setup(tmp_path, max_epochs=3)
    leftovers_at_start: list[list[Path]] = []
    again.trainer.add_event_handler(Events.STARTED, lambda e: leftovers_at_start.append(list(tmp_path.glob(".*"))))
    assert again.ckpt.resume() is False
    assert temps[0].exists()  # resume itself does not touch it
    again.trainer.run()
    assert leftovers_at_start == [[]]
    assert again.trainer.state.epoch == 3
    assert _names(tmp_path) == [_ckpt_name(2), _ckpt_name(3)]
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

    run = _setup(tmp_path, max_epochs=1, values=[0.7])
    monkeypatch.setattr(atomic_mod.os, "replace", killed_replace)
    monkeypatch.setattr(atomic_mod.Path, "unlink", lambda self, missing_ok=False: None)  # no cleanup after a kill
    for target, write in [
        ("model.pt", lambda: run.ckpt._write_best(1, 0.7)),
        ("best.json", lambda: run.ckpt._write_best(1, 0.7)),
        (_ckpt_name(0), lambda: run.ckpt.save(run.trainer)),
    ]:
        kill_at[:] = [target]
        with pytest.raises(KeyboardInterrupt):
            write()
    monkeypatch.undo()
    assert sorted(p.name.split(".")[1] for p in left) == ["best", "checkpoint_epoch0000", "model"]
    assert all(p.exists() for p in left)
    (tmp_path / ".gitkeep").write_text("")
    again = _setup(tmp_path, max_epochs=1, values=[0.7])
    at_start: list[list[Path]] = []
    again.trainer.add_event_handler(Events.STARTED, lambda e: at_start.append([p for p in left if p.exists()]))
    again.trainer.run()
    assert at_start == [[]]
    assert (tmp_path / ".gitkeep").exists()  # other hidden files are not ours to delete
    names = sorted(p.name for p in tmp_path.iterdir())
    archived = [n for n in names if n.startswith("previous-")]  # the first run's finished files, moved aside
    assert sorted(set(names) - set(archived)) == [".gitkeep", "best.json", _ckpt_name(1), "model.pt"]
    assert len(archived) == 1 and (tmp_path / archived[0] / "model.pt").is_file()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    run = _setup(tmp_path, max_epochs=2)
    run.trainer.run()
    _truncate(tmp_path / _ckpt_name(2))
    again = _setup(tmp_path, max_epochs=2, init_seed=1)
    assert not _equal(_weights(again.net), run.weights[1])
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.checkpoint"):
        assert again.ckpt.resume() is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(_ckpt_name(2) in w for w in warnings)
    assert again.trainer.state.epoch == 1
    assert again.trainer.state.iteration == ITERS
    assert _equal(_weights(again.net), run.weights[1])
    assert again.scheduler.last_epoch == 1
    again.trainer.run()  # epoch 2 is redone and its checkpoint rewritten
    assert again.trainer.state.epoch == 2
    assert load_training_checkpoint(tmp_path / _ckpt_name(2))["trainer"]["epoch"] == 2


def test_all_checkpoints_corrupt_raises_naming_them(tmp_path):
    run = _setup(tmp_path, max_epochs=2)
    run.trainer.run()
    for name in _names(tmp_path):
        _truncate(tmp_path / name)
    again = _setup(tmp_path, max_epochs=2)
    with pytest.raises(CheckpointError) as info:
        again.ckpt.resume()
    assert _ckpt_name(1) in str(info.value) and _ckpt_name(2) in str(info.value)


# ---------------------------------------------------------------- resuming


def test_resume_without_checkpoints_starts_at_epoch_one(tmp_path):
    run = _setup(tmp_path / "models", max_epochs=2)
    assert run.ckpt.resume() is False
    assert run.trainer.state.epoch == 0 and run.trainer.state.iteration == 0
    epochs: list[int] = []
    run.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    run.trainer.run()
    assert epochs == [1, 2]


def test_resume_restores_trainer_optimizer_and_scheduler(tmp_path):
    run = _setup(tmp_path, max_epochs=2)
    run.trainer.run()
    again = _setup(tmp_path, max_epochs=4, init_seed=1)
    assert again.ckpt.resume() is False  # max_epochs raised from 2 to 4: not finished
    assert again.trainer.state.epoch == 2 and again.trainer.state.max_epochs == 4
    assert _equal(_weights(again.net), run.weights[2])
    assert again.opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    for p_old, p_new in zip(run.net.parameters(), again.net.parameters(), strict=True):
        assert torch.equal(run.opt.state[p_old]["momentum_buffer"], again.opt.state[p_new]["momentum_buffer"])
    epochs: list[int] = []
    again.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    again.trainer.run()
    assert epochs == [3, 4]
    assert again.ckpt.history == [{"epoch": e} for e in (1, 2, 3, 4)]


def test_resume_of_a_finished_run_reports_done(tmp_path):
    run = _setup(tmp_path, max_epochs=2)
    run.trainer.run()
    again = _setup(tmp_path, max_epochs=2)
    assert again.ckpt.resume() is True
    assert again.trainer.state.epoch == 0  # nothing to continue


def test_resume_with_a_different_epoch_length_is_refused(tmp_path):
    run = _setup(tmp_path, max_epochs=1)
    run.trainer.run()
    again = _setup(tmp_path, max_epochs=2, n=N + BATCH)
    with pytest.raises(CheckpointError, match=rf"written with {ITERS} iterations per epoch.*now gives {ITERS + 1}"):
        again.ckpt.resume()
    assert again.trainer.state.epoch == 0


def test_resume_refuses_a_checkpoint_missing_an_attached_state(tmp_path):
    run = _setup(tmp_path, max_epochs=1)  # no GradScaler
    run.trainer.run()
    again = _setup(tmp_path, max_epochs=2, fp16_scaler=True)
    with pytest.raises(CheckpointError, match="scaler"):
        again.ckpt.resume()


def test_grad_scaler_state_is_saved_and_restored(tmp_path):
    run = _setup(tmp_path, max_epochs=1, fp16_scaler=True)
    assert run.ckpt.save_dict["scaler"] is run.trainer.scaler
    run.trainer.run()
    run.trainer.scaler.update(new_scale=1234.0)
    run.ckpt.save(run.trainer)
    assert load_training_checkpoint(tmp_path / _ckpt_name(1))["state"]["scaler"]["scale"] == 1234.0
    again = _setup(tmp_path, max_epochs=2, fp16_scaler=True)
    assert again.trainer.scaler.get_scale() == 65536.0
    assert again.ckpt.resume() is False
    assert again.trainer.scaler.get_scale() == 1234.0
    again.trainer.run()
    assert again.trainer.scaler.get_scale() == 1234.0  # the same scaler object carried on training
    assert load_training_checkpoint(tmp_path / _ckpt_name(2))["state"]["scaler"]["scale"] == 1234.0


def _flips(dataset: Dataset, count: int = 24) -> list[bool]:
    original = torch.as_tensor(dataset.data[0]["image"])
    return [not torch.equal(torch.as_tensor(dataset[0]["image"]), original) for _ in range(count)]


def test_transform_random_states_are_restored(tmp_path):
    transform = Compose([RandFlipd(keys="image", prob=0.5)]).set_random_state(seed=3)
    run = _setup(tmp_path, max_epochs=1, transform=transform)
    run.trainer.run()  # draws from the transform's RandomState, then saves it
    expected = _flips(run.trainer.data_loader.dataset)
    assert 0 < sum(expected) < len(expected)
    again = _setup(tmp_path, max_epochs=2, transform=Compose([RandFlipd(keys="image", prob=0.5)]), init_seed=1)
    assert again.ckpt.resume() is False
    assert _flips(again.trainer.data_loader.dataset) == expected


def test_resume_refuses_a_changed_augmentation_chain(tmp_path):
    run = _setup(tmp_path, max_epochs=1, transform=Compose([RandFlipd(keys="image", prob=0.5)]))
    run.trainer.run()
    longer = Compose([RandFlipd(keys="image", prob=0.5), RandFlipd(keys="image", prob=0.5, spatial_axis=0)])
    again = _setup(tmp_path, max_epochs=2, transform=longer, init_seed=1)
    before = _weights(again.net)
    with pytest.raises(CheckpointError, match=rf"{_ckpt_name(1)}.*augmentation chain changed"):
        again.ckpt.resume()
    assert _equal(_weights(again.net), before)  # refused before anything was loaded
    assert again.trainer.state.epoch == 0


def test_loader_generator_and_global_rngs_are_restored(tmp_path):
    run = _setup(tmp_path, max_epochs=1, loader_generator=torch.Generator().manual_seed(5))
    run.trainer.run()
    order = list(iter(run.trainer.data_loader.sampler))
    after_save = (torch.rand(3), np.random.random(3))
    again = _setup(tmp_path, max_epochs=2, loader_generator=torch.Generator().manual_seed(77))
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
    first = _setup(tmp_path, max_epochs=3)
    first.trainer.run()
    before = sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt"))
    second = _setup(tmp_path, max_epochs=1)
    second.trainer.run()
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt")) == [_ckpt_name(1)]
    (archive,) = tmp_path.glob("previous-*")
    assert sorted(p.name for p in archive.glob("checkpoint_epoch*.pt")) == before
    for path in archive.glob("checkpoint_epoch*.pt"):
        load_training_checkpoint(path)


def test_resume_with_a_different_number_of_processes_is_refused(tmp_path):
    """A DDP checkpoint holds one RNG snapshot per rank; resuming it with another world size cannot continue each
    rank's streams, so it is refused with both counts named, before anything is restored."""
    run = _setup(tmp_path, max_epochs=1)
    run.trainer.run()
    path = tmp_path / _ckpt_name(1)
    ckpt = load_training_checkpoint(path)
    ckpt["rng_ranks"] = [ckpt["rng"], ckpt["rng"]]  # as rank 0 of a two-process run writes it
    torch.save(ckpt, path)
    again = _setup(tmp_path, max_epochs=2, init_seed=1)
    before = _weights(again.net)
    with pytest.raises(CheckpointError, match=r"2 process\(es\), but this run has 1"):
        again.ckpt.resume()
    assert _equal(before, _weights(again.net)) and again.trainer.state.epoch == 0
