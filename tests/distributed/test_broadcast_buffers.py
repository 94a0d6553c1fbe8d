"""BroadcastBuffers gives every rank rank 0's BatchNorm statistics before validation (gloo, two processes)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.two_ranks import on_two_ranks
from volcnn.engines import BroadcastBuffers

pytestmark = pytest.mark.dist


def _buffers_after_broadcast(rank: int) -> tuple[list[float], int]:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    net[1].running_mean.fill_(float(rank + 1))  # what each rank's own batches left behind
    net[1].num_batches_tracked.fill_(10 * (rank + 1))
    BroadcastBuffers(net)(None)
    return net[1].running_mean.tolist(), int(net[1].num_batches_tracked)


def test_every_rank_ends_with_rank0_buffers(tmp_path):
    r0, r1 = on_two_ranks(_buffers_after_broadcast, tmp_path)
    assert r0 == r1 == ([1.0, 1.0], 10)


def test_without_a_process_group_it_changes_nothing():
    net = torch.nn.BatchNorm3d(2)
    net.running_mean.fill_(3.0)
    BroadcastBuffers(net)(None)
    assert net.running_mean.tolist() == [3.0, 3.0]
