"""Run a function on two spawned processes joined in one gloo process group, for the distributed tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[[int], Any], init_file: str, results: Any) -> None:
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = fn(rank)
    finally:
        if dist.is_initialized():  # ``fn`` may have torn the group down itself
            dist.destroy_process_group()


def on_two_ranks(fn: Callable[[int], Any], tmp_path: Path) -> tuple[Any, Any]:
    """``(fn(0), fn(1))``, each called in its own process inside the group (``fn`` must be a module-level function,
    its result picklable); ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` are set as torchrun sets them."""
    results = mp.Manager().dict()
    mp.spawn(_entry, args=(fn, str(tmp_path / "init"), results), nprocs=2, join=True)
    return results[0], results[1]
