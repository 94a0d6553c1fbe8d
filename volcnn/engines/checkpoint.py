"""Full checkpoints that survive a kill, a full disk or a NaN, and resume a run bit for bit.

Layout in ``ckpt_dir``::

    checkpoint_epoch0007.pt   full training state after epoch 7 (the newest ``keep_last`` are kept)
    model.pt, best.json       the best weights (:class:`~volcnn.engines.best_model.BestModelSaver`)
    previous-<UTC time>/      an earlier run's files, moved aside by a fresh (not resumed) run into the folder

Every file is written to a temporary file beside it, fsynced and renamed over the target
(:func:`volcnn.core.atomic.atomic_path`), so a kill at any moment leaves the previous files intact; temporary files a
kill left behind are removed when the next run starts. A full checkpoint (format version 2) holds the trainer's
epoch and iteration, the ``state_dict()`` of every ``save_dict`` entry (model, optimizer, scheduler, GradScaler, and
the handlers whose state must survive a resume: the best-model saver's best value and epoch, Ignite's
``EarlyStopping`` state) and every RNG state (:mod:`volcnn.engines.rng_state`: the global generators, the data
loader's, and the transform states of the dataset's transform and of the trainer's ``prepare_batch``, where the
on-device augmentation keeps its own, :func:`volcnn.engines.prepare.train_random_sources`; under DDP one snapshot
per rank), all in types that ``torch.load(weights_only=True)`` accepts.

Format 1 (written before the best model and early stopping became handlers of their own) kept the best value, the
early-stopping flag and the metric history at the top level; it still resumes: a ``save_dict`` entry with no state
in a format-1 file gets the one its ``state_from_v1(checkpoint)`` builds from those entries.

Ours rather than Ignite's ``Checkpoint`` or MONAI's ``CheckpointSaver``: Ignite's removes the file it rotates out
before it writes the new one and does not fsync, MONAI's writes in place, and neither saves RNG states, let alone
in a weights-only loadable form.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from volcnn.core.atomic import atomic_path
from volcnn.engines.dist import is_rank0, process_rank, world_size
from volcnn.engines.prepare import train_random_sources
from volcnn.engines.rng_state import capture_rng, restore_rng

__all__ = ["TrainingCheckpointer", "CheckpointError", "load_training_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT = "volcnn-checkpoint"
VERSION = 2
_NAME = re.compile(r"^checkpoint_epoch(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (unreadable, or written by a different run configuration)."""


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a full checkpoint with ``weights_only=True`` and check that it is one of ours, in a format this code reads.

    Raises:
        CheckpointError: naming the file, when it cannot be read, is not a volcnn checkpoint, or was written in a
            newer format.
    """
    try:
        ckpt = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, permissions...
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a volcnn training checkpoint")
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r} is newer than this volcnn reads ({VERSION})")
    return ckpt


class TrainingCheckpointer:
    """Ignite handler: after every epoch, save an exact-resume checkpoint and keep the newest ``keep_last``; resume.

    Attach it to the trainer last in ``train_handlers``, after the validation, LR-scheduler, best-model and
    early-stopping handlers, so that the checkpoint sees the scheduler already stepped and the epoch's best-model
    and early-stopping decisions. At the trainer's ``STARTED`` (rank 0) it removes temporary files a killed write left
    behind and, in a run that was not resumed, moves an earlier run's files to ``previous-<UTC time>/``.

    Args:
        ckpt_dir: folder for the files.
        save_dict: objects with ``state_dict``/``load_state_dict`` by name; must include ``"model"``. Put the
            optimizer, the scheduler and the stateful handlers here; the trainer's GradScaler is added by
            :meth:`attach`. An entry may also have ``output_files()`` (files it writes, archived and cleaned with the
            checkpoints), a ``stopped`` attribute (true after a restore: the run had ended, e.g. by early stopping,
            and :meth:`resume` reports it finished) and ``state_from_v1(checkpoint)`` (see the module docstring).
        keep_last: how many newest full checkpoints to keep (at least 2).
    """

    def __init__(self, ckpt_dir: str | os.PathLike[str], save_dict: dict[str, Any], keep_last: int = 2) -> None:
        if "model" not in save_dict:
            raise ValueError("save_dict must contain 'model'")
        if int(keep_last) < 2:
            raise ValueError(f"keep_last must be at least 2 (got {keep_last}) so a bad write never leaves none")
        self.ckpt_dir = Path(ckpt_dir)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.keep_last = int(keep_last)
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

    def _handler_files(self) -> list[Path]:
        """The files the ``save_dict`` entries write themselves (``output_files()``), e.g. ``model.pt``."""
        files: list[Path] = []
        for obj in self.save_dict.values():
            output_files = getattr(obj, "output_files", None)
            if callable(output_files):
                files += [Path(p) for p in output_files()]
        return files

    def _archive_previous_run(self) -> None:
        """A fresh (not resumed) run into a folder holding another run's files moves them to
        ``previous-<UTC time>/`` instead of mixing the two runs or deleting the older one's work."""
        old = [p for p in (*self.checkpoints(), *self._handler_files()) if p.is_file()]
        if not old:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target = self.ckpt_dir / f"previous-{stamp}"
        target.mkdir(parents=True, exist_ok=True)
        for path in old:
            os.replace(path, target / path.name)
        logger.warning(
            "%s held files of an earlier run; moved %d of them to %s (pass resume=true to continue a run instead)",
            self.ckpt_dir, len(old), target,
        )  # fmt: skip

    def _clean_temporaries(self) -> None:
        """Remove temp files a killed write left behind: :func:`volcnn.core.atomic.atomic_path` names them
        ``.{stem}.{random}{suffixes}`` beside the target (``.checkpoint_epoch0003.x1y2.pt``, ``.model.x1y2.pt``,
        ``.best.x1y2.json``); other hidden files are left alone."""
        patterns = {(self.ckpt_dir, ".checkpoint_epoch*.pt")}
        for f in self._handler_files():
            patterns.add((f.parent, f".{f.name.split('.')[0]}.*{''.join(f.suffixes)}"))
        found = {p for folder, pattern in patterns if folder.is_dir() for p in folder.glob(pattern)}
        for tmp in sorted(found):
            logger.info("removing unfinished checkpoint write %s", tmp)
            tmp.unlink(missing_ok=True)

    # ---------------------------------------------------------------- saving
    def epoch_completed(self, engine: Engine) -> None:
        """Save a full checkpoint of this epoch (rank 0), after gathering every rank's RNG states (all ranks)."""
        self._rank_rng = self._gather_rng(engine)  # a collective: every rank takes part
        if is_rank0():
            path = self.save(engine)
            logger.info("epoch %d checkpoint: %s", engine.state.epoch, path)

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
        """Restore the newest loadable checkpoint into the ``save_dict`` objects and the trainer.

        ``max_epochs`` keeps the value the trainer was built with (the configured total), so a finished run
        can be extended by raising it. Returns ``True`` when training is already complete (the checkpoint's
        epoch reached ``max_epochs``, or a restored handler says the run had stopped, e.g. early) and nothing is
        left to run; the trainer's state is then left untouched.

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
            return self._restore(engine, self._upgrade(ckpt), path)
        raise CheckpointError("no usable checkpoint to resume from: " + "; ".join(errors))

    def _upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """A format-1 checkpoint in the current layout: states for the ``save_dict`` entries that had none."""
        if ckpt.get("version", 1) >= VERSION:
            return ckpt
        state = dict(ckpt["state"])
        for name, obj in self.save_dict.items():
            convert = getattr(obj, "state_from_v1", None)
            if name not in state and callable(convert):
                state[name] = convert(ckpt)
        return {**ckpt, "version": VERSION, "state": state}

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
        stopped = [name for name, obj in self.save_dict.items() if getattr(obj, "stopped", False) is True]
        max_epochs = int(engine.state.max_epochs or saved["max_epochs"])
        done = bool(stopped) or saved["epoch"] >= max_epochs
        if not done:
            engine.load_state_dict(
                {"epoch": saved["epoch"], "epoch_length": saved["epoch_length"], "max_epochs": max_epochs}
            )
        reason = f"; the run had stopped ({', '.join(stopped)})" if stopped else "; training was already complete"
        logger.info("resumed from %s (epoch %d of %d)%s", path, saved["epoch"], max_epochs, reason if done else "")
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
