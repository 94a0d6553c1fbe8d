"""Which process is this under torch.distributed / torchrun: rank 0 logs, writes checkpoints and TensorBoard."""

from __future__ import annotations

import os

import torch.distributed as dist

__all__ = ["process_rank", "is_rank0"]


def process_rank() -> int:
    """This process's global rank: from torch.distributed when initialised, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


def is_rank0() -> bool:
    """``True`` on the process that logs and writes files (rank 0, or the only process)."""
    return process_rank() == 0
