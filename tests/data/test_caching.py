"""Tests of volcnn.data.caching: the transform fingerprint, the RAM / disk / no cache datasets, sharding."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import Compose, Transform

from volcnn.data import SafePersistentDataset, make_dataset, shard, synthesize_cohort, transform_fingerprint
from volcnn.io import load_datalist
from volcnn.transforms import augmentation_transforms, deterministic_transforms, validation_transforms
from volcnn.transforms.volume_cache import PreprocessVolumed

# Small and coarse, so that every pass over the tiny cohort is quick.
BASE = {"pixdim": (2.0, 2.0, 2.0), "hu_window": (-1000, 400), "patch_size": (8, 8, 8), "margin": 2}


def chain(**changes) -> Compose:
    return deterministic_transforms(**{**BASE, **changes})


@pytest.fixture
def datalist(tmp_path: Path) -> list[dict]:
    """Two tiny cases: their candidates (candidate mode) and one whole volume without ``center`` (volume mode)."""
    out = tmp_path / "cohort"
    synthesize_cohort(out, cases=2, seed=0, size="tiny", negatives=2, val_fraction=0.0, test_fraction=0.0)
    data = load_datalist(out / "datalist.json", "training")
    return [*data, {"image": data[0]["image"], "label": 1}]


def items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def assert_same_items(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert type(x["image"]) is type(y["image"]) is MetaTensor
        assert torch.equal(x["image"].as_tensor(), y["image"].as_tensor())
        assert torch.equal(x["image"].affine, y["image"].affine)
        assert x["label"] == y["label"]
        np.testing.assert_array_equal(x["center"].numpy(), y["center"].numpy())  # NaN in volume mode


def cache_files(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir()}


# --- transform_fingerprint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"pixdim": (1.5, 2.0, 2.0)},
        {"hu_window": (-1000, 500)},
        {"patch_size": (8, 8, 10)},
        {"margin": 3},
    ],
    ids=lambda c: next(iter(c)),
)
def test_fingerprint_changes_with_each_setting(change: dict) -> None:
    assert transform_fingerprint(chain(**change)) != transform_fingerprint(chain())


def test_fingerprint_same_for_equal_chains_and_format() -> None:
    fp = transform_fingerprint(chain())
    assert fp == transform_fingerprint(chain())  # two separately built chains
    assert isinstance(fp, bytes) and len(fp) == 32 and int(fp, 16) >= 0
    # MONAI hashes the flattened chain up to the first random transform: augmentation does not count ...
    assert transform_fingerprint(Compose([chain(), augmentation_transforms((8, 8, 8))]).flatten()) == fp
    # ... while the deterministic validation crop is cached too, so it does
    assert transform_fingerprint(Compose([chain(), validation_transforms((8, 8, 8))]).flatten()) != fp


def test_fingerprint_ignores_runtime_state(datalist: list[dict]) -> None:
    c = chain()
    before = transform_fingerprint(c)
    c(datalist[0])  # fills PreprocessVolumed's LRU of volumes
    assert c.transforms[0]._cache
    assert transform_fingerprint(c) == before


class _Odd(Transform):
    """Attributes a naive repr-based hash would get wrong: sets, locks, random states, big arrays, NaN."""

    def __init__(self, big: float) -> None:
        self.names = {"b", "a", "c", "d"}
        self.lock = threading.Lock()
        self.rng = np.random.RandomState()
        self.table = np.full((40, 40), big)
        self.nan = float("nan")
        self.func = np.clip

    def __call__(self, data):
        return data


def test_fingerprint_describes_values_not_identities() -> None:
    assert transform_fingerprint([_Odd(1.0)]) == transform_fingerprint([_Odd(1.0)])
    assert transform_fingerprint([_Odd(1.0)]) != transform_fingerprint([_Odd(2.0)])  # digest of the big array


def test_fingerprint_same_in_another_process() -> None:
    code = textwrap.dedent(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        from volcnn.data import transform_fingerprint
        from volcnn.transforms import deterministic_transforms
        sys.stdout.write(transform_fingerprint(deterministic_transforms(**{BASE!r})).decode())
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different str hash seed than this process's
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip().encode() == transform_fingerprint(chain())


# --- make_dataset ------------------------------------------------------------------------------------------------


def test_modes_and_errors(datalist: list[dict], tmp_path: Path) -> None:
    assert isinstance(make_dataset(datalist, chain(), "ram", progress=False), CacheDataset)
    assert isinstance(make_dataset(datalist, chain(), "disk", cache_dir=tmp_path / "c"), SafePersistentDataset)
    plain = make_dataset(datalist, chain(), "none")
    assert type(plain) is Dataset
    with pytest.raises(ValueError, match="'ram', 'disk', 'none'.*bundle key 'cache'"):
        make_dataset(datalist, chain(), "memory")
    with pytest.raises(ValueError, match="bundle key 'cache_dir'"):
        make_dataset(datalist, chain(), "disk")
    with pytest.raises(ValueError, match="cache_rate"):
        make_dataset(datalist, chain(), "ram", cache_rate=1.5)


def test_disk_items_equal_ram_items_and_second_pass_reads_only_the_cache(
    datalist: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    ram = items(make_dataset(datalist, chain(), "ram", progress=False))
    calls = []
    original = PreprocessVolumed.__call__
    monkeypatch.setattr(PreprocessVolumed, "__call__", lambda self, d: calls.append(d) or original(self, d))
    first = items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    assert len(calls) == len(datalist)
    assert_same_items(first, ram)  # MetaTensors with their affine, same values, label and center
    names = cache_files(cache_dir)
    fp = transform_fingerprint(chain()).decode()
    assert len(names) == len(datalist) and all(n.endswith(f"{fp}.pt") for n in names)

    for path in {d["image"] for d in datalist}:  # the second pass must not need the images ...
        os.remove(path)
    calls.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cache file")  # ... and must find no unreadable file
        second = items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    assert calls == []
    assert_same_items(second, ram)
    assert cache_files(cache_dir) == names


def test_disk_cache_is_per_settings(datalist: list[dict], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    old = cache_files(cache_dir)
    finer = items(make_dataset(datalist, chain(pixdim=(1.5, 1.5, 1.5)), "disk", cache_dir=cache_dir))
    new = cache_files(cache_dir) - old
    assert len(new) == len(datalist) and old <= cache_files(cache_dir)  # new files, the old ones untouched
    assert_same_items(finer, items(make_dataset(datalist, chain(pixdim=(1.5, 1.5, 1.5)), "none")))


@pytest.mark.parametrize("keep", [0, 0.5], ids=["empty", "half"])
def test_truncated_cache_file_is_recomputed(datalist: list[dict], tmp_path: Path, keep: float) -> None:
    cache_dir = tmp_path / "cache"
    expected = items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    victim = sorted(cache_dir.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: int(victim.stat().st_size * keep)])
    with pytest.warns(UserWarning, match=f"unreadable cache file {victim}.*recomputing"):
        again = items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    assert_same_items(again, expected)
    with torch.serialization.safe_globals([MetaTensor]):
        rewritten = torch.load(victim, weights_only=True)
    assert rewritten["image"].shape == expected[0]["image"].shape  # rewritten whole


def test_failed_write_leaves_no_partial_file(datalist: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache_dir = tmp_path / "cache"
    expected = items(make_dataset(datalist[:1], chain(), "none"))

    def full_disk(obj, f, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.warns(UserWarning, match="could not write cache file .*No space left"):
        got = items(make_dataset(datalist[:1], chain(), "disk", cache_dir=cache_dir))
    assert_same_items(got, expected)
    assert cache_files(cache_dir) == set()  # neither the final name nor the temporary file


def test_writes_are_renames_within_cache_dir(datalist: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache_dir = tmp_path / "cache"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((Path(a), Path(b))) or real_replace(a, b))
    items(make_dataset(datalist, chain(), "disk", cache_dir=cache_dir))
    assert len(renames) == len(datalist)
    for src, dst in renames:
        assert src.parent == dst.parent == cache_dir and src.name.startswith(".") and not src.exists()
    assert not [n for n in cache_files(cache_dir) if n.endswith(".tmp")]


# --- sharding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (2, 4), (0, 2)])
def test_shard(n: int, world: int) -> None:
    data = list(range(n))
    if 0 < n < world:  # an evaluation rank with nothing to do would hang the others' gather: refused
        with pytest.raises(ValueError, match=f"{n} datalist entries cannot be split over {world} processes"):
            shard(data, 0, world, even_divisible=False)
        data += list(range(n, world))
    exact = [shard(data, r, world, even_divisible=False) for r in range(world)]
    assert [x for part in exact for x in part] == data  # contiguous blocks, in order, each entry once
    assert max(map(len, exact)) - min(map(len, exact)) <= 1
    padded = [shard(data, r, world) for r in range(world)]
    assert len({len(p) for p in padded}) == 1 and set().union(*map(set, padded)) == set(data)


@pytest.mark.parametrize("positives, negatives, world", [(3, 8, 3), (1, 20, 2), (5, 5, 4), (7, 100, 3)])
def test_stratified_shards_split_every_class_evenly(positives: int, negatives: int, world: int) -> None:
    """Each class is split within one entry across ranks and the parts' sizes are within one, so a rank's
    class-balanced sampler sees the set's class mix; within a part the datalist order is kept (volumes together)."""
    labels = [1] * positives + [0] * negatives  # all nodules in the first volumes: plain blocks would not spread them
    data = [{"i": i, "label": y} for i, y in enumerate(labels)]
    exact = [shard(data, r, world, even_divisible=False, stratify="label") for r in range(world)]
    assert sorted(e["i"] for part in exact for e in part) == list(range(len(data)))  # each entry once
    assert all([e["i"] for e in part] == sorted(e["i"] for e in part) for part in exact)
    for label in set(labels):
        per_rank = [sum(e["label"] == label for e in part) for part in exact]
        assert max(per_rank) - min(per_rank) <= 1, (label, per_rank)
    assert max(map(len, exact)) - min(map(len, exact)) <= 1
    padded = [shard(data, r, world, stratify="label") for r in range(world)]
    assert len({len(p) for p in padded}) == 1
    assert all({e["i"] for e in p} == {e["i"] for e in x} for p, x in zip(padded, exact, strict=True))
    with pytest.raises(ValueError, match="entry 2 has no such key"):
        shard([*data[:2], {"i": 2}], 0, world, stratify="label")


