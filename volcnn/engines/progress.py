"""Terminal progress bar for training (Ignite's tqdm ``ProgressBar``), switchable from the bundle's ``progress`` key."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine

from volcnn.core.options import as_bool
from volcnn.engines.dist import is_rank0
from volcnn.engines.summaries import loss_from_output

__all__ = ["progress_bar"]


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
        loss = loss_from_output(output)
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
