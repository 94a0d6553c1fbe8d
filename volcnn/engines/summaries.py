"""The TensorBoard summaries no MONAI or Ignite handler writes; :class:`~volcnn.engines.monitor.TrainingMonitor`
attaches them beside Ignite's ``OutputHandler`` and ``OptimizerParamsHandler``.

Why each one is ours:

* ``train/loss_epoch``: Ignite's ``Average`` metric would do the sum, but an Ignite metric all-reduces across
  processes in ``compute()``; the monitor is attached on rank 0 only, so under DDP rank 0 would wait forever in a
  collective the other ranks never enter. As a metric it would also appear in ``trainer.state.metrics`` and so in
  every ``StatsHandler`` line. A running mean in the handler has neither problem.
* ``train/samples_per_s`` and ``train/epoch_time_s``: Ignite measures the epoch (``engine.state.times``), which is
  used here, but nothing in either library counts the samples of an epoch or writes the time as a scalar.
* ``amp/scale``: the GradScaler lives on our :class:`~volcnn.engines.trainer.VolcnnTrainer`, which no library
  handler knows about.
* ``gpu/max_memory_allocated_mb``: Ignite's ``GpuInfo`` reports the device's used memory as a percentage, from NVML
  (``pynvml<12``, all processes, the caching allocator's reserve included), not the peak of torch's allocations in
  this process, which is what decides whether a batch size fits.
* ``val/time_s``: Ignite times the validation run (``validator.state.times``), but writes no scalar of it.
* ``val/patches``: MONAI's ``TensorBoardImageHandler`` writes each 3-D volume as an animated GIF along one axis,
  without the label or the predicted probability; this grid shows three orthogonal central slices of the first
  samples, each titled with its label and probability, in one still image.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from volcnn.engines.tb_logger import LazyTensorboardLogger
from volcnn.evaluation.patches import PatchView, patch_view, render_patch_grid

__all__ = ["EpochSummaries", "ValidationSummaries", "loss_from_output"]

logger = logging.getLogger(__name__)


def _as_float(value: Any) -> float | None:
    """A Python float from a number, a one-element tensor or array; ``None`` for anything else (dicts, strings...)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0].item()) if value.numel() == 1 else None
    if isinstance(value, np.ndarray | np.generic):
        arr = np.asarray(value)
        return float(arr.reshape(-1)[0]) if arr.size == 1 and np.issubdtype(arr.dtype, np.number) else None
    return None


def loss_from_output(output: Any) -> float | None:
    """The batch loss from an engine output.

    Accepts MONAI's decollated output (a list of per-sample dicts, each holding the batch loss under ``"loss"``), a
    dict with ``"loss"``, or a bare number / scalar tensor (plain Ignite trainers). ``None`` when there is no loss.
    """
    if isinstance(output, Mapping):
        return _as_float(output.get("loss"))
    if isinstance(output, Sequence) and not isinstance(output, str):
        if len(output) > 0 and isinstance(output[0], Mapping):
            return _as_float(output[0].get("loss"))
        return None
    return _as_float(output)


def _batch_size(engine: Engine) -> int | None:
    """Number of samples in the current iteration.

    From ``engine.state.batch`` (MONAI's decollated list of per-sample dicts, a dict whose ``"image"`` is a
    ``(B, C, D, H, W)`` tensor, or an ``(x, y)`` tuple of tensors), else from the length of a decollated output list.
    """
    batch = getattr(engine.state, "batch", None)
    if isinstance(batch, Mapping):
        image = batch.get("image")
        if isinstance(image, torch.Tensor | np.ndarray) and image.ndim >= 1:
            return int(image.shape[0])
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        if isinstance(batch[0], Mapping):
            return len(batch)
        if isinstance(batch[0], torch.Tensor) and batch[0].ndim >= 1:
            return int(batch[0].shape[0])
    output = getattr(engine.state, "output", None)
    if isinstance(output, Sequence) and len(output) > 0 and isinstance(output[0], Mapping):
        return len(output)
    return None


def _per_sample(output: Any) -> list[Mapping[str, Any]]:
    """Per-sample dicts from a decollated output list or from a dict of ``(B, ...)`` batched tensors."""
    if isinstance(output, Sequence) and not isinstance(output, str):
        return [item for item in output if isinstance(item, Mapping)]
    if isinstance(output, Mapping):
        image = output.get("image")
        if not isinstance(image, torch.Tensor) or image.ndim != 5:
            return []
        n = int(image.shape[0])
        return [
            {
                k: v[i] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v
                for k, v in output.items()
            }
            for i in range(n)
        ]
    return []


def _scalar(tb: LazyTensorboardLogger, tag: str, value: Any, step: int) -> None:
    v = _as_float(value)
    if v is not None:
        tb.writer.add_scalar(tag, v, step)