def test_shard_errors_and_make_dataset_rank(datalist: list[dict]) -> None:
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="rank"):
        make_dataset(datalist, chain(), "none", world_size=2)
    parts = [make_dataset(datalist, chain(), "none", rank=r, world_size=2, even_divisible=False) for r in range(2)]
    assert parts[0].data + parts[1].data == datalist


def test_a_fresh_process_reads_the_cache_without_recomputing(datalist: list[dict], tmp_path: Path) -> None:
    """Validation items carry MONAI's applied_operations (TraceKeys enums): they must load under weights_only=True
    in a process that has registered nothing, or every read silently falls back to recomputing."""
    cache_dir = tmp_path / "cache"
    val_chain = Compose([chain(), validation_transforms(BASE["patch_size"])]).flatten()
    expected = items(make_dataset(datalist, val_chain, "disk", cache_dir=cache_dir))
    for entry in datalist:
        Path(entry["image"]).unlink(missing_ok=True)  # a recomputation would now fail to load the volume
    code = textwrap.dedent(
        f"""
        import json, warnings
        warnings.filterwarnings("error", message=".*unreadable cache file")
        from monai.transforms import Compose
        from volcnn.data import make_dataset
        from volcnn.transforms import deterministic_transforms, validation_transforms
        from volcnn.io import load_datalist
        data = load_datalist({str(tmp_path / "cohort" / "datalist.json")!r}, "training")
        datalist = [*data, {{"image": data[0]["image"], "label": 1}}]  # as the fixture builds it
        base = {BASE!r}
        val_chain = Compose([deterministic_transforms(**base), validation_transforms(base["patch_size"])]).flatten()
        ds = make_dataset(datalist, val_chain, "disk", cache_dir={str(cache_dir)!r}, progress=False)
        print(json.dumps([float(ds[i]["image"].sum()) for i in range(len(ds))]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    sums = json.loads(done.stdout.strip().splitlines()[-1])
    assert sums == pytest.approx([float(e["image"].sum()) for e in expected], rel=0, abs=1e-3)


def test_fresh_and_cached_items_have_the_same_types(datalist: list[dict], tmp_path: Path) -> None:
    """A batch may mix items computed now with items read back; collation needs them alike."""
    cache_dir = tmp_path / "cache"
    val_chain = Compose([chain(), validation_transforms(BASE["patch_size"])]).flatten()
    fresh = items(make_dataset(datalist, val_chain, "disk", cache_dir=cache_dir))
    cached = items(make_dataset(datalist, val_chain, "disk", cache_dir=cache_dir))

    def types(obj):
        if isinstance(obj, dict):
            return {str(k): types(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [types(v) for v in obj]
        if isinstance(obj, MetaTensor):
            return ("MetaTensor", types(dict(obj.meta)), types(list(obj.applied_operations)))
        return type(obj).__name__

    assert [types(i) for i in fresh] == [types(i) for i in cached]
