"""MONAI SupervisedTrainer with device-aware AMP, a persistent GradScaler and a loud stop on a non-finite loss.

The subclass changes only the iteration and ``run``; everything else (events, decollation, post-processing,
metrics, handlers) is MONAI's. It records whether the optimizer actually stepped, because a GradScaler
skips steps whose gradients overflowed and an LR scheduler must not advance on those
(:class:`SchedulerStepper`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from monai.inferers import Inferer
from monai.utils.enums import CommonKeys as Keys

from volcnn.engines.amp import AmpPolicy, resolve_amp

__all__ = ["NonFiniteLossError", "VolcnnTrainer", "AutocastInferer", "SchedulerStepper"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the bad gradients touch the weights."""


class VolcnnTrainer(SupervisedTrainer):
    """``monai.engines.SupervisedTrainer`` whose mixed precision follows :func:`volcnn.engines.amp.resolve_amp`.

    Takes every argument of ``SupervisedTrainer`` plus:

    Args:
        amp: turn autocast on (bool-like; the bundle's ``amp`` key).
        amp_dtype: ``"auto"``, ``"float16"`` or ``"bfloat16"`` (the bundle's ``amp_dtype`` key).

    Differences from MONAI:

    - autocast on CPU (bf16) as well as CUDA, with the dtype chosen per device; the network output is cast
      to float32 before the loss. In deterministic mode (``torch.use_deterministic_algorithms(True)``) CPU
      autocast is turned off, because oneDNN's bf16 convolution weight gradients are not reproducible;
    - one ``GradScaler`` (``self.scaler``) for the whole life of the trainer, so a checkpoint can carry its
      state; MONAI replaces it at every ``run()``;
    - a NaN/Inf loss raises :class:`NonFiniteLossError` naming the epoch and iteration, before ``backward``;
    - ``state.optimizer_stepped`` (this iteration) and ``state.epoch_optimizer_steps`` (this epoch) tell
      schedulers whether the optimizer really stepped.
    """

    def __init__(self, *args: Any, amp: object = False, amp_dtype: object = "auto", **kwargs: Any) -> None:
        super().__init__(*args, amp=False, **kwargs)  # type: ignore[misc]
        self.amp_policy: AmpPolicy = resolve_amp(amp, amp_dtype, self.state.device)
        if (
            self.amp_policy.device_type == "cpu"
            and self.amp_policy.enabled
            and torch.are_deterministic_algorithms_enabled()
        ):
            # measured with torch 2.13: oneDNN's bf16 Conv3d weight gradients differ from run to run for some layer
            # shapes (e.g. resnet10's layer3), even on one thread, so bf16 training on CPU is not reproducible
            logger.warning("deterministic mode: bf16 autocast on CPU is not reproducible (oneDNN weight gradients); "
                           "training in fp32")  # fmt: skip
            self.amp_policy = AmpPolicy("cpu", None)
        self.amp = self.amp_policy.enabled
        self.scaler = self.amp_policy.make_scaler()  # type: ignore[assignment]
        self.state.optimizer_stepped = False
        self.state.epoch_optimizer_steps = 0
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_step_count)
        logger.info("training precision: %s", self.amp_policy.describe())

    @staticmethod
    def _reset_step_count(engine: Engine) -> None:
        engine.state.epoch_optimizer_steps = 0  # type: ignore[attr-defined]

    def run(self) -> None:  # type: ignore[override]
        """Run (or continue) training; unlike MONAI's ``Trainer.run`` this keeps the existing GradScaler."""
        Workflow.run(self)  # not Trainer.run, which replaces the scaler

    def _accumulation(self, engine: VolcnnTrainer) -> tuple[bool, bool]:
        acc = engine.accumulation_steps
        if acc <= 1:
            return True, True
        local = engine.state.iteration - 1
        epoch_length = engine.state.epoch_length
        if epoch_length is not None:
            local %= epoch_length
            return local % acc == 0, (local + 1) % acc == 0 or (local + 1) == epoch_length
        return local % acc == 0, (local + 1) % acc == 0

    def _iteration(self, engine: VolcnnTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One step: forward under autocast, float32 loss, (scaled) backward, optimizer step.

        ``batchdata["image"]`` is ``(B, C, D, H, W)`` float32 (already windowed), ``batchdata["label"]`` ``(B,)``.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args: tuple = batch[2] if len(batch) > 2 else ()
        kwargs: dict = batch[3] if len(batch) > 3 else {}
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        should_zero_grad, should_step = self._accumulation(engine)
        acc = max(engine.accumulation_steps, 1)

        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine.amp_policy.autocast():
            pred = engine.inferer(inputs, engine.network, *args, **kwargs)
        engine.state.output[Keys.PRED] = pred.float() if torch.is_floating_point(pred) else pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        value = float(loss.detach())
        if not math.isfinite(value):
            epoch_length = engine.state.epoch_length or 0
            in_epoch = (engine.state.iteration - 1) % epoch_length + 1 if epoch_length else engine.state.iteration
            raise NonFiniteLossError(
                f"training loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration} "
                f"(batch {in_epoch} of {epoch_length or '?'} in the epoch); training stopped before the weights "
                "were updated"
            )

        scaled = loss / acc if acc > 1 else loss
        stepped = False
        if engine.scaler is not None:
            engine.scaler.scale(scaled).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                scale_before = engine.scaler.get_scale()
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
                # update() lowers the scale exactly when it found inf/NaN gradients and skipped the step
                stepped = engine.scaler.get_scale() >= scale_before
        else:
            scaled.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if should_step:
                engine.optimizer.step()
                stepped = True
        engine.state.optimizer_stepped = stepped
        engine.state.epoch_optimizer_steps += int(stepped)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class AutocastInferer(Inferer):
    """``SimpleInferer`` under the device-aware AMP policy; the output comes back as float32.

    For evaluators: MONAI's ``SupervisedEvaluator(amp=True)`` only ever autocasts on CUDA. Returns
    ``network(inputs)`` of shape ``(B, K)`` in float32 so probabilities and metrics are not computed in bf16.
    """

    def __init__(self, amp: object = False, amp_dtype: object = "auto", device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.policy = resolve_amp(amp, amp_dtype, device)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        with self.policy.autocast():
            out = network(inputs, *args, **kwargs)
        return out.float() if isinstance(out, torch.Tensor) and torch.is_floating_point(out) else out


class SchedulerStepper:
    """Steps an LR scheduler only when the optimizer stepped (a GradScaler may skip steps).

    Args:
        lr_scheduler: any ``torch.optim.lr_scheduler`` scheduler except ``ReduceLROnPlateau``.
        epoch_level: step at the end of every epoch in which the optimizer stepped at least once; otherwise
            after every iteration whose optimizer step happened.
    """

    def __init__(self, lr_scheduler: Any, epoch_level: bool = True) -> None:
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("ReduceLROnPlateau needs a metric; step it from a validation handler instead")
        self.lr_scheduler = lr_scheduler
        self.epoch_level = epoch_level

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        if self.epoch_level:
            stepped = getattr(engine.state, "epoch_optimizer_steps", 1) > 0
        else:
            stepped = bool(getattr(engine.state, "optimizer_stepped", True))
        if stepped:
            self.lr_scheduler.step()
        else:
            logger.info("optimizer did not step (GradScaler skipped it); LR scheduler not stepped")
