"""Unit tests of :mod:`volcnn.engines.workflow`: seeding, deterministic mode, and ``run_training``'s resume and
non-finite-loss handling on a tiny CPU trainer."""

from __future__ import annotations

import os
import random

import monai.utils.misc
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset

from tests.engines.nan_loss import NaNAtLoss
from volcnn.engines.checkpoint import TrainingCheckpointer
from volcnn.engines.trainer import NonFiniteLossError, VolcnnTrainer
from volcnn.engines.workflow import run_training, seed_everything


@pytest.fixture(autouse=True)
def _keep_global_state(monkeypatch):
    """seed_everything changes process-wide settings: deterministic algorithms, cuDNN flags, every global RNG."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        monai.utils.misc._seed,
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored by monkeypatch afterwards
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic = saved[2]
    torch.backends.cudnn.benchmark = saved[3]
    random.setstate(saved[4])
    np.random.set_state(saved[5])
    torch.set_rng_state(saved[6])
    monai.utils.misc._seed = saved[7]


def _draw() -> tuple:
    return random.random(), float(np.random.random()), float(torch.rand(()))


# ---------------------------------------------------------------- seed_everything


@pytest.mark.parametrize("deterministic", [True, "true"])
def test_deterministic_turns_on_deterministic_algorithms(deterministic):
    torch.use_deterministic_algorithms(False)
    seed_everything(7, deterministic=deterministic)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_deterministic_keeps_a_user_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(1, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_not_deterministic_leaves_the_flag_alone():
    torch.use_deterministic_algorithms(False)
    seed_everything(7, deterministic="false")
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.parametrize("seed", [None, "none", "null", ""])
def test_deterministic_without_a_seed_is_refused(seed):
    torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="needs a seed"):
        seed_everything(seed, deterministic=True)
    assert not torch.are_deterministic_algorithms_enabled()


def test_same_seed_gives_the_same_draws_everywhere():
    seed_everything(123)
    first = _draw()
    seed_everything("123")  # command-line strings accepted
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first


def test_unseeded_run_differs_between_calls():
    seed_everything("none")
    first = _draw()
    seed_everything(None)
    assert _draw() != first


def test_bad_values_are_refused():
    with pytest.raises(ValueError):
        seed_everything("seven")
    with pytest.raises(ValueError, match="boolean"):
        seed_everything(1, deterministic="sometimes")


# ---------------------------------------------------------------- run_training


def _trainer(max_epochs: int, nan_at: int | None = None) -> VolcnnTrainer:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    data = [{"image": torch.rand(1, 8, 8, 8), "label": i % 2} for i in range(8)]
    return VolcnnTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=DataLoader(Dataset(data), batch_size=4),
        network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=NaNAtLoss(nan_at),
    )  # fmt: skip


def _checkpointer(trainer: VolcnnTrainer, folder) -> TrainingCheckpointer:
    ckpt = TrainingCheckpointer(folder, {"model": trainer.network, "optimizer": trainer.optimizer})
    ckpt.attach(trainer)
    return ckpt


@pytest.mark.parametrize("resume", [True, "true"])
def test_resume_without_a_checkpointer_is_refused(resume):
    trainer = _trainer(1)
    with pytest.raises(ValueError, match="TrainingCheckpointer"):
        run_training(trainer, None, resume=resume)
    assert trainer.state.epoch == 0


def test_run_without_resume_trains_from_scratch(tmp_path):
    trainer = _trainer(2)
    ckpt = _checkpointer(trainer, tmp_path)
    state = run_training(trainer, ckpt, resume=False)
    assert state is trainer.state and state.epoch == 2
    # a second run without resume starts again at epoch 1 despite the checkpoints
    again = _trainer(3)
    epochs: list[int] = []
    again.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    run_training(again, _checkpointer(again, tmp_path), resume="false")
    assert epochs == [1, 2, 3]


def test_resume_continues_and_a_finished_run_does_nothing(tmp_path):
    first = _trainer(2)
    run_training(first, _checkpointer(first, tmp_path), resume=True)  # nothing to resume: starts at 1
    assert first.state.epoch == 2
    longer = _trainer(3)
    epochs: list[int] = []
    longer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    assert run_training(longer, _checkpointer(longer, tmp_path), resume=True).epoch == 3
    assert epochs == [3]
    done = _trainer(3)
    done.add_event_handler(Events.STARTED, lambda e: pytest.fail("a finished run was started again"))
    state = run_training(done, _checkpointer(done, tmp_path), resume=True)
    assert state is done.state


def test_nan_loss_names_the_last_good_checkpoint(tmp_path):
    trainer = _trainer(3, nan_at=4)  # 2 iterations per epoch: epoch 2, iteration 4
    ckpt = _checkpointer(trainer, tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        run_training(trainer, ckpt)
    message = str(info.value)
    assert "epoch 2, iteration 4" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoint_epoch0001.pt'}" in message
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pt")) == ["checkpoint_epoch0001.pt"]


def test_nan_loss_before_any_checkpoint(tmp_path):
    trainer = _trainer(2, nan_at=1)
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 1.*no checkpoint had been written yet"):
        run_training(trainer, _checkpointer(trainer, tmp_path))
    trainer = _trainer(2, nan_at=2)
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written yet"):
        run_training(trainer, None)
