"""BroadcastBuffers gives every rank rank 0's BatchNorm statistics before validation (gloo, two processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from volcnn.engines import BroadcastBuffers

pytestmark = pytest.mark.dist


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
        net[1].running_mean.fill_(float(rank + 1))  # what each rank's own batches left behind
        net[1].num_batches_tracked.fill_(10 * (rank + 1))
        BroadcastBuffers(net)(None)
        results[rank] = (net[1].running_mean.tolist(), int(net[1].num_batches_tracked))
    finally:
        dist.destroy_process_group()


def test_every_rank_ends_with_rank0_buffers(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == results[1] == ([1.0, 1.0], 10)


def test_without_a_process_group_it_changes_nothing():
    net = torch.nn.BatchNorm3d(2)
    net.running_mean.fill_(3.0)
    BroadcastBuffers(net)(None)
    assert net.running_mean.tolist() == [3.0, 3.0]
