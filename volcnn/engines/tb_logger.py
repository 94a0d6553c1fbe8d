"""The one TensorBoard ``SummaryWriter`` of a training run, shared by Ignite's logging handlers and ours.

:class:`LazyTensorboardLogger` is Ignite's ``TensorboardLogger`` (so Ignite's ``OutputHandler`` and
``OptimizerParamsHandler`` accept it) with one difference: the writer is opened at the first write, not in
``__init__``. Ignite's constructor opens a ``SummaryWriter`` at once, which creates the log folder and an event file;
a bundle builds its handlers whenever its config is parsed, so a ``resume`` of a finished run, which trains nothing,
would leave an empty event file behind each time. After :meth:`LazyTensorboardLogger.close` a later write opens a new
event file, as a fresh ``SummaryWriter`` would.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from ignite.handlers.tensorboard_logger import TensorboardLogger

__all__ = ["LazyTensorboardLogger"]


class LazyTensorboardLogger(TensorboardLogger):
    """Ignite ``TensorboardLogger`` writing to ``log_dir`` through a ``torch.utils.tensorboard.SummaryWriter`` that is
    created on first use (see the module docstring for why).

    Args:
        log_dir: folder of the event files; nothing is created until the first summary is written.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        # TensorboardLogger.__init__ is not called on purpose: it opens the SummaryWriter (and its event file) at once
        self.log_dir = os.fspath(log_dir)
        self._writer: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created (with the folder and an event file) on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
            # close at interpreter exit if no COMPLETED / EXCEPTION_RAISED handler got to do it
            self._finalizer = weakref.finalize(self, self._writer.close)
        return self._writer

    @property
    def is_open(self) -> bool:
        """Whether a writer is open (something was written since the last :meth:`close`)."""
        return self._writer is not None

    def flush(self) -> None:
        """Write pending events to disk; does not open a writer."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writer, if one is open; a later write opens a new event file."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                if self._finalizer is not None:
                    self._finalizer.detach()
                    self._finalizer = None
