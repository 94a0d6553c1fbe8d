"""Unit tests of :class:`volcnn.engines.trainer.VolcnnTrainer`, ``AutocastInferer`` and ``SchedulerStepper``.

Tiny real MONAI engines on CPU: a one-convolution network, 8 random ``(1, 8, 8, 8)`` volumes, batch size 4
(2 iterations per epoch).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines.utils import IterationEvents

from tests.engines.nan_loss import NaNAtLoss
from volcnn.engines.amp import AmpPolicy
from volcnn.engines.trainer import AutocastInferer, NonFiniteLossError, SchedulerStepper, VolcnnTrainer

N = 8
BATCH = 4
ITERS = N // BATCH


def _net(head: bool = False) -> torch.nn.Sequential:
    """Conv -> global average pool -> flatten (-> linear head). CPU autocast runs the pooling in float32, so only
    the variant with a linear head ends in bf16 and shows that the trainer casts ``pred`` back to float32."""
    layers = [torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, *([torch.nn.Linear(2, 2)] if head else []))


def _loader(n: int = N, seed: int = 0) -> DataLoader:
    rng = np.random.default_rng(seed)
    data = [{"image": rng.random((1, 8, 8, 8), dtype=np.float32), "label": i % 2} for i in range(n)]
    return DataLoader(Dataset(data), batch_size=BATCH, shuffle=False, num_workers=0)


def _trainer(
    max_epochs: int = 1, loss=None, amp: object = False, amp_dtype: object = "auto", lr: float = 0.1, head: bool = False
):
    torch.manual_seed(0)
    net = _net(head)
    return VolcnnTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=_loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=loss if loss is not None else torch.nn.CrossEntropyLoss(),
        amp=amp,
        amp_dtype=amp_dtype,
    )


def _force_fp16_scaler(trainer: VolcnnTrainer) -> None:
    """fp16 autocast + GradScaler on CPU (works in torch 2.13), to exercise the scaler path without a GPU."""
    trainer.amp_policy = AmpPolicy("cpu", torch.float16)
    trainer.scaler = trainer.amp_policy.make_scaler()


def _weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _InfGradLoss(torch.nn.Module):
    """Loss whose value is finite (0) but whose gradient is infinite (d sqrt(x)/dx at 0), on chosen calls.

    On other calls it is a plain cross-entropy. ``bad_calls`` holds 1-based call numbers; ``None`` = every call.
    """

    def __init__(self, bad_calls: set[int] | None = None):
        super().__init__()
        self.bad_calls = bad_calls
        self.calls = 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.bad_calls is None or self.calls in self.bad_calls:
            s = pred.abs().sum()
            return torch.sqrt(s - s.detach())
        return self.ce(pred, label)


def _record_dtypes(net: torch.nn.Module, layer: int = 0) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    net[layer].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


# ---------------------------------------------------------------- autocast


def test_amp_on_cpu_runs_the_network_in_bf16_but_pred_and_loss_are_float32():
    trainer = _trainer(amp=True, amp_dtype="bfloat16", head=True)
    assert trainer.amp_policy == AmpPolicy("cpu", torch.bfloat16)
    assert trainer.amp and trainer.scaler is None
    conv_dtypes = _record_dtypes(trainer.network, 0)
    head_dtypes = _record_dtypes(trainer.network, -1)
    outputs: list[tuple[torch.dtype, torch.dtype]] = []
    trainer.add_event_handler(  # MONAI decollates the output at MODEL_COMPLETED
        IterationEvents.LOSS_COMPLETED,
        lambda e: outputs.append((e.state.output["pred"].dtype, e.state.output["loss"].dtype)),
    )
    before = _weights(trainer.network)
    trainer.run()
    assert conv_dtypes == [torch.bfloat16] * ITERS
    assert head_dtypes == [torch.bfloat16] * ITERS  # the network's own output is bf16...
    assert outputs == [(torch.float32, torch.float32)] * ITERS  # ...cast to float32 before the loss
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # master weights stay fp32
    assert not _equal(before, _weights(trainer.network))  # and they were trained


def test_amp_off_runs_the_network_in_float32():
    trainer = _trainer(amp=False)
    assert trainer.amp_policy.dtype is None and not trainer.amp
    conv_dtypes = _record_dtypes(trainer.network)
    trainer.run()
    assert conv_dtypes == [torch.float32] * ITERS


def test_bf16_trainer_does_not_acquire_a_scaler_on_run():
    """MONAI's ``Trainer.run`` would create a CUDA GradScaler whenever ``self.amp`` is true."""
    trainer = _trainer(max_epochs=1, amp=True, amp_dtype="bf16")
    assert trainer.amp
    trainer.run()
    assert trainer.scaler is None


