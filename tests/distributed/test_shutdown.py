"""shutdown_process_group: the ranks reach the teardown together, so none closes its gloo connections (or exits)
while another still holds the group (gloo, two processes)."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tests.distributed.two_ranks import on_two_ranks
from volcnn.engines import shutdown_process_group

pytestmark = pytest.mark.dist

LATE = 1.5  # seconds rank 1 works on after rank 0 is done (rank 0's writing of models and reports, reversed)


def _shutdown(rank: int) -> tuple[float, float, bool, bool]:
    """(when this rank asked for the teardown, when its call returned, what it returned, whether a group is left)."""
    if rank == 1:
        time.sleep(LATE)
    asked = time.monotonic()
    destroyed = shutdown_process_group()
    return asked, time.monotonic(), destroyed, dist.is_initialized()


def test_no_rank_tears_down_before_every_rank_asked_to(tmp_path):
    (asked0, done0, destroyed0, left0), (asked1, done1, destroyed1, left1) = on_two_ranks(_shutdown, tmp_path)
    assert destroyed0 and destroyed1 and not left0 and not left1
    assert asked1 - asked0 > LATE / 2  # rank 1 really came late (monotonic clocks are system-wide on Linux)
    assert done0 >= asked1, "rank 0 destroyed its group while rank 1 was still working"


def test_without_a_process_group_it_does_nothing():
    assert not dist.is_initialized()
    assert shutdown_process_group() is False
