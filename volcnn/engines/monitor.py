"""TensorBoard summaries of a training run: Ignite's TensorBoard handlers plus the few summaries they lack, on one
writer (the progress bar is in :mod:`volcnn.engines.progress`).

:class:`TrainingMonitor` follows the MONAI handler convention (``handler.attach(trainer)``), so it can be listed in a
bundle's ``train_handlers``. On rank 0 only it attaches these, all writing through one
:class:`~volcnn.engines.tb_logger.LazyTensorboardLogger`:

* Ignite's ``OutputHandler``: ``train/loss`` every ``log_every_n_iters`` iterations (global step = trainer
  iteration); every numeric ``trainer.state.metrics`` entry as ``train/<name>`` per epoch, and every
  ``validator.state.metrics`` entry as ``val/<name>`` per validation run (global step = trainer epoch);
* Ignite's ``OptimizerParamsHandler`` at ``EPOCH_STARTED``: the learning rate used in that epoch as
  ``train/lr/group_<i>``, one per parameter group (global step = trainer epoch);
* :class:`~volcnn.engines.summaries.EpochSummaries` (ours): ``train/loss_epoch``, ``train/epoch_time_s``,
  ``train/samples_per_s``, ``amp/scale`` with an enabled GradScaler, ``gpu/max_memory_allocated_mb`` on CUDA;
* :class:`~volcnn.engines.summaries.ValidationSummaries` (ours): ``val/time_s`` and the image ``val/patches``.

Ignite's ``OutputHandler`` is used rather than MONAI's ``TensorBoardStatsHandler``, which writes each metric under
its bare name (``val_auc``, not the ``val/val_auc`` this project documents) and flushes the event file at every
logged iteration. Ignite's ``OptimizerParamsHandler`` names the rate ``<tag>/lr/group_<i>`` even for a single
parameter group, so the bundle's rate is ``train/lr/group_0`` (``train/lr`` before the monitor was built on Ignite's
handlers). Why the other summaries are ours is said in :mod:`volcnn.engines.summaries`. Closing the writer when the
run completes, is terminated or fails is ours as well: Ignite's ``TensorboardLogger`` is closed only by a ``close()``
call, MONAI's handlers close no writer they were given.
"""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events
from ignite.handlers import global_step_from_engine

from volcnn.engines.dist import is_rank0
from volcnn.engines.summaries import EpochSummaries, ValidationSummaries, loss_from_output
from volcnn.engines.tb_logger import LazyTensorboardLogger

__all__ = ["TrainingMonitor", "loss_from_output"]

logger = logging.getLogger(__name__)


def _loss_dict(output: object) -> dict[str, float]:
    """``OutputHandler`` transform: ``{"loss": batch loss}``, or nothing to write when the output has no loss."""
    loss = loss_from_output(output)
    return {} if loss is None else {"loss": loss}


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
    closed at interpreter exit, so list the monitor before such handlers for a close on exception. ``COMPLETED`` and
    ``TERMINATE`` (``terminate(skip_completed=True)`` skips ``COMPLETED``) close the writer too.
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
        self.tb = LazyTensorboardLogger(self.log_dir)
        self._lr_attached = False

    def close(self) -> None:
        """Flush and close the writer; a later summary opens a new event file."""
        self.tb.close()

    def _is_rank0(self) -> bool:
        return self.rank == 0 if self.rank is not None else is_rank0()

    def attach(self, trainer: Engine) -> None:
        """Register the handlers on ``trainer`` (and on ``validator``); does nothing on a rank other than 0, nor when
        already attached."""
        if not self._is_rank0() or trainer.has_event_handler(self._on_exception, Events.EXCEPTION_RAISED):
            return
        tb = self.tb
        if self.log_every_n_iters:
            tb.attach_output_handler(
                trainer,
                Events.ITERATION_COMPLETED(every=self.log_every_n_iters),
                tag="train",
                output_transform=_loss_dict,
            )
        tb.attach_output_handler(trainer, Events.EPOCH_COMPLETED, tag="train", metric_names="all")
        trainer.add_event_handler(Events.STARTED, self._attach_lr)
        if self.validator is not None:
            tb.attach_output_handler(
                self.validator,
                Events.EPOCH_COMPLETED,
                tag="val",
                metric_names="all",
                global_step_transform=global_step_from_engine(trainer),
            )
            ValidationSummaries(tb, trainer, self.num_images, self.image_interval).attach(self.validator)
        EpochSummaries(tb).attach(trainer)  # after the OutputHandler: its epoch-end flush covers the metrics too
        trainer.add_event_handler(Events.COMPLETED, self._on_end)
        trainer.add_event_handler(Events.TERMINATE, self._on_end)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _attach_lr(self, trainer: Engine) -> None:
        """Attach Ignite's ``OptimizerParamsHandler`` once the trainer runs: MONAI's trainers attach their
        ``train_handlers`` in ``Workflow.__init__``, before ``SupervisedTrainer`` sets ``self.optimizer``."""
        optimizer = getattr(trainer, "optimizer", None)
        if self._lr_attached or not getattr(optimizer, "param_groups", None):
            return
        self.tb.attach_opt_params_handler(trainer, Events.EPOCH_STARTED, optimizer, param_name="lr", tag="train")
        self._lr_attached = True

    def _on_end(self, engine: Engine) -> None:
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
