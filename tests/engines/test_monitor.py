from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import volcnn.engines.progress as progress_mod
from volcnn.engines.dist import is_rank0
from volcnn.engines.monitor import TrainingMonitor, loss_from_output
from volcnn.engines.progress import progress_bar
from volcnn.engines.roc_auc import RocAuc
from volcnn.evaluation.patches import patch_view

LR = 0.1
BATCH = 4
N_TRAIN = 12  # 3 iterations per epoch
N_VAL = 8


def _n_handlers(engine: Engine) -> int:
    return sum(len(v) for v in engine._event_handlers.values())


def _data(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 8, 8, 8), dtype=np.float32), "label": i % 2} for i in range(n)]


class _FailingLoss(torch.nn.Module):
    """Cross-entropy that raises on call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at = fail_at
        self.calls = 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("boom in training")
        return self.ce(pred, label)


def _build(max_epochs: int = 2, fail_at: int | None = None, monitor: dict | None = None):
    """A tiny MONAI trainer + evaluator wired like the bundle (softmax postprocessing, RocAuc key metrics); with
    ``monitor`` (its arguments), a ``TrainingMonitor`` listed in ``train_handlers`` as ``train.json`` lists it."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()
    ).to(device)
    post = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="label", to_onehot=2)])
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(Dataset(_data(N_VAL, 1)), batch_size=BATCH, shuffle=False),
        network=net,
        postprocessing=post,
        key_val_metric={"val_auc": RocAuc(output_transform=from_engine(["pred", "label"]))},
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=DataLoader(Dataset(_data(N_TRAIN, 0)), batch_size=BATCH, shuffle=False),
        network=net,
        optimizer=optimizer,
        loss_function=_FailingLoss(fail_at),
        postprocessing=post,
        key_train_metric={"train_auc": RocAuc(output_transform=from_engine(["pred", "label"]))},
        train_handlers=[
            # steps at EPOCH_COMPLETED before the monitor's handler: the monitor must log the lr used in the epoch
            LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5), print_lr=False),
            ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
            *([TrainingMonitor(validator=evaluator, **monitor)] if monitor is not None else []),
        ],
    )
    return trainer, evaluator


def _record(trainer: Engine, evaluator: Engine) -> dict:
    """Independent record of what the engines produced: per-iteration losses and per-epoch validation metrics."""
    rec: dict = {"loss": {}, "val_auc": {}}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine: Engine) -> None:
        rec["loss"][engine.state.iteration] = float(from_engine(["loss"], first=True)(engine.state.output))

    @evaluator.on(Events.COMPLETED)
    def _val(engine: Engine) -> None:
        rec["val_auc"][trainer.state.epoch] = float(engine.state.metrics["val_auc"])

    return rec


