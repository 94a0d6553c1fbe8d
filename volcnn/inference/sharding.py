"""Splitting a batch of inputs over the processes of a torchrun job, and gathering what each of them did.

``torchrun --nproc_per_node N -m volcnn infer ...`` starts N copies of the same command line. Each one runs the
inputs of its :class:`Shard` (input ``i`` on rank ``i % N``) and writes their case folders; at the end every rank
gathers every rank's per-input results, so each returns the whole batch's outcome (and the same exit code), and
rank 0 alone writes ``summary.csv`` and ``failures.json`` (:meth:`volcnn.inference.InferenceRunner.run`).

Only small Python objects cross between the processes, twice (a check that all were given the same inputs, at the
start, and the results, after the last case): a gloo group carries them on the CPU on any machine, GPU or not, and
needs no device of its own (NCCL would need one per rank, and its watchdog aborts a rank that waits long). A rank
that finishes its shard early waits at the last gather for the slowest: the group's timeout is
:data:`GATHER_TIMEOUT` rather than torch's 30 minutes, which shards of an archive can differ by. A rank that dies
does not leave the others waiting: torchrun stops the whole job.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from volcnn.core.errors import UsageError
from volcnn.core.ranks import launched_world_size, local_rank

__all__ = ["GATHER_TIMEOUT", "Shard", "rank_device", "shard_indices", "torchrun_shard"]

#: how long a rank waits for the others at the gathers (the slowest shard's remaining work)
GATHER_TIMEOUT = timedelta(days=7)


def shard_indices(n: int, rank: int, world: int) -> range:
    """The indices of the inputs rank ``rank`` of ``world`` runs out of ``n``: ``rank, rank + world, ...``.

    A function of the list's length alone, so every rank agrees without talking; neighbouring inputs (often one
    patient's series, or scans of one size) go to different ranks, so the shards' work stays close even when the
    list is sorted by size or site. Together the ranks cover every index exactly once.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    return range(rank, n, world)


@dataclass(frozen=True)
class Shard:
    """This process's part of a batch: its ``rank`` among ``world`` processes and the process ``group`` (``None``:
    torch's default group) through which the ranks gather their results."""

    rank: int
    world: int
    group: Any = None

    def indices(self, n: int) -> range:
        """The inputs (indices into a list of ``n``) this rank runs: :func:`shard_indices`."""
        return shard_indices(n, self.rank, self.world)

    def gather(self, item: Any) -> list[Any]:
        """Every rank's ``item`` (picklable), in rank order, on every rank. A collective: every rank must call it."""
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, item, group=self.group)
        return parts

    def check_same_inputs(self, inputs: Sequence[str | os.PathLike[str]]) -> None:
        """Refuse to start unless every rank was given the same input list (the split assumes it; nodes of a
        multi-machine job may expand a pattern differently). A collective.

        Raises:
            UsageError: on every rank, naming how many inputs each rank has.
        """
        digest = hashlib.sha256("\0".join(os.fspath(p) for p in inputs).encode()).hexdigest()
        seen = self.gather((len(inputs), digest))
        if len({d for _, d in seen}) > 1:
            counts = ", ".join(f"rank {r}: {n}" for r, (n, _) in enumerate(seen))
            raise UsageError(f"the processes of this torchrun job were given different input lists ({counts} inputs)")


@contextlib.contextmanager
def torchrun_shard() -> Iterator[Shard | None]:
    """This process's :class:`Shard` when torchrun started several (``WORLD_SIZE`` > 1), else ``None``.

    Joins the job's process group from torchrun's environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``) with the gloo backend when none exists, and leaves it afterwards; inside a program that already
    has one (any backend), a gloo group over the same ranks is made for the gather and destroyed afterwards.
    """
    if launched_world_size() < 2 or not dist.is_available():
        yield None
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        group = None
    else:
        group = dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT)
    finished = False
    try:
        yield Shard(dist.get_rank(), dist.get_world_size(), group)
        finished = True
    finally:
        if finished:  # the ranks tear down together (see volcnn.engines.dist.shutdown_process_group)
            dist.barrier(group=group)
        dist.destroy_process_group(group)


def rank_device(device: str | None) -> str | None:
    """The device this process runs on: under torchrun on a CUDA machine, GPU ``LOCAL_RANK`` modulo the GPU count
    when no device or a plain ``"cuda"`` was asked for (one GPU per process rather than all on GPU 0; more processes
    than GPUs share them round robin, which keeps a GPU busy while its processes read and resample CTs); otherwise
    ``device`` as given (``None``: the runner's default). Without torchrun, always ``device``: one process behaves as
    it always did."""
    if launched_world_size() < 2 or not torch.cuda.is_available():
        return device
    if device is None or device == "cuda":
        return f"cuda:{local_rank() % max(torch.cuda.device_count(), 1)}"
    return device
