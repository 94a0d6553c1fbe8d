"""RocAuc under DDP: ranks with different numbers of cases (validation shards are not padded) all get the AUC of
the whole section, equal to one process's (gloo, two spawned processes)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import from_engine

from tests.distributed.two_ranks import on_two_ranks
from volcnn.engines import RocAuc

pytestmark = pytest.mark.dist

N, SPLIT = 23, 15  # rank 0 evaluates cases [0, 15), rank 1 [15, 23)


def _section() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (N,), generator=g)
    labels[:2] = torch.tensor([0, 1])
    labels[SPLIT:] = 1  # rank 1 alone sees one class: its own AUC would be undefined
    probs = torch.softmax(torch.randn(N, 2, generator=g) + torch.nn.functional.one_hot(labels, 2), dim=1)
    return probs, labels


def _auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels, 2).float()
    items = [{"pred": p, "label": y} for p, y in zip(probs, onehot, strict=True)]
    engine = Engine(lambda engine, batch: batch)
    RocAuc(output_transform=from_engine(["pred", "label"])).attach(engine, "val_auc")
    return engine.run([items[i : i + 4] for i in range(0, len(items), 4)], max_epochs=1).metrics["val_auc"]


def _auc_of_my_block(rank: int) -> float:
    probs, labels = _section()
    block = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
    return _auc(probs[block], labels[block])


def test_every_rank_gets_the_auc_of_the_whole_section(tmp_path):
    r0, r1 = on_two_ranks(_auc_of_my_block, tmp_path)
    single = _auc(*_section())
    assert r0 == r1 == single
    rank0_alone = _auc(*(t[:SPLIT] for t in _section()))
    assert rank0_alone != single  # the gathered figure is not rank 0's own
