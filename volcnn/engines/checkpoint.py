"""Checkpoints that survive a kill, a full disk or a NaN, and resume a run bit for bit.

Layout in ``ckpt_dir``::

    checkpoint_epoch0007.pt   full training state after epoch 7 (the newest ``keep_last`` are kept)
    model.pt                  weights of the best epoch by the key metric (the bundle's model file)

Every file is written to a temporary file beside it, fsynced and renamed over the target
(:func:`volcnn.core.atomic.atomic_path`), so a kill at any moment leaves the previous files intact. A full
checkpoint holds the model, optimizer, scheduler and GradScaler states, the trainer's epoch, the best metric
so far, the early-stopping state and every RNG state (:mod:`volcnn.engines.rng_state`: the global generators, the
data loader's, and the transform states of the dataset's transform and of the trainer's ``prepare_batch``, where
the on-device augmentation keeps its own, :func:`volcnn.engines.prepare.train_random_sources`), all in types that
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from volcnn.core.atomic import atomic_path, atomic_write_json
from volcnn.engines.dist import is_rank0, process_rank, world_size
from volcnn.engines.prepare import train_random_sources
from volcnn.engines.rng_state import capture_rng, restore_rng

__all__ = ["TrainingCheckpointer", "CheckpointError", "load_training_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "volcnn-checkpoint"
VERSION = 1
_NAME = re.compile(r"^checkpoint_epoch(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (unreadable, or written by a different run configuration)."""


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a full checkpoint with ``weights_only=True`` and check that it is one of ours.

    Raises:
        CheckpointError: naming the file, when it cannot be read or is not a volcnn checkpoint.
    """
    try:
        ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, permissions...
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a volcnn training checkpoint")
    return ckpt


class TrainingCheckpointer:
    """Ignite handler: after every epoch, save an exact-resume checkpoint; keep the best weights; stop early.

    Attach it to the trainer *after* the validation and LR-scheduler handlers (last in ``train_handlers``) so
    the checkpoint sees the scheduler already stepped and the epoch's validation metric.

    Args:
        ckpt_dir: folder for the files.
        save_dict: objects with ``state_dict``/``load_state_dict`` by name; must include ``"model"``.
            Put the optimizer and scheduler here; the trainer's GradScaler is added by :meth:`attach`.
        validator: the evaluator run by ``ValidationHandler``; its ``state.metrics[key_metric]`` of the same
            epoch decides the best model and early stopping. Without it, every epoch counts as the best.
        key_metric: metric name in ``validator.state.metrics`` (e.g. ``"val_auc"``).
        mode: ``"max"`` or ``"min"``.
        keep_last: how many newest full checkpoints to keep (at least 2).
        best_filename: file name of the best weights (a plain state dict, loadable by ``CheckpointLoader``).
        early_stop_patience: stop when the key metric has not improved for this many epochs; 0 turns it off.
        min_delta: improvement smaller than this does not count.
    """

    def __init__(
        self,
        ckpt_dir: str | os.PathLike[str],
        save_dict: dict[str, Any],
        validator: Engine | None = None,
        key_metric: str | None = None,
        mode: str = "max",
        keep_last: int = 2,
        best_filename: str = "model.pt",
        early_stop_patience: int = 0,
        min_delta: float = 0.0,
    ) -> None:
        if "model" not in save_dict:
            raise ValueError("save_dict must contain 'model'")
        if int(keep_last) < 2:
            raise ValueError(f"keep_last must be at least 2 (got {keep_last}) so a bad write never leaves none")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.validator = validator
        self.key_metric = key_metric
        self.mode = mode
        self.keep_last = int(keep_last)
        self.best_filename = best_filename
        self.patience = int(early_stop_patience or 0)
        self.min_delta = float(min_delta)
        self.best_value: float | None = None
        self.best_epoch = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.trainer: Engine | None = None
        self._resumed = False
        self._rank_rng: list[dict[str, Any]] | None = None

    # ---------------------------------------------------------------- attaching
    def attach(self, engine: Engine) -> None:
        """Register on ``engine``; its ``scaler`` (a GradScaler, if AMP uses one) joins ``save_dict``."""
        self.trainer = engine
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "scaler" not in self.save_dict:
            self.save_dict["scaler"] = scaler
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _started(self, engine: Engine) -> None:
        if not is_rank0():
            return
        self._clean_temporaries()
        if not self._resumed:
            self._archive_previous_run()

    def _archive_previous_run(self) -> None:
        """A fresh (not resumed) run into a folder holding another run's files moves them to
        ``previous-<UTC time>/`` instead of mixing the two runs or deleting the older one's work."""
        old = [*self.checkpoints(), *(self.ckpt_dir / n for n in (self.best_filename, "best.json"))]
        old = [p for p in old if p.is_file()]
        if not old:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.ckpt_dir / f"previous-{stamp}"
        target.mkdir(exist_ok=True)
        for path in old:
            os.replace(path, target / path.name)
        logger.warning(
            "%s held files of an earlier run; moved %d of them to %s (pass resume=true to continue a run instead)",
            self.ckpt_dir, len(old), target,
        )  # fmt: skip

    def _clean_temporaries(self, engine: Engine | None = None) -> None:
        """Remove temp files a killed write left behind (``.checkpoint_epoch*.pt``, ``.model.*.pt``,
        ``.best.*.json``: :func:`volcnn.core.atomic.atomic_path` names them ``.{stem}.{random}{suffixes}``)."""
        if not self.ckpt_dir.is_dir():
            return
        best = Path(self.best_filename)
        patterns = {".*.pt", ".best.*.json", f".{best.name.split('.')[0]}.*{''.join(best.suffixes)}"}
        for tmp in sorted({p for pattern in patterns for p in self.ckpt_dir.glob(pattern)}):
            logger.info("removing unfinished checkpoint write %s", tmp)
            tmp.unlink(missing_ok=True)

    # ---------------------------------------------------------------- saving
    def _validation_value(self, engine: Engine) -> float | None:
        if self.validator is None or self.key_metric is None:
            return None
        if getattr(self.validator.state, "epoch", None) != engine.state.epoch:
            return None  # no validation this epoch (val_interval > 1)
        value = self.validator.state.metrics.get(self.key_metric)
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None

    def _improved(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def epoch_completed(self, engine: Engine) -> None:
        """Update the best model and early stopping from this epoch's validation, then save a full checkpoint."""
        epoch = int(engine.state.epoch)
        value = self._validation_value(engine)
        no_validation = self.validator is None or self.key_metric is None
        record: dict[str, Any] = {"epoch": epoch}
        if value is not None:
            record[self.key_metric or "metric"] = value
        self.history.append(record)
        if no_validation or (value is not None and self._improved(value)):
            self.best_value, self.best_epoch = value, epoch
            if is_rank0():
                self._write_best(epoch, value)
        elif value is None and self.best_value is None:
            # the key metric is undefined so far (e.g. one class in the validation set): keep the latest weights
            logger.warning(
                "%s is undefined at epoch %d; %s holds the latest weights", self.key_metric, epoch, self.best_filename
            )
            self.best_epoch = epoch
            if is_rank0():
                self._write_best(epoch, None)
        if self.patience and value is not None and epoch - self.best_epoch >= self.patience:
            self.stopped_early = True
            logger.info(
                "early stopping at epoch %d: %s has not improved for %d epochs (best %.4f at epoch %d)",
                epoch, self.key_metric, epoch - self.best_epoch, self.best_value or float("nan"), self.best_epoch,
            )  # fmt: skip
        self._rank_rng = self._gather_rng(engine)  # a collective: every rank takes part
        if is_rank0():  # every rank tracks the best metric and early stopping; only rank 0 writes
            path = self.save(engine)
            logger.info("epoch %d checkpoint: %s", epoch, path)
        if self.stopped_early:
            engine.terminate()

    def _write_best(self, epoch: int, value: float | None) -> None:
        target = self.ckpt_dir / self.best_filename
        with atomic_path(target) as tmp:
            torch.save(self.save_dict["model"].state_dict(), tmp)
        info = {"epoch": epoch, "metric": self.key_metric, "value": value, "file": self.best_filename}
        atomic_write_json(self.ckpt_dir / "best.json", info)
        if value is None:
            logger.info("saved weights of epoch %d to %s", epoch, target)
        else:
            logger.info("new best %s=%.4f at epoch %d -> %s", self.key_metric, value, epoch, target)

    def state_dict(self) -> dict[str, Any]:
        """The full checkpoint content for the trainer's current state."""
        engine = self._require_trainer()
        loader = getattr(engine, "data_loader", None)
        return {
            "format": FORMAT,
            "version": VERSION,
            "trainer": {
                "epoch": int(engine.state.epoch),
                "iteration": int(engine.state.iteration),
                "epoch_length": int(engine.state.epoch_length or 0),
                "max_epochs": int(engine.state.max_epochs or 0),
            },
            "state": {name: obj.state_dict() for name, obj in self.save_dict.items()},
            "rng": capture_rng(train_random_sources(engine), _loader_generators(loader)),
            "rng_ranks": self._rank_rng if world_size() > 1 else None,
            "best": {"metric": self.key_metric, "value": self.best_value, "epoch": self.best_epoch},
            "early_stopping": {"patience": self.patience, "stopped": self.stopped_early},
            "history": list(self.history),
        }

    def _gather_rng(self, engine: Engine) -> list[dict[str, Any]] | None:
        """Under DDP, every rank's RNG snapshot (index = rank), so that a resumed rank continues its own
        augmentation and shuffling streams rather than rank 0's; ``None`` in a single process."""
        if world_size() < 2:
            return None
        mine = capture_rng(train_random_sources(engine), _loader_generators(getattr(engine, "data_loader", None)))
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, mine)
        return gathered

    def save(self, engine: Engine | None = None) -> Path:
        """Write ``checkpoint_epoch{N}.pt`` atomically, then drop all but the newest ``keep_last``."""
        if engine is not None:
            self.trainer = engine
        payload = self.state_dict()
        target = self.ckpt_dir / f"checkpoint_epoch{payload['trainer']['epoch']:04d}.pt"
        with atomic_path(target) as tmp:
            torch.save(payload, tmp)
        for old in self.checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return target

    def checkpoints(self) -> list[Path]:
        """Full checkpoints in ``ckpt_dir``, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    # ---------------------------------------------------------------- resuming
    def resume(self, engine: Engine | None = None) -> bool:
        """Restore the newest loadable checkpoint into the attached objects and the trainer.

        ``max_epochs`` keeps the value the trainer was built with (the configured total), so a finished run
        can be extended by raising it. Returns ``True`` when training is already complete (the checkpoint's
        epoch reached ``max_epochs``, or the run had stopped early) and nothing is left to run.

        Raises:
            CheckpointError: when the newest checkpoints cannot be used (every candidate is named).
        """
        engine = engine or self._require_trainer()
        self.trainer = engine
        self._resumed = True
        candidates = self.checkpoints()
        if not candidates:
            logger.info("resume: no checkpoint in %s; starting from epoch 1", self.ckpt_dir)
            return False
        errors = []
        for path in reversed(candidates):
            try:
                ckpt = load_training_checkpoint(path)
            except CheckpointError as e:
                logger.warning("resume: skipping %s", e)
                errors.append(str(e))
                continue
            return self._restore(engine, ckpt, path)
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(errors))

    def _restore(self, engine: Engine, ckpt: dict[str, Any], path: Path) -> bool:
        saved = ckpt["trainer"]
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        if len(ranks) != world_size():
            raise CheckpointError(
                f"{path}: written by a run of {len(ranks)} process(es), but this run has {world_size()}; each "
                "process resumes its own random streams, so resume with the same number of processes, or start "
                "a fresh run (resume false, or another output_dir)"
            )
        loader = getattr(engine, "data_loader", None)
        epoch_length = engine.state.epoch_length or (len(loader) if loader is not None else None)
        if epoch_length is not None and saved["epoch_length"] != epoch_length:
            raise CheckpointError(
                f"{path}: written with {saved['epoch_length']} iterations per epoch, but the data loader now gives "
                f"{epoch_length}; the datalist or batch_size changed. Restore them, or start a fresh run "
                "(resume false, or another output_dir)"
            )
        missing = sorted(set(self.save_dict) - set(ckpt["state"]))
        if missing:
            raise CheckpointError(f"{path}: has no state for {missing}")
        try:  # before loading any state, so a refused checkpoint leaves the trainer untouched
            restore_rng(ranks[process_rank()], train_random_sources(engine), _loader_generators(loader))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        for name, obj in self.save_dict.items():
            obj.load_state_dict(ckpt["state"][name])
        best = ckpt.get("best", {})
        self.best_value, self.best_epoch = best.get("value"), int(best.get("epoch", 0))
        self.stopped_early = bool(ckpt.get("early_stopping", {}).get("stopped", False))
        self.history = list(ckpt.get("history", []))
        max_epochs = int(engine.state.max_epochs or saved["max_epochs"])
        done = self.stopped_early or saved["epoch"] >= max_epochs
        if not done:
            engine.load_state_dict(
                {"epoch": saved["epoch"], "epoch_length": saved["epoch_length"], "max_epochs": max_epochs}
            )
        logger.info(
            "resumed from %s (epoch %d of %d)%s", path, saved["epoch"], max_epochs,
            "; training was already complete" if done else "",
        )  # fmt: skip
        return done

    def _require_trainer(self) -> Engine:
        if self.trainer is None:
            raise RuntimeError("TrainingCheckpointer is not attached to a trainer")
        return self.trainer


def _loader_generators(loader: Any) -> dict[str, torch.Generator]:
    gens: dict[str, torch.Generator] = {}
    for name, owner in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            gens[name] = g
    return gens