class EpochSummaries:
    """Per trainer epoch (global step = epoch): ``train/loss_epoch`` (mean batch loss), ``train/epoch_time_s``,
    ``train/samples_per_s``, ``amp/scale`` with an enabled GradScaler and ``gpu/max_memory_allocated_mb`` on CUDA
    (peak reset every epoch); then the writer is flushed, so a killed run keeps every finished epoch's summaries.

    The epoch time is Ignite's (``engine.state.times["EPOCH_COMPLETED"]`` while the epoch's completion handlers
    run): the ``EPOCH_STARTED`` handlers and every iteration, data loading included, but not validation or
    checkpointing, which run later in ``EPOCH_COMPLETED``. Samples per second divide this epoch's sample count by it.
    """

    def __init__(self, tb: LazyTensorboardLogger) -> None:
        self.tb = tb
        self._losses: list[float] = []
        self._samples = 0
        self._samples_known = True

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._losses, self._samples, self._samples_known = [], 0, True

    def _iteration_completed(self, engine: Engine) -> None:
        n = _batch_size(engine)
        if n is None:
            self._samples_known = False
        else:
            self._samples += n
        loss = loss_from_output(engine.state.output)
        if loss is not None:
            self._losses.append(loss)

    def _completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self._losses:
            _scalar(self.tb, "train/loss_epoch", float(np.mean(self._losses)), epoch)
        elapsed = _as_float((getattr(engine.state, "times", None) or {}).get(Events.EPOCH_COMPLETED.name))
        if elapsed is not None:
            _scalar(self.tb, "train/epoch_time_s", elapsed, epoch)
            if self._samples_known and self._samples > 0 and elapsed > 0:
                _scalar(self.tb, "train/samples_per_s", self._samples / elapsed, epoch)
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and callable(getattr(scaler, "get_scale", None)):
            is_enabled = getattr(scaler, "is_enabled", None)
            if not callable(is_enabled) or is_enabled():
                _scalar(self.tb, "amp/scale", scaler.get_scale(), epoch)
        device = getattr(engine.state, "device", None)
        if torch.cuda.is_available() and isinstance(device, torch.device | str) and torch.device(device).type == "cuda":
            dev = torch.device(device)
            _scalar(self.tb, "gpu/max_memory_allocated_mb", torch.cuda.max_memory_allocated(dev) / 2**20, epoch)
            torch.cuda.reset_peak_memory_stats(dev)
        self.tb.flush()


class ValidationSummaries:
    """Per validation run (global step = the trainer's epoch): ``val/time_s`` (Ignite's
    ``validator.state.times["COMPLETED"]``) and, every ``image_interval`` epochs, the image ``val/patches``: the
    three central orthogonal slices of the first ``num_images`` samples, titled with label and probability (the first
    samples of every run, so the same ones each epoch with an unshuffled validation loader); then the writer is
    flushed. A failure to render the grid is logged and never stops training.
    """

    def __init__(
        self, tb: LazyTensorboardLogger, trainer: Engine, num_images: int = 4, image_interval: int = 1
    ) -> None:
        self.tb = tb
        self.trainer = trainer
        self.num_images = max(0, int(num_images))
        self.image_interval = max(1, int(image_interval))
        self._patches: list[PatchView] = []

    def attach(self, validator: Engine) -> None:
        validator.add_event_handler(Events.STARTED, self._started)
        if self.num_images:
            validator.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        validator.add_event_handler(Events.COMPLETED, self._completed)

    def _step(self, validator: Engine) -> int:
        trainer_epoch = getattr(getattr(self.trainer, "state", None), "epoch", 0) or 0
        return int(trainer_epoch) if trainer_epoch > 0 else int(validator.state.epoch)

    def _started(self, engine: Engine) -> None:
        self._patches = []

    def _iteration_completed(self, engine: Engine) -> None:
        if len(self._patches) >= self.num_images:
            return
        for sample in _per_sample(engine.state.output):
            if len(self._patches) >= self.num_images:
                break
            patch = patch_view(sample)
            if patch is not None:
                self._patches.append(patch)

    def _completed(self, engine: Engine) -> None:
        step = self._step(engine)
        elapsed = (getattr(engine.state, "times", None) or {}).get(Events.COMPLETED.name)
        if elapsed is not None:
            _scalar(self.tb, "val/time_s", elapsed, step)
        if self._patches and step % self.image_interval == 0:
            try:
                image = render_patch_grid(self._patches)
            except Exception:  # a figure must never stop training
                logger.exception("rendering the validation patch grid failed")
            else:
                # same event as writer.add_figure(tag, fig, step), which would import pyplot
                self.tb.writer.add_image("val/patches", image, step, dataformats="CHW")
        self._patches = []
        self.tb.flush()
