"""TensorBoard summaries of a training run and a console progress bar, as Ignite handlers.

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
import math
import numbers
import os
import sys
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from volcnn.engines.dist import is_rank0
from volcnn.engines.options import as_bool

__all__ = ["TrainingMonitor", "progress_bar"]

logger = logging.getLogger(__name__)

_SLICE_NAMES = ("axial (D/2)", "coronal (H/2)", "sagittal (W/2)")


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


def _loss_from_output(output: Any) -> float | None:
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


@dataclass
class _Patch:
    """One validation sample kept for the image summary: three 2-D slices, the label and the predicted probability."""

    slices: tuple[np.ndarray, np.ndarray, np.ndarray]  # (H, W), (D, W), (D, H)
    label: int | None
    prob: float | None
    pred_class: int | None  # set only with more than two classes

    def title(self) -> str:
        text = f"label={self.label if self.label is not None else '?'}"
        if self.prob is not None:
            text += f"  p={self.prob:.2f}"
            if self.pred_class is not None:
                text += f" (class {self.pred_class})"
        return text


def _to_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(torch.Tensor)  # drop MetaTensor metadata
    if isinstance(value, np.ndarray | np.generic | numbers.Number):
        return torch.as_tensor(np.asarray(value))
    return None


def _make_patch(sample: Mapping[str, Any]) -> _Patch | None:
    """Central slices of channel 0 of ``sample["image"]`` (``(C, D, H, W)`` or ``(D, H, W)``), label and probability.

    ``sample["pred"]`` is taken as class probabilities ``(K,)`` (the bundles apply softmax in postprocessing): the
    probability shown is that of class 1 for ``K == 2``, of the only output for ``K == 1`` and of the predicted class
    for ``K > 2``. ``sample["label"]`` may be one-hot ``(K,)`` or a scalar / one-element tensor.
    """
    image = _to_tensor(sample.get("image"))
    if image is None or image.ndim not in (3, 4):
        return None
    vol = image[0] if image.ndim == 4 else image
    d, h, w = (int(s) for s in vol.shape)
    slices = tuple(s.float().cpu().numpy() for s in (vol[d // 2], vol[:, h // 2], vol[:, :, w // 2]))

    label: int | None = None
    lab = _to_tensor(sample.get("label"))
    if lab is not None and lab.numel() > 0:
        label = int(lab.reshape(-1).argmax()) if lab.numel() > 1 else int(round(float(lab.reshape(-1)[0])))

    prob: float | None = None
    pred_class: int | None = None
    pred = _to_tensor(sample.get("pred"))
    if pred is not None and pred.numel() > 0:
        p = pred.float().reshape(-1).cpu()
        if p.numel() == 1:
            prob = float(p[0])
        elif p.numel() == 2:
            prob = float(p[1])
        else:
            pred_class = int(p.argmax())
            prob = float(p[pred_class])
    return _Patch(slices=slices, label=label, prob=prob, pred_class=pred_class)  # type: ignore[arg-type]


def _render_patch_grid(patches: Sequence[_Patch], dpi: int = 80) -> np.ndarray:
    """Draw the patches as a grid (one row per sample, three slice columns) and return it as a ``(3, H, W)`` uint8.

    Uses ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, no change of the global backend. Slices are
    shown with a grey colormap over ``[0, 1]`` (the inputs are windowed to that range).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(patches)
    fig = Figure(figsize=(6.0, 2.2 * n), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    subfigs = fig.subfigures(n, 1, squeeze=False)
    for row, patch in enumerate(patches):
        sub = subfigs[row, 0]
        sub.suptitle(patch.title(), fontsize=10)
        axes = sub.subplots(1, 3, squeeze=False)[0]
        for col, (ax, img) in enumerate(zip(axes, patch.slices, strict=True)):
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_SLICE_NAMES[col], fontsize=8)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))


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
        self._patches: list[_Patch] = []

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
        loss = _loss_from_output(engine.state.output)
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
            patch = _make_patch(sample)
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
                image = _render_patch_grid(self._patches)
            except Exception:  # a figure must never stop training
                logger.exception("rendering the validation patch grid failed")
            else:
                # same event as writer.add_figure(tag, fig, step), which would import pyplot
                self.writer.add_image("val/patches", image, step, dataformats="CHW")
        self._patches = []
        self.flush()


def _parse_enabled(enabled: bool | str) -> bool:
    if isinstance(enabled, str) and enabled.strip().lower() == "auto":
        stream = sys.stderr
        return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    return as_bool(enabled)


def _running_loss(alpha: float = 0.98) -> Callable[[Any], dict[str, float]]:
    """Output transform for the progress bar: exponential moving average of the batch loss (as Ignite's
    ``RunningAverage``), kept in the closure so that no metric is added to ``engine.state.metrics``."""
    state: dict[str, float] = {}

    def transform(output: Any) -> dict[str, float]:
        loss = _loss_from_output(output)
        if loss is None or not math.isfinite(loss):
            return {"loss": state["loss"]} if "loss" in state else {}
        state["loss"] = loss if "loss" not in state else alpha * state["loss"] + (1 - alpha) * loss
        return {"loss": state["loss"]}

    return transform


def progress_bar(trainer: Engine, enabled: bool | str = "auto") -> None:
    """Attach Ignite's ``ProgressBar`` (``persist=False``) with the running loss to ``trainer``.

    Args:
        trainer: the training engine.
        enabled: ``True``/``False``, or the strings ``"true"``/``"false"`` (bundle command-line overrides) or
            ``"auto"``: on when ``sys.stderr`` is a terminal. Never attached on a rank other than 0.
    """
    if not _parse_enabled(enabled) or not is_rank0():
        return
    from ignite.handlers.tqdm_logger import ProgressBar

    ProgressBar(persist=False).attach(trainer, output_transform=_running_loss())
