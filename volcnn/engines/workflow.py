"""Entry points the bundle's ``initialize`` and ``training`` lists call: seeding, determinism, resume, run."""

from __future__ import annotations

import logging
import os
from typing import Any

import monai
import torch
from ignite.engine import Engine

from volcnn.core.options import as_bool
from volcnn.engines.checkpoint import TrainingCheckpointer
from volcnn.engines.dist import process_rank
from volcnn.engines.trainer import NonFiniteLossError
from volcnn.models.weights import load_weights

__all__ = ["load_initial_weights", "quiet_non_rank0", "run_training", "seed_everything"]

logger = logging.getLogger(__name__)


def quiet_non_rank0() -> None:
    """Log warnings and errors only on ranks other than 0, so a multi-process run prints one log.

    ``logging.disable``, not logger levels: MONAI's ``StatsHandler`` and ``get_logger`` create loggers later, at
    INFO, with their own stdout handlers and no propagation, which no level set here would reach.
    """
    if process_rank() != 0:
        logging.disable(logging.INFO)


def seed_everything(seed: object = 0, deterministic: object = False) -> None:
    """Seed Python, NumPy, torch (CPU and CUDA) and MONAI's transforms; optionally deterministic kernels.

    Args:
        seed: an int, or ``None``/``"none"`` for an unseeded run.
        deterministic: ``true`` makes torch use deterministic algorithms only (and cuDNN deterministic, no
            autotuning; ``CUBLAS_WORKSPACE_CONFIG`` is set for CUDA). Bit-exact resume relies on it.
    """
    det = as_bool(deterministic)
    if det:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    s = None if seed is None or str(seed).strip().lower() in ("none", "null", "") else int(str(seed))
    if s is None and det:
        raise ValueError("deterministic: true needs a seed")
    monai.utils.set_determinism(seed=s, use_deterministic_algorithms=det)
    logger.info("seed %s, deterministic algorithms %s", s, "on" if det else "off")


def run_training(trainer: Engine, checkpointer: TrainingCheckpointer | None = None, resume: object = False) -> Any:
    """Run ``trainer``; with ``resume`` true, first continue from the newest checkpoint of ``checkpointer``.

    A resumed run that had finished (it reached ``max_epochs``, or stopped early: the checkpoint holds the
    early-stopping handler's state) is not started again, so it writes nothing. A non-finite loss stops the run
    with :class:`NonFiniteLossError` (so the process exits non-zero); the message names the epoch, the iteration
    and the last good checkpoint, which is left untouched.
    """
    if as_bool(resume):
        if checkpointer is None:
            raise ValueError("resume: true needs the trainer's TrainingCheckpointer")
        if checkpointer.resume(trainer):
            logger.info("nothing to do: the resumed run had finished (max_epochs=%s or early stopping)",
                        trainer.state.max_epochs)  # fmt: skip
            return trainer.state
    try:
        trainer.run()
    except NonFiniteLossError as e:
        last = checkpointer.checkpoints()[-1] if checkpointer is not None and checkpointer.checkpoints() else None
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint had been written yet"
        logger.error("%s%s", e, where)
        raise NonFiniteLossError(f"{e}{where}") from None
    return trainer.state


def load_initial_weights(network: torch.nn.Module, path: object = None) -> None:
    """Start training from the weights in ``path`` (a state dict, loaded weights-only) instead of a fresh
    initialisation; nothing when ``path`` is None or ``"none"``. A resumed run's checkpoint then replaces them.

    It runs in the bundle's ``training`` list, after the trainer (and so the network) is built, so an unset
    ``init_weights`` leaves the order in which the run draws its random numbers, and its results, unchanged.
    Mining rounds (:mod:`volcnn.engines.mining`) continue from the round before's best weights this way.
    """
    if path is None or str(path).strip().lower() in ("", "none", "null"):
        return
    device = next(network.parameters()).device
    load_weights(network, str(path), device).train()
    logger.info("initial weights from %s", path)
