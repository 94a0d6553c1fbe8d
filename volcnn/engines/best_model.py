"""The best weights of a run by the key validation metric: ``model.pt`` (the bundle's model file) and ``best.json``.

Ours rather than Ignite's ``Checkpoint(score_function=..., n_saved=1)`` or MONAI's ``CheckpointSaver(save_key_metric=
True)``, because neither keeps a usable file through a kill: Ignite's ``Checkpoint`` removes the file it replaces
*before* it writes the new one (so a kill in between leaves no best model at all), and its ``DiskSaver(atomic=True)``
renames a ``tmpXXXX`` file without an fsync; MONAI's ``CheckpointSaver`` uses that ``Checkpoint`` with
``atomic=False``, writing in place. Here both files go through
:func:`volcnn.core.atomic.atomic_path` (temporary file, fsync, rename). Ours also keeps the latest weights while the
metric is undefined (one class in the validation set gives no ROC AUC) instead of never writing a model file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from volcnn.core.atomic import atomic_path, atomic_write_json
from volcnn.core.options import as_bool
from volcnn.engines.dist import is_rank0
from volcnn.engines.validation_metric import epoch_metric

__all__ = ["BestModelSaver"]

logger = logging.getLogger(__name__)


class BestModelSaver:
    """Ignite handler: after every epoch, write the weights to ``ckpt_dir/filename`` if the key metric improved.

    Attach it to the trainer after the ``ValidationHandler`` (so it sees this epoch's metric) and before the
    :class:`~volcnn.engines.checkpoint.TrainingCheckpointer`, whose ``save_dict`` should hold it: its state (the
    best value and epoch, and the key metric of every epoch) goes into every full checkpoint and is restored on
    resume. Every rank tracks the best value; only rank 0 writes.

    Args:
        ckpt_dir: folder of ``filename`` and ``best.json``.
        model: the network (the plain module, not a ``DistributedDataParallel`` wrapper): its ``state_dict`` is saved.
        validator: the evaluator run by ``ValidationHandler``; its ``state.metrics[key_metric]`` of the same epoch
            decides. Without it (or without ``key_metric``), every epoch counts as the best.
        key_metric: metric name in ``validator.state.metrics`` (e.g. ``"val_auc"``).
        mode: ``"max"`` or ``"min"``.
        min_delta: an improvement smaller than this does not count.
        filename: the weights file, a plain state dict loadable by MONAI's ``CheckpointLoader``.
        latest_on_tie: a later epoch whose metric *equals* the best replaces it (the metric cannot tell them apart
            and the later one has trained longer). Off by default, measured both ways: candidate-level validation
            AUC saturates (the earlier demo recipe's run reached 1.0 at epoch 3 of 15), and with this on that
            un-mined model (epoch 15) reached CPM 0.811 instead of 0.791 on the 30 CTs of ``python -m
            pipelines.bench_detection``, but its mined model (round epoch 8 of 8) fell from 0.753 to 0.645.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike[str],
        model: torch.nn.Module,
        validator: Engine | None = None,
        key_metric: str | None = None,
        mode: str = "max",
        min_delta: float = 0.0,
        filename: str = "model.pt",
        latest_on_tie: bool | str = False,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.ckpt_dir = Path(ckpt_dir)
        self.model = model
        self.validator = validator
        self.key_metric = key_metric
        self.mode = mode
        self.min_delta = float(min_delta)
        self.filename = filename
        self.latest_on_tie = as_bool(latest_on_tie)
        self.best_value: float | None = None
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def output_files(self) -> list[Path]:
        """The files this handler writes; a fresh run into the folder moves an earlier run's aside
        (:class:`~volcnn.engines.checkpoint.TrainingCheckpointer`)."""
        return [self.ckpt_dir / self.filename, self.ckpt_dir / "best.json"]

    def _improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.latest_on_tie and value == self.best_value:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        value = epoch_metric(self.validator, epoch, self.key_metric)
        record: dict[str, Any] = {"epoch": epoch}
        if value is not None:
            record[self.key_metric or "metric"] = value
        self.history.append(record)
        if self.validator is None or self.key_metric is None or (value is not None and self._improved(value)):
            self.best_value, self.best_epoch = value, epoch
            if is_rank0():
                self._write(epoch, value)
        elif value is None and self.best_value is None:
            # the key metric is undefined so far (e.g. one class in the validation set): keep the latest weights
            logger.warning("%s is undefined at epoch %d; %s holds the latest weights", self.key_metric, epoch,
                           self.filename)  # fmt: skip
            self.best_epoch = epoch
            if is_rank0():
                self._write(epoch, None)

    def _write(self, epoch: int, value: float | None) -> None:
        target = self.ckpt_dir / self.filename
        with atomic_path(target) as tmp:
            torch.save(self.model.state_dict(), tmp)
        info = {"epoch": epoch, "metric": self.key_metric, "value": value, "file": self.filename}
        atomic_write_json(self.ckpt_dir / "best.json", info)
        if value is None:
            logger.info("saved weights of epoch %d to %s", epoch, target)
        else:
            logger.info("new best %s=%.4f at epoch %d -> %s", self.key_metric, value, epoch, target)

    def state_dict(self) -> dict[str, Any]:
        """The best value and epoch so far and the key metric of every epoch (weights-only loadable types)."""
        return {"metric": self.key_metric, "value": self.best_value, "epoch": self.best_epoch,
                "history": [dict(r) for r in self.history]}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        value = state.get("value")
        self.best_value = None if value is None else float(value)
        self.best_epoch = int(state.get("epoch", 0))
        self.history = [dict(r) for r in state.get("history", [])]

    @staticmethod
    def state_from_v1(ckpt: Mapping[str, Any]) -> dict[str, Any]:
        """This handler's state from a format-1 checkpoint, which kept it at the top level (``best``, ``history``)."""
        best = ckpt.get("best") or {}
        return {"metric": best.get("metric"), "value": best.get("value"), "epoch": int(best.get("epoch", 0)),
                "history": list(ckpt.get("history", []))}  # fmt: skip
