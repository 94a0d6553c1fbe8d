"""TensorBoard summaries of a training run as an Ignite handler (the progress bar is in :mod:`volcnn.engines.progress`).

:class:`TrainingMonitor` follows the MONAI handler convention (``handler.attach(trainer)``), so it can be listed in a
bundle's ``train_handlers``. It writes, on rank 0 only:

* ``train/loss`` every ``log_every_n_iters`` iterations (global step = trainer iteration);
* per epoch (global step = trainer epoch): ``train/loss_epoch``, ``train/lr`` (``train/lr/group{i}`` with several
  parameter groups), ``train/samples_per_s``, ``train/epoch_time_s``, every numeric ``trainer.state.metrics`` entry
  as ``train/<name>``, ``amp/scale`` with an enabled grad scaler and ``gpu/max_memory_allocated_mb`` on CUDA;
* per validation run (global step = trainer epoch): every numeric ``validator.state.metrics`` entry as
  ``val/<name>``, ``val/time_s`` and, every ``image_interval`` epochs, one image ``val/patches``: a grid with the
  three central orthogonal slices of the first ``num_images`` validation samples, titled with label and probability.
"""

from __future__ import annotations

import logging
import numbers
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from volcnn.engines.dist import is_rank0
from volcnn.evaluation.patches import PatchView, patch_view, render_patch_grid

__all__ = ["TrainingMonitor", "loss_from_output"]

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


