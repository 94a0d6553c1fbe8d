"""The process's rank under torchrun, known to every layer: the helpers volcnn.engines re-exports, torchrun's
environment read before any process group exists, and set-up logs kept to rank 0."""

from __future__ import annotations

import logging

import volcnn.engines
import volcnn.engines.dist
from volcnn.core import ranks


def test_engines_keep_their_names():
    for name in ("process_rank", "world_size", "is_rank0"):
        assert getattr(volcnn.engines, name) is getattr(ranks, name)
        assert getattr(volcnn.engines.dist, name) is getattr(ranks, name)


def test_torchrun_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (ranks.process_rank(), ranks.local_rank(), ranks.launched_world_size(), ranks.world_size()) == (0, 0, 1, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (ranks.process_rank(), ranks.local_rank(), ranks.launched_world_size()) == (3, 1, 4)
    assert not ranks.is_rank0()
    assert ranks.world_size() == 1  # no process group joined: nobody to work with yet


def test_set_up_logs_come_from_rank0_only(monkeypatch, caplog):
    log = logging.getLogger("volcnn.test_ranks")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("RANK", "1")
    with ranks.quiet_unless_rank0():
        log.info("loading the model")
        log.warning("something is off")
    log.info("after the block")
    with ranks.quiet_unless_rank0(quiet=False):
        log.info("not quieted")
    monkeypatch.setenv("RANK", "0")
    with ranks.quiet_unless_rank0():
        log.info("rank 0 speaks")
    assert [r.getMessage() for r in caplog.records] == [
        "something is off",
        "after the block",
        "not quieted",
        "rank 0 speaks",
    ]
    assert logging.root.manager.disable == logging.NOTSET