def test_grad_scaler_survives_repeated_runs():
    trainer = _trainer(max_epochs=1)
    _force_fp16_scaler(trainer)
    scaler = trainer.scaler
    assert scaler is not None
    trainer.run()
    trainer.state.max_epochs = 2
    trainer.run()  # continues for one more epoch
    assert trainer.state.epoch == 2
    assert trainer.scaler is scaler
    trainer.run()  # a finished run starts again from scratch
    assert trainer.scaler is scaler


# ---------------------------------------------------------------- non-finite loss


def test_nan_loss_raises_before_the_weights_are_updated():
    bad_call = ITERS + 2  # epoch 2, second batch: global iteration 4
    trainer = _trainer(max_epochs=3, loss=NaNAtLoss(bad_call))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: snapshots.__setitem__(e.state.iteration, _weights(e.network))
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    message = str(info.value)
    assert "nan" in message.lower()
    assert "epoch 2" in message and f"iteration {bad_call}" in message
    assert f"batch 2 of {ITERS}" in message
    assert max(snapshots) == bad_call
    assert _equal(snapshots[bad_call], _weights(trainer.network))
    assert not _equal(snapshots[1], _weights(trainer.network))  # earlier steps did update


def test_nan_loss_raises_with_the_scaler_too():
    trainer = _trainer(max_epochs=1, loss=NaNAtLoss(1))
    _force_fp16_scaler(trainer)
    before = _weights(trainer.network)
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 1"):
        trainer.run()
    assert _equal(before, _weights(trainer.network))
    assert trainer.scaler.get_scale() == 65536.0  # not touched: the bad step never reached the scaler


# ---------------------------------------------------------------- skipped optimizer steps


def test_infinite_gradient_skips_the_step_and_the_epoch_scheduler():
    trainer = _trainer(max_epochs=2, loss=_InfGradLoss())
    _force_fp16_scaler(trainer)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    SchedulerStepper(scheduler, epoch_level=True).attach(trainer)
    flags: list[bool] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: flags.append(e.state.optimizer_stepped))
    per_epoch: list[int] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(e.state.epoch_optimizer_steps))
    before = _weights(trainer.network)
    losses: list[float] = []
    trainer.add_event_handler(
        IterationEvents.LOSS_COMPLETED, lambda e: losses.append(float(e.state.output["loss"].detach()))
    )
    trainer.run()
    assert losses == [0.0] * (2 * ITERS)  # the loss itself was finite
    assert flags == [False] * (2 * ITERS)
    assert per_epoch == [0, 0]
    assert trainer.state.epoch_optimizer_steps == 0
    assert _equal(before, _weights(trainer.network))
    assert trainer.optimizer.param_groups[0]["lr"] == 0.1
    assert trainer.scaler.get_scale() == 65536.0 / 2 ** (2 * ITERS)  # backed off once per skipped step


def test_normal_loss_steps_and_advances_the_epoch_scheduler():
    trainer = _trainer(max_epochs=2)
    _force_fp16_scaler(trainer)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    SchedulerStepper(scheduler, epoch_level=True).attach(trainer)
    per_epoch: list[int] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(e.state.epoch_optimizer_steps))
    before = _weights(trainer.network)
    trainer.run()
    assert per_epoch == [ITERS, ITERS]  # the counter restarts every epoch
    assert trainer.state.optimizer_stepped
    assert not _equal(before, _weights(trainer.network))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_epoch_scheduler_steps_when_some_iterations_of_the_epoch_stepped():
    trainer = _trainer(max_epochs=2, loss=_InfGradLoss(bad_calls={1, 2, 3}))  # epoch 1 all bad, epoch 2 half
    _force_fp16_scaler(trainer)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
    SchedulerStepper(scheduler, epoch_level=True).attach(trainer)
    lrs: list[float] = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: lrs.append(e.optimizer.param_groups[0]["lr"]))
    trainer.run()
    assert lrs == [0.1, 0.05]


def test_iteration_scheduler_steps_exactly_when_the_optimizer_stepped():
    bad = {1, 3, 4, 7}
    trainer = _trainer(max_epochs=4, loss=_InfGradLoss(bad_calls=bad), lr=0.01)
    _force_fp16_scaler(trainer)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.9)
    SchedulerStepper(scheduler, epoch_level=False).attach(trainer)
    real_steps: list[int] = []
    trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: real_steps.append(trainer.state.iteration))
    flags: list[bool] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: flags.append(e.state.optimizer_stepped))
    trainer.run()
    total = 4 * ITERS
    assert real_steps == [i for i in range(1, total + 1) if i not in bad]
    assert flags == [i not in bad for i in range(1, total + 1)]
    assert scheduler.last_epoch == len(real_steps)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.9 ** len(real_steps))


