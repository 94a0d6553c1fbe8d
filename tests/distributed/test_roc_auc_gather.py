"""RocAuc under DDP: ranks with different numbers of cases (validation shards are not padded) all get the AUC of
the whole section, equal to one process's (gloo, two spawned processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine
from monai.handlers import from_engine

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


def _worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        probs, labels = _section()
        block = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        results[rank] = _auc(probs[block], labels[block])
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_the_auc_of_the_whole_section(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    single = _auc(*_section())
    assert results[0] == results[1] == single
    rank0_alone = _auc(*(t[:SPLIT] for t in _section()))
    assert rank0_alone != single  # the gathered figure is not rank 0's own
