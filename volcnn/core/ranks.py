"""Which process is this in a torch.distributed / torchrun job, and how many are there.

Training (:mod:`volcnn.engines`) and sharded inference (:mod:`volcnn.inference.sharding`) both ask; the answers
live here, below both, so that inference need not import the training package to learn its rank. Nothing here
starts or joins a process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["is_rank0", "launched_world_size", "local_rank", "process_rank", "quiet_unless_rank0", "world_size"]


def process_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """How many processes work together: from torch.distributed when initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def is_rank0() -> bool:
    """``True`` on the process that logs and writes files (rank 0, or the only process)."""
    return process_rank() == 0


def launched_world_size() -> int:
    """How many processes the launcher started (torchrun's ``WORLD_SIZE``; 1 without a launcher), known before any
    process group exists: it decides whether one is needed at all."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """This process's index on its machine (torchrun's ``LOCAL_RANK``; 0 without a launcher): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


@contextlib.contextmanager
def quiet_unless_rank0(quiet: bool = True) -> Iterator[None]:
    """Within the block, log only warnings and errors on ranks other than 0 (when ``quiet``).

    For set-up that every rank repeats word for word (loading a model, choosing a method): one copy in the log is
    enough. ``logging.disable`` rather than logger levels, as loggers created inside the block must be reached too;
    the previous setting is restored afterwards.
    """
    if not quiet or process_rank() == 0:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(max(before, logging.INFO))
    try:
        yield
    finally:
        logging.disable(before)
