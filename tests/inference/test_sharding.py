"""The pieces of sharded inference that need no second process: the split, case names over the whole list, the
torchrun environment, and the runner's checks on what the ranks exchange (a stand-in for the process group).

Two real processes under torchrun: ``tests/distributed/test_sharded_infer.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from tests.conftest import make_affine
from tests.inference import BlobNet, nodule_scan
from volcnn.core.errors import UsageError
from volcnn.inference import InferenceRunner
from volcnn.inference.cases import case_names
from volcnn.inference.sharding import Shard, rank_device, shard_indices, torchrun_shard
from volcnn.io import write_nifti

PATCH = (12, 12, 12)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 4, 7, 10])
def test_the_ranks_cover_every_input_exactly_once(n, world):
    parts = [list(shard_indices(n, rank, world)) for rank in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert all(i % world == rank for rank, part in enumerate(parts) for i in part)  # the documented split
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard_indices(4, 2, 2)


def test_case_names_are_decided_over_the_whole_list():
    inputs = ["a/x.nii.gz", "b/x.nii", "c/x-2.nii.gz", "d/x", "e/y.mha"]
    assert case_names(inputs) == ["x", "x-2", "x-2-2", "x-3", "y"]
    # what rank 1 of 2 names its inputs: the same as one process, not what its own share alone would give
    assert [case_names(inputs)[i] for i in shard_indices(len(inputs), 1, 2)] == ["x-2", "x-3"]
    assert case_names([inputs[i] for i in shard_indices(len(inputs), 1, 2)]) == ["x", "x-2"]  # the trap avoided


def test_without_torchrun_there_is_no_shard(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with torchrun_shard() as shard:
        assert shard is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process, as without torchrun
    with torchrun_shard() as shard:
        assert shard is None
    assert not dist.is_initialized()


def test_inside_a_program_with_a_process_group_a_gloo_group_is_made_and_left(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # pretend torchrun started more, so that a shard is made
        with torchrun_shard() as shard:
            assert shard is not None and (shard.rank, shard.world) == (0, 1)
            assert shard.group is not None and shard.gather({"a": 1}) == [{"a": 1}]
        assert dist.is_initialized()  # the program's own group is still there
    finally:
        dist.destroy_process_group()


def test_each_torchrun_process_gets_its_own_gpu(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert rank_device(None) is None and rank_device("cuda") == "cuda"  # one process: unchanged
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert [rank_device(d) for d in (None, "cuda", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cuda:0", "cpu"]
    monkeypatch.setenv("LOCAL_RANK", "3")  # 4 processes on 2 GPUs: two on each
    assert rank_device(None) == "cuda:1"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert rank_device(None) is None and rank_device("cpu") == "cpu"


class FakeShard(Shard):
    """Rank ``rank`` of 2 without a process group: the other rank's items are given (``partner``)."""

    def __init__(self, rank: int, partner: dict[type, Any]) -> None:
        super().__init__(rank, 2)
        object.__setattr__(self, "partner", partner)

    def gather(self, item: Any) -> list[Any]:
        other = self.partner[type(item)]  # type: ignore[attr-defined]
        return [item, other] if self.rank == 0 else [other, item]


def _scans(folder: Path, n: int) -> list[str]:
    aff = make_affine((2.0, 2.0, 2.0))
    paths = []
    for i in range(n):
        paths.append(folder / f"s{i}.nii.gz")
        write_nifti(paths[-1], nodule_scan((24, 24, 20), aff), aff)
    return [str(p) for p in paths]


def _runner() -> InferenceRunner:
    return InferenceRunner(BlobNet(PATCH), patch_size=PATCH, pixdim=(2.0, 2.0, 2.0), device="cpu", progress=False,
                           model_info={"sha256": "abc"})  # fmt: skip


def test_ranks_given_different_inputs_are_refused(tmp_path):
    shard = FakeShard(1, {tuple: (2, "another list")})
    with pytest.raises(UsageError, match=r"different input lists \(rank 0: 2, rank 1: 3 inputs\)"):
        _runner().run(["a.nii", "b.nii", "c.nii"], tmp_path, shard=shard)


def test_rank1_writes_no_reports_and_returns_the_whole_batch(tmp_path):
    inputs = _scans(tmp_path / "in", 3)
    single = _runner().run(inputs, tmp_path / "single")
    rank0_part = [{"index": i, "row": {"case": f"s{i}", "status": "failed"}, "processed": None,
                   "failure": {"input": inputs[i], "error": "rank 0's"}, "skipped": False} for i in (0, 2)]  # fmt: skip
    same = FakeShard(1, {tuple: (3, None), list: rank0_part})
    same.check_same_inputs = lambda inputs: None  # type: ignore[method-assign]
    result = _runner().run(inputs, tmp_path / "sharded", shard=same)
    assert not (tmp_path / "sharded" / "summary.csv").exists() and not (tmp_path / "sharded" / "failures.json").exists()
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["s1"]  # its own case only
    assert [f["error"] for f in result["failures"]] == ["rank 0's", "rank 0's"]
    assert result["processed"] == [single["processed"][1]]


def test_rank0_writes_the_merged_reports_in_input_order(tmp_path):
    inputs = _scans(tmp_path / "in", 3)
    rank1_part = [{"index": 1, "row": {"case": "s1", "status": "failed"}, "processed": None,
                   "failure": {"input": inputs[1], "error": "rank 1's"}, "skipped": False}]  # fmt: skip
    shard = FakeShard(0, {tuple: None, list: rank1_part})
    shard.check_same_inputs = lambda inputs: None  # type: ignore[method-assign]
    out = tmp_path / "out"
    _runner().run(inputs, out, shard=shard)
    with open(out / "summary.csv", newline="") as f:
        assert [(r["case"], r["status"]) for r in csv.DictReader(f)] == [("s0", "ok"), ("s1", "failed"), ("s2", "ok")]
    assert (out / "failures.json").read_text().count("rank 1's") == 1


def test_a_broken_split_is_caught(tmp_path):
    """Should the ranks' shares ever overlap or leave an input out, the batch fails instead of reporting it."""
    inputs = _scans(tmp_path / "in", 2)
    shard = FakeShard(0, {list: []})  # rank 1 ran nothing, though input 1 was its
    shard.check_same_inputs = lambda inputs: None  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"the ranks ran inputs \[0\] of 2"):
        _runner().run(inputs, tmp_path / "out", shard=shard)
