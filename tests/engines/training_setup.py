"""A tiny CPU trainer wired like the bundle's ``train#handlers`` (fake validation, LR scheduler, best model, early
stopping, checkpointer last), shared by the checkpoint, best-model and early-stopping tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from volcnn.engines.amp import AmpPolicy
from volcnn.engines.best_model import BestModelSaver
from volcnn.engines.checkpoint import TrainingCheckpointer
from volcnn.engines.early_stopping import ValidationEarlyStopping
from volcnn.engines.trainer import SchedulerStepper, VolcnnTrainer

N = 8
BATCH = 4
ITERS = N // BATCH
KEY = "val_auc"


class FakeValidator:
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


def net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())


def data(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"image": rng.random((1, 8, 8, 8), dtype=np.float32), "label": i % 2} for i in range(n)]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ckpt_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch:04d}.pt"


def names(folder: Path, pattern: str = "checkpoint_epoch*.pt") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def setup(
    ckpt_dir: Path,
    max_epochs: int = 3,
    values: list[float] | None = None,
    n: int = N,
    transform=None,
    loader_generator: torch.Generator | None = None,
    fp16_scaler: bool = False,
    init_seed: int = 0,
    every: int = 1,
    keep_last: int = 2,
    early_stop_patience: int = 0,
    mode: str = "max",
    min_delta: float = 0.0,
) -> SimpleNamespace:
    """A trainer wired like the bundle: (fake) validation, the LR scheduler, the best-model saver, early stopping,
    then the checkpointer last, whose ``save_dict`` holds the two handlers as in ``train.json``."""
    torch.manual_seed(init_seed)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(
        Dataset(data(n), transform=transform),
        batch_size=BATCH,
        shuffle=loader_generator is not None,
        generator=loader_generator,
        num_workers=0,
    )
    trainer = VolcnnTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=model, optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(),
    )  # fmt: skip
    if fp16_scaler:
        trainer.amp_policy = AmpPolicy("cpu", torch.float16)
        trainer.scaler = trainer.amp_policy.make_scaler()
    validator = FakeValidator(values, every) if values is not None else None
    if validator is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, validator)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    SchedulerStepper(scheduler).attach(trainer)
    # per-epoch weights and torch RNG, recorded just before the checkpointer runs
    per_epoch_weights: dict[int, dict[str, torch.Tensor]] = {}
    rng_at_save: dict[int, torch.Tensor] = {}

    def record(engine) -> None:
        per_epoch_weights[engine.state.epoch] = weights(model)
        rng_at_save[engine.state.epoch] = torch.get_rng_state()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    key = KEY if validator is not None else None
    best = BestModelSaver(ckpt_dir, model, validator=validator, key_metric=key, mode=mode, min_delta=min_delta)
    best.attach(trainer)
    early = ValidationEarlyStopping(early_stop_patience, validator, key, mode=mode, min_delta=min_delta)
    early.attach(trainer)
    save_dict = {"model": model, "optimizer": opt, "lr_scheduler": scheduler, "best_model": best,
                 "early_stopping": early}  # fmt: skip
    checkpointer = TrainingCheckpointer(ckpt_dir, save_dict, keep_last=keep_last)
    checkpointer.attach(trainer)
    return SimpleNamespace(trainer=trainer, ckpt=checkpointer, best=best, early=early, validator=validator, net=model,
                           opt=opt, scheduler=scheduler, weights=per_epoch_weights, rng=rng_at_save)  # fmt: skip