def _events(log_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def _scalars(ea: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in ea.Scalars(tag)}


def test_training_run_writes_scalars_and_patch_grid(tmp_path: Path):
    trainer, evaluator = _build()
    log_dir = tmp_path / "tb"
    monitor = TrainingMonitor(log_dir, validator=evaluator, num_images=3, log_every_n_iters=1)
    monitor.attach(trainer)
    rec = _record(trainer, evaluator)
    assert not log_dir.exists()  # lazy writer
    trainer.run()

    ea = _events(log_dir)
    tags = set(ea.Tags()["scalars"])
    expected = {"train/loss", "train/loss_epoch", "train/lr/group_0", "train/samples_per_s", "train/epoch_time_s"}
    assert expected | {"train/train_auc", "val/val_auc", "val/time_s"} <= tags
    assert not any(t.startswith(("gpu/", "amp/")) for t in tags)  # CPU, no AMP

    # iteration losses are exactly the trainer's (float32 in the event file)
    loss = _scalars(ea, "train/loss")
    assert sorted(loss) == list(range(1, 7))
    for it, value in rec["loss"].items():
        assert loss[it] == pytest.approx(value, rel=1e-6)
    loss_epoch = _scalars(ea, "train/loss_epoch")
    assert sorted(loss_epoch) == [1, 2]
    assert loss_epoch[1] == pytest.approx(np.mean([rec["loss"][i] for i in (1, 2, 3)]), rel=1e-6)
    assert loss_epoch[2] == pytest.approx(np.mean([rec["loss"][i] for i in (4, 5, 6)]), rel=1e-6)

    # the lr in effect during each epoch, although the scheduler stepped before the monitor's EPOCH_COMPLETED; Ignite's
    # OptimizerParamsHandler names it per parameter group even when there is one
    assert "train/lr" not in tags
    lr = _scalars(ea, "train/lr/group_0")
    assert lr == {1: pytest.approx(LR), 2: pytest.approx(LR / 2)}
    sps = _scalars(ea, "train/samples_per_s")
    assert sorted(sps) == [1, 2] and all(v > 0 for v in sps.values())
    epoch_time = _scalars(ea, "train/epoch_time_s")
    assert sorted(epoch_time) == [1, 2]
    for epoch in (1, 2):  # throughput is N_TRAIN samples over the training time of the epoch
        assert sps[epoch] == pytest.approx(N_TRAIN / epoch_time[epoch], rel=1e-4)

    val = _scalars(ea, "val/val_auc")
    assert sorted(val) == [1, 2]
    for epoch, value in rec["val_auc"].items():
        assert val[epoch] == pytest.approx(value, rel=1e-6)
    assert sorted(_scalars(ea, "train/train_auc")) == [1, 2]

    images = ea.Images("val/patches")
    assert [im.step for im in images] == [1, 2]
    for im in images:
        assert (im.width, im.height) == (480, int(round(2.2 * 3 * 80)))  # 6 in wide, 2.2 in per row, 80 dpi
        pixels = np.asarray(Image.open(io.BytesIO(im.encoded_image_string)).convert("L"))
        assert pixels.shape == (im.height, im.width)
        assert pixels.min() < 64 and pixels.max() > 200 and len(np.unique(pixels)) > 20  # slices drawn, not blank
    assert not monitor.tb.is_open  # closed on COMPLETED


def test_monitor_listed_in_train_handlers_logs_the_learning_rate(tmp_path: Path):
    """MONAI attaches ``train_handlers`` before the trainer has its optimizer; the rate is still logged."""
    trainer, _ = _build(max_epochs=2, monitor={"log_dir": tmp_path, "log_every_n_iters": 3})
    trainer.run()
    ea = _events(tmp_path)
    assert _scalars(ea, "train/lr/group_0") == {1: pytest.approx(LR), 2: pytest.approx(LR / 2)}
    assert {"train/loss", "train/train_auc", "val/val_auc", "val/time_s"} <= set(ea.Tags()["scalars"])
    assert [im.step for im in ea.Images("val/patches")] == [1, 2]


def test_image_interval_and_iteration_period(tmp_path: Path):
    trainer, evaluator = _build(max_epochs=2)
    TrainingMonitor(tmp_path, validator=evaluator, num_images=1, image_interval=2, log_every_n_iters=2).attach(trainer)
    trainer.run()
    ea = _events(tmp_path)
    assert [im.step for im in ea.Images("val/patches")] == [2]
    assert ea.Images("val/patches")[0].height == int(round(2.2 * 80))
    assert sorted(_scalars(ea, "train/loss")) == [2, 4, 6]


def test_non_rank0_attaches_nothing_and_writes_nothing(tmp_path: Path):
    trainer, evaluator = _build(max_epochs=1)
    before = (_n_handlers(trainer), _n_handlers(evaluator))
    TrainingMonitor(tmp_path / "tb", validator=evaluator, rank=1).attach(trainer)
    assert (_n_handlers(trainer), _n_handlers(evaluator)) == before
    trainer.run()
    assert not (tmp_path / "tb").exists()


def test_constructing_creates_nothing(tmp_path: Path):
    TrainingMonitor(tmp_path / "tb", validator=None)
    assert not (tmp_path / "tb").exists()
    assert is_rank0()  # no process group in the tests


class _ExceptionSpy:
    """An ``EXCEPTION_RAISED`` handler like MONAI's ``CheckpointSaver``: records the exception, then re-raises it
    (or swallows it with ``reraise=False``)."""

    def __init__(self, reraise: bool = True):
        self.reraise = reraise
        self.seen: list[BaseException] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        self.seen.append(e)
        if self.reraise:
            raise e


@pytest.mark.parametrize("order", ["alone", "monitor_first", "stats_first"])
def test_exception_propagates_and_events_are_flushed(tmp_path: Path, order: str):
    trainer, evaluator = _build(max_epochs=2, fail_at=5)  # second iteration of epoch 2
    monitor = TrainingMonitor(tmp_path, validator=evaluator, log_every_n_iters=1)
    spy = _ExceptionSpy()
    handlers = {
        "alone": [monitor],
        "monitor_first": [monitor, spy],
        "stats_first": [StatsHandler(iteration_log=False), monitor, spy],
    }
    for handler in handlers[order]:
        handler.attach(trainer)
    with pytest.raises(RuntimeError, match="boom in training"):
        trainer.run()

    if order == "stats_first":
        # StatsHandler re-raises, so Ignite calls no later EXCEPTION_RAISED handler: the writer stays open, but what
        # was written up to the last epoch end was flushed
        assert monitor.tb.is_open and spy.seen == []
        monitor.close()
    else:
        assert not monitor.tb.is_open  # closed by the monitor's EXCEPTION_RAISED handler
        # the monitor does not stop later EXCEPTION_RAISED handlers (e.g. CheckpointSaver's save on exception).
        # (Ignite fires EXCEPTION_RAISED twice for an exception inside an iteration that a handler re-raises: once
        # from the epoch loop, once from the run loop.)
        assert (len(spy.seen) > 0) == (order == "monitor_first")
    ea = _events(tmp_path)
    if order != "stats_first":  # iteration 4 was logged after the last per-epoch flush
        assert sorted(_scalars(ea, "train/loss")) == [1, 2, 3, 4]
    assert {1, 2, 3} <= set(_scalars(ea, "train/loss"))
    assert sorted(_scalars(ea, "train/loss_epoch")) == [1]
    assert sorted(_scalars(ea, "val/val_auc")) == [1]


def test_monitor_keeps_ignites_exception_semantics(tmp_path: Path):
    """With another handler that swallows the exception, ``run()`` returns as it would without the monitor."""
    trainer, _ = _build(max_epochs=1, fail_at=2)
    monitor = TrainingMonitor(tmp_path, log_every_n_iters=1)
    monitor.attach(trainer)
    swallow = _ExceptionSpy(reraise=False)
    swallow.attach(trainer)
    trainer.run()
    assert len(swallow.seen) == 1 and not monitor.tb.is_open
    assert sorted(_scalars(_events(tmp_path), "train/loss")) == [1]


def test_plain_ignite_engine_without_optimizer_loss_or_validator(tmp_path: Path):
    engine = Engine(lambda e, b: None)  # no optimizer, no loss, output None, batch without "image"
    monitor = TrainingMonitor(tmp_path, log_every_n_iters=1)
    monitor.attach(engine)
    n = _n_handlers(engine)
    monitor.attach(engine)  # idempotent
    assert _n_handlers(engine) == n
    engine.run([1, 2, 3], max_epochs=2)
    tags = set(_events(tmp_path).Tags()["scalars"])
    assert tags == {"train/epoch_time_s"}


def test_lr_per_param_group(tmp_path: Path):
    w1, w2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    engine = Engine(lambda e, b: {"loss": torch.tensor(float(b))})
    engine.optimizer = torch.optim.SGD([{"params": [w1], "lr": 0.1}, {"params": [w2], "lr": 0.01}])  # type: ignore[attr-defined]
    TrainingMonitor(tmp_path, log_every_n_iters=0).attach(engine)
    engine.run([1, 2, 3], max_epochs=1)
    ea = _events(tmp_path)
    assert "train/lr" not in ea.Tags()["scalars"] and "train/loss" not in ea.Tags()["scalars"]
    assert _scalars(ea, "train/lr/group_0") == {1: pytest.approx(0.1)}
    assert _scalars(ea, "train/lr/group_1") == {1: pytest.approx(0.01)}
    assert _scalars(ea, "train/loss_epoch") == {1: pytest.approx(2.0)}


def test_loss_and_patch_extraction():
    assert loss_from_output([{"loss": 0.5}, {"loss": 0.5}]) == 0.5
    assert loss_from_output({"loss": torch.tensor(0.25)}) == 0.25
    assert loss_from_output(torch.tensor(1.5)) == 1.5
    assert loss_from_output([{"pred": 1}]) is None
    assert loss_from_output(None) is None

    image = torch.arange(4 * 6 * 8, dtype=torch.float32).reshape(1, 4, 6, 8)
    onehot = patch_view({"image": image, "label": torch.tensor([0.0, 1.0]), "pred": torch.tensor([0.27, 0.73])})
    assert onehot is not None and onehot.title() == "label=1  p=0.73"
    assert [s.shape for s in onehot.slices] == [(6, 8), (4, 8), (4, 6)]
    scalar = patch_view({"image": image, "label": torch.tensor([1]), "pred": torch.tensor([0.6, 0.4])})
    assert scalar is not None and scalar.title() == "label=1  p=0.40"
    multi = patch_view({"image": image[0], "label": 2, "pred": torch.tensor([0.1, 0.7, 0.2])})
    assert multi is not None and multi.title() == "label=2  p=0.70 (class 1)"
    assert patch_view({"pred": torch.tensor([0.5, 0.5])}) is None
    assert patch_view({"image": torch.zeros(1, 4, 6, 8), "label": 1}) is None  # constant: nothing to show


def test_progress_bar(monkeypatch: pytest.MonkeyPatch):
    engine = Engine(lambda e, b: [{"loss": float(b)}])
    n = _n_handlers(engine)
    progress_bar(engine, "false")
    progress_bar(engine, False)
    assert _n_handlers(engine) == n
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    progress_bar(engine, "auto")
    assert _n_handlers(engine) == n
    with pytest.raises(ValueError, match="expected a boolean"):
        progress_bar(engine, "sometimes")

    monkeypatch.setattr(progress_mod, "is_rank0", lambda: False)
    progress_bar(engine, "true")
    assert _n_handlers(engine) == n
    monkeypatch.setattr(progress_mod, "is_rank0", lambda: True)
    progress_bar(engine, "true")
    assert _n_handlers(engine) > n
    engine.run([1.0, 2.0, 3.0], max_epochs=2)  # the bar writes to the (captured) stderr
    assert "loss=" in sys.stderr.getvalue()  # type: ignore[attr-defined]


def test_gpu_memory_and_amp_scale_scalars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The CUDA / AMP branches, with CUDA faked (the real ones are exercised by the gpu test below)."""
    resets: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))

    class _Scaler:
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 1024.0

    engine = Engine(lambda e, b: None)
    engine.state.device = torch.device("cuda", 0)
    engine.scaler = _Scaler()  # type: ignore[attr-defined]
    TrainingMonitor(tmp_path).attach(engine)
    engine.run([1, 2], max_epochs=2)
    ea = _events(tmp_path)
    assert _scalars(ea, "gpu/max_memory_allocated_mb") == {1: 3.0, 2: 3.0}
    assert _scalars(ea, "amp/scale") == {1: 1024.0, 2: 1024.0}
    assert resets == [torch.device("cuda", 0)] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_amp_run(tmp_path: Path):
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=2,
        train_data_loader=DataLoader(Dataset(_data(N_TRAIN, 0)), batch_size=BATCH),
        network=net.to(device),
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        loss_function=torch.nn.CrossEntropyLoss(),
        amp=True,
    )
    TrainingMonitor(tmp_path).attach(trainer)
    trainer.run()
    ea = _events(tmp_path)
    mem = _scalars(ea, "gpu/max_memory_allocated_mb")
    assert sorted(mem) == [1, 2] and all(v > 0 for v in mem.values())
    assert sorted(_scalars(ea, "amp/scale")) == [1, 2]