class TrainingMonitor:
    """Write TensorBoard summaries of a MONAI / Ignite training run (see the module docstring for the tags).

    Args:
        log_dir: folder of the TensorBoard event files. Nothing is created until the first summary is written.
        validator: the evaluator run by MONAI's ``ValidationHandler``; its metrics and an image grid of the first
            ``num_images`` validation samples are logged with the trainer's epoch as global step.
        num_images: samples in the ``val/patches`` grid; 0 disables it. The first samples of each validation run are
            used, which are the same every epoch with an unshuffled validation loader.
        image_interval: write ``val/patches`` when ``epoch % image_interval == 0``.
        log_every_n_iters: period of ``train/loss`` at iteration level; 0 disables it.
        rank: this process's rank; by default from ``torch.distributed``. Only rank 0 attaches anything.

    Exceptions: on the trainer's ``EXCEPTION_RAISED`` the writer is closed (flushed). Ignite re-raises an exception only
    when no handler is registered for that event, so this handler re-raises it when it is the only one; when other
    handlers are registered (e.g. MONAI's ``StatsHandler`` / ``CheckpointSaver``, which re-raise themselves) it returns
    so that they run, leaving the decision to them as if this monitor were not attached. A handler registered before
    this one that re-raises stops Ignite from calling this one; the writer is then still flushed after every epoch and
    closed at interpreter exit, so list the monitor before such handlers for a close on exception.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        validator: Engine | None = None,
        num_images: int = 4,
        image_interval: int = 1,
        log_every_n_iters: int = 10,
        rank: int | None = None,
    ) -> None:
        self.log_dir = os.fspath(log_dir)
        self.validator = validator
        self.num_images = max(0, int(num_images))
        self.image_interval = max(1, int(image_interval))
        self.log_every_n_iters = max(0, int(log_every_n_iters))
        self.rank = rank
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, created lazily
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._trainer: Engine | None = None
        # per-epoch accumulators (trainer)
        self._epoch_start: float | None = None
        self._last_iter_end: float | None = None
        self._epoch_losses: list[float] = []
        self._epoch_samples = 0
        self._samples_known = True
        self._epoch_lrs: list[float] = []
        # per-run accumulators (validator)
        self._val_start: float | None = None
        self._patches: list[PatchView] = []

    # ------------------------------------------------------------------ writer
    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created (with its folder) on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
            # close at interpreter exit if no COMPLETED / EXCEPTION_RAISED handler got to do it
            self._finalizer = weakref.finalize(self, self._writer.close)
        return self._writer

    def close(self) -> None:
        """Flush and close the writer; a later summary opens a new event file."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if self._finalizer is not None:
                    self._finalizer.detach()
                    self._finalizer = None

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        v = _as_float(value)
        if v is not None:
            self.writer.add_scalar(tag, v, step)

    # ------------------------------------------------------------------ attach
    def _is_rank0(self) -> bool:
        return self.rank == 0 if self.rank is not None else is_rank0()

    def attach(self, trainer: Engine) -> None:
        """Register the handlers on ``trainer`` (and on ``validator``); does nothing on a rank other than 0."""
        if not self._is_rank0():
            return
        if trainer.has_event_handler(self._on_iteration_completed, Events.ITERATION_COMPLETED):
            return  # already attached
        self._trainer = trainer
        trainer.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self._on_completed)
        trainer.add_event_handler(
            Events.TERMINATE, self._on_completed
        )  # terminate(skip_completed=True) skips COMPLETED
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._on_val_started)
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self._on_val_iteration_completed)
            self.validator.add_event_handler(Events.COMPLETED, self._on_val_completed)

    # ------------------------------------------------------------------ trainer handlers
    def _on_epoch_started(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()
        self._last_iter_end = None
        self._epoch_losses = []
        self._epoch_samples = 0
        self._samples_known = True
        # the learning rates in effect during this epoch (an epoch-level LR scheduler steps on EPOCH_COMPLETED,
        # possibly before this monitor's EPOCH_COMPLETED handler runs)
        optimizer = getattr(engine, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None) or []
        self._epoch_lrs = [
            v for v in (_as_float(g.get("lr")) for g in groups if isinstance(g, Mapping)) if v is not None
        ]

    def _on_iteration_completed(self, engine: Engine) -> None:
        self._last_iter_end = time.perf_counter()
        n = _batch_size(engine)
        if n is None:
            self._samples_known = False
        else:
            self._epoch_samples += n
        loss = loss_from_output(engine.state.output)
        if loss is None:
            return
        self._epoch_losses.append(loss)
        if self.log_every_n_iters and engine.state.iteration % self.log_every_n_iters == 0:
            self.writer.add_scalar("train/loss", loss, engine.state.iteration)

    def _on_epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self._epoch_losses:
            self._scalar("train/loss_epoch", float(np.mean(self._epoch_losses)), epoch)
        if len(self._epoch_lrs) == 1:
            self._scalar("train/lr", self._epoch_lrs[0], epoch)
        else:
            for i, lr in enumerate(self._epoch_lrs):
                self._scalar(f"train/lr/group{i}", lr, epoch)
        if self._epoch_start is not None and self._last_iter_end is not None:
            elapsed = self._last_iter_end - self._epoch_start
            self._scalar("train/epoch_time_s", elapsed, epoch)
            if self._samples_known and self._epoch_samples > 0 and elapsed > 0:
                self._scalar("train/samples_per_s", self._epoch_samples / elapsed, epoch)
        for name, value in (getattr(engine.state, "metrics", None) or {}).items():
            self._scalar(f"train/{name}", value, epoch)
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and callable(getattr(scaler, "get_scale", None)):
            is_enabled = getattr(scaler, "is_enabled", None)
            if not callable(is_enabled) or is_enabled():
                self._scalar("amp/scale", scaler.get_scale(), epoch)
        device = getattr(engine.state, "device", None)
        if torch.cuda.is_available() and isinstance(device, torch.device | str) and torch.device(device).type == "cuda":
            dev = torch.device(device)
            self._scalar("gpu/max_memory_allocated_mb", torch.cuda.max_memory_allocated(dev) / 2**20, epoch)
            torch.cuda.reset_peak_memory_stats(dev)
        self.flush()

    def _on_completed(self, engine: Engine) -> None:
        self.close()

    def _on_exception(self, engine: Engine, e: BaseException) -> None:
        try:
            self.close()
        except Exception:  # never mask the training exception
            logger.exception("closing the TensorBoard writer failed")
        if not self._other_exception_handlers(engine):
            raise e

    def _other_exception_handlers(self, engine: Engine) -> bool:
        """Whether handlers other than this monitor's are registered for ``EXCEPTION_RAISED`` on ``engine``."""
        handlers = getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED)
        if handlers is None:
            return False
        try:
            return any(h != self._on_exception for h, *_ in handlers)
        except (TypeError, ValueError):  # layout of Ignite's private registry changed: behave as Ignite's default
            return False

    # ------------------------------------------------------------------ validator handlers
    def _val_step(self, validator: Engine) -> int:
        trainer_epoch = getattr(getattr(self._trainer, "state", None), "epoch", 0) or 0
        return int(trainer_epoch) if trainer_epoch > 0 else int(validator.state.epoch)

    def _on_val_started(self, engine: Engine) -> None:
        self._val_start = time.perf_counter()
        self._patches = []

    def _on_val_iteration_completed(self, engine: Engine) -> None:
        if len(self._patches) >= self.num_images:
            return
        for sample in _per_sample(engine.state.output):
            if len(self._patches) >= self.num_images:
                break
            patch = patch_view(sample)
            if patch is not None:
                self._patches.append(patch)

    def _on_val_completed(self, engine: Engine) -> None:
        step = self._val_step(engine)
        for name, value in (getattr(engine.state, "metrics", None) or {}).items():
            self._scalar(f"val/{name}", value, step)
        if self._val_start is not None:
            self._scalar("val/time_s", time.perf_counter() - self._val_start, step)
        if self._patches and step % self.image_interval == 0:
            try:
                image = render_patch_grid(self._patches)
            except Exception:  # a figure must never stop training
                logger.exception("rendering the validation patch grid failed")
            else:
                # same event as writer.add_figure(tag, fig, step), which would import pyplot
                self.writer.add_image("val/patches", image, step, dataformats="CHW")
        self._patches = []
        self.flush()