def test_iteration_scheduler_without_scaler_steps_every_iteration():
    trainer = _trainer(max_epochs=2)
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.9)
    SchedulerStepper(scheduler, epoch_level=False).attach(trainer)
    trainer.run()
    assert scheduler.last_epoch == 2 * ITERS


def test_scheduler_stepper_refuses_reduce_on_plateau():
    opt = torch.optim.SGD(_net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        SchedulerStepper(torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


def test_scheduler_stepper_logs_a_skipped_step(caplog):
    trainer = _trainer(max_epochs=1, loss=_InfGradLoss())
    _force_fp16_scaler(trainer)
    SchedulerStepper(torch.optim.lr_scheduler.StepLR(trainer.optimizer, 1), epoch_level=False).attach(trainer)
    with caplog.at_level(logging.INFO, logger="volcnn.engines.trainer"):
        trainer.run()
    assert caplog.text.count("LR scheduler not stepped") == ITERS


# ---------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_steps_once_per_group_and_at_the_epoch_end():
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(Dataset([{"image": torch.rand(1, 8, 8, 8), "label": i % 2} for i in range(10)]), batch_size=2)
    trainer = VolcnnTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(), accumulation_steps=2,
    )  # fmt: skip
    steps: list[int] = []
    opt.register_step_post_hook(lambda o, a, k: steps.append(trainer.state.iteration))
    trainer.run()
    # 5 batches per epoch: steps after batches 2, 4 and 5 (the epoch's last) of each epoch
    assert steps == [2, 4, 5, 7, 9, 10]


# ---------------------------------------------------------------- AutocastInferer


def test_autocast_inferer_runs_bf16_and_returns_float32():
    net = _net(head=True)
    dtypes = _record_dtypes(net, 0)
    head_dtypes = _record_dtypes(net, -1)
    x = torch.rand(2, 1, 8, 8, 8)
    out = AutocastInferer(amp=True, amp_dtype="bfloat16", device="cpu")(x, net)
    assert dtypes == [torch.bfloat16] and head_dtypes == [torch.bfloat16]
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    with torch.no_grad():
        ref = net(x)
    assert dtypes[-1] == torch.float32
    assert torch.allclose(out, ref, atol=0.05)
    assert not torch.equal(out, ref)  # computed in bf16, not fp32


def test_autocast_inferer_disabled_is_plain_fp32():
    net = _net()
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        out = AutocastInferer(amp=False)(x, net)
        assert torch.equal(out, net(x))


def test_autocast_inferer_passes_non_float_outputs_through():
    out = AutocastInferer(amp=True, amp_dtype="bf16")(torch.rand(2, 3), lambda x: x.argmax(dim=1))
    assert out.dtype == torch.int64


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_amp_training_steps(dtype):
    """On CUDA: fp16 autocast with a GradScaler that keeps its state across runs, or bf16 without one."""
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = _net(head=True).to(device)
    trainer = VolcnnTrainer(
        device=device,
        max_epochs=2,
        train_data_loader=_loader(),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.CrossEntropyLoss(),
        amp=True,
        amp_dtype=dtype,
    )
    conv_dtypes = _record_dtypes(trainer.network, 0)
    before = _weights(trainer.network)
    trainer.run()
    assert set(conv_dtypes) == {getattr(torch, dtype)}
    assert not _equal(before, _weights(trainer.network))
    assert trainer.state.epoch_optimizer_steps > 0
    if dtype == "float16":
        assert trainer.scaler is not None and trainer.scaler.is_enabled()
        scaler = trainer.scaler
        trainer.state.max_epochs = 3
        trainer.run()  # continuing keeps the same scaler object (MONAI's Trainer.run would replace it)
        assert trainer.scaler is scaler
    else:
        assert trainer.scaler is None


def test_deterministic_mode_turns_cpu_bf16_off(caplog):
    """oneDNN's bf16 Conv3d weight gradients are not reproducible run to run, so deterministic mode trains in fp32."""
    torch.use_deterministic_algorithms(True)  # restored by the conftest fixture
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(amp=True, amp_dtype="bfloat16")
    assert not trainer.amp_policy.enabled and "not reproducible" in caplog.text
    conv_dtypes = _record_dtypes(trainer.network, 0)
    trainer.run()
    assert conv_dtypes == [torch.float32] * ITERS
