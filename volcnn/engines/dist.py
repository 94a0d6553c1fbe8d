"""Which process is this under torch.distributed / torchrun: rank 0 logs, writes checkpoints and TensorBoard.

``process_rank``, ``world_size`` and ``is_rank0`` live in :mod:`volcnn.core.ranks` (inference asks them too, without
importing training code); they are re-exported here under their old names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from volcnn.core.ranks import is_rank0, process_rank, world_size

__all__ = ["process_rank", "world_size", "is_rank0", "rank_seed", "BroadcastBuffers", "shutdown_process_group"]


def rank_seed(seed: object) -> int | None:
    """This process's seed: the run's ``seed`` plus the rank, so ranks draw different augmentations (rank 0 keeps
    the single-process seed, and so its initial weights, which DDP copies to the others); ``None`` for an
    unseeded run (``None``, ``"none"``)."""
    if seed is None or str(seed).strip().lower() in ("none", "null", ""):
        return None
    return int(str(seed)) + process_rank()


def shutdown_process_group(group: dist.ProcessGroup | None = None) -> bool:
    """Wait for every rank at a barrier, then destroy ``group`` (the default group when ``None``).

    Without the barrier a rank that ends early (rank 1 skips rank 0's writing of models, reports and TensorBoard)
    tears down its gloo connections, or exits, while the other still holds the group, and gloo's transport thread
    can abort the other process on the closed socket (``SIGABRT``, no Python traceback) after all the work is done.
    The barrier brings the ranks to the teardown together. Returns whether a group was destroyed (``False`` when
    none is initialised, as in a single process).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return True


class BroadcastBuffers:
    """At the end of every training epoch, copy rank 0's module buffers (BatchNorm running statistics) to all ranks.

    DDP broadcasts buffers at the start of each training forward, but that forward then updates them on every rank
    from its own batch, so after an epoch each rank's statistics differ. Validation on the ranks' shards must use the
    weights that rank 0 saves, or the gathered metric would describe no saved model. Attach it before the
    ``ValidationHandler``; without an initialised process group it does nothing.
    """

    def __init__(self, network: torch.nn.Module, src: int = 0) -> None:
        self.network = network
        self.src = int(src)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        module = getattr(self.network, "module", self.network)
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, self.src)
