"""DDP training (two gloo processes under torchrun) with ``--cache disk`` in one cache folder shared by the ranks.

Each rank holds its own shard of the training and validation datalists (``multi_gpu_train.json``), and its
:class:`~volcnn.data.SafePersistentDataset` computes and stores only the items of that shard. The test wraps the
datasets through a small overlay written into ``tmp_path`` (``train#dataset#_target_`` and
``validate#dataset#_target_`` point at :func:`recording_dataset` below): every rank logs the entries it holds and
each entry it had to compute (a cache miss), one JSON line each, into ``<output_dir>/probe/``. The cache folder's
file names, contents and mtimes are untouched by the probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.distributed.torchrun_output import failure_report
from volcnn.data import make_dataset, synthesize_cohort
from volcnn.engines.dist import process_rank

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
SECTIONS = ("training", "validation")
SMALL: dict[str, object] = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "amp": False,
         "progress": False, "max_epochs": 1, "cache": "disk"}  # fmt: skip
PROBE = {
    f"{section}#dataset#{key}": value
    for section, name in (("train", "training"), ("validate", "validation"))
    for key, value in (
        ("_target_", f"{__name__}.recording_dataset"),
        ("probe_dir", "$@output_dir + '/probe'"),
        ("section", name),
    )
}


def recording_dataset(probe_dir: str, section: str, **kwargs: Any) -> Any:
    """:func:`volcnn.data.make_dataset` whose result logs, into ``probe_dir/<section>-rank<r>.jsonl``, the entries
    this rank holds (one ``{"held": [...]}`` line) and every entry it computes instead of reading from the disk cache
    (one ``{"computed": entry}`` line each). Runs inside the torchrun workers (the overlay's ``_target_``)."""
    ds = make_dataset(**kwargs)
    log = Path(probe_dir) / f"{section}-rank{process_rank()}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict[str, Any]) -> None:
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    write({"held": [_key(e) for e in ds.data]})
    compute = ds._pre_transform  # called by SafePersistentDataset._cachecheck on a cache miss only

    def recording(item: Any) -> Any:
        write({"computed": _key(item)})
        return compute(item)

    ds._pre_transform = recording
    return ds


def _key(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("disk_cache_cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    return out


def _parsed(cohort: Path, cache_dir: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"), **SMALL,
                   "cache_dir": str(cache_dir)})  # fmt: skip
    return parser


@pytest.fixture(scope="module")
def expected(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Per section: ``entry key -> cache file name`` for every entry of the whole datalist, from the single-process
    datasets (same entries, transforms and naming as the workers')."""
    parser = _parsed(cohort, tmp_path_factory.mktemp("unused_cache"))
    out: dict[str, dict[str, str]] = {}
    for prefix, section in zip(("train", "validate"), SECTIONS, strict=True):
        ds = parser.get_parsed_content(f"{prefix}#dataset")
        out[section] = {_key(e): ds.hash_func(e).decode("utf-8") + ds.transform_hash + ".pt" for e in ds.data}
    return out


def _batch_size(expected: dict[str, dict[str, str]]) -> int:
    """One batch per epoch holds a rank's whole (padded) training shard, so one epoch reads every item."""
    return -(-len(expected["training"]) // 2)


def _torchrun(cohort: Path, out: Path, cache_dir: Path, batch_size: int) -> subprocess.CompletedProcess:
    overlay = out.parent / f"{out.name}_probe.json"
    overlay.write_text(json.dumps(PROBE))
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}','{overlay}']"
    args = ["--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist.json"), "--output_dir", str(out),
            "--cache_dir", str(cache_dir), "--batch_size", str(batch_size)]  # fmt: skip
    for key, value in SMALL.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "monai.bundle", "run", "training", "--config_file", configs, *args]  # fmt: skip
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])  # workers import this module
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600, env=env)


def _probe(out: Path, section: str, rank: int) -> tuple[list[str], list[str]]:
    """What the run's rank ``rank`` held and computed for ``section``."""
    held: list[str] | None = None
    computed: list[str] = []
    for line in (out / "probe" / f"{section}-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "held" in record:
            assert held is None, f"rank {rank} built its {section} dataset twice"
            held = record["held"]
        else:
            computed.append(record["computed"])
    assert held, f"rank {rank} held no {section} entries"
    return held, computed


def _cache_files(cache_dir: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.stat().st_size) for p in cache_dir.iterdir()}


@pytest.fixture(scope="module")
def shared(cohort: Path, expected: dict[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A first DDP run that fills the shared cache, then a second one (fresh output_dir, same cache_dir)."""
    root = tmp_path_factory.mktemp("ddp_disk_cache")
    cache_dir = root / "shared_cache"
    runs: dict[str, Any] = {"cache_dir": cache_dir}
    for name in ("first", "second"):
        out = root / name
        out.mkdir()
        done = _torchrun(cohort, out, cache_dir, _batch_size(expected))
        assert done.returncode == 0, failure_report(done)
        runs[name] = out
        runs[f"{name}_files"] = _cache_files(cache_dir)
    return runs


def test_the_cache_holds_one_file_per_distinct_item_of_training_and_validation(
    shared: dict, expected: dict[str, dict[str, str]]
) -> None:
    """After the first run the shared folder holds exactly the files of the distinct training and validation
    entries: no duplicate from the padded training shards, no test-section entry, no temporary file."""
    names = set(shared["first_files"])
    want = {name for section in SECTIONS for name in expected[section].values()}
    assert len(want) == sum(len(expected[s]) for s in SECTIONS)  # the names of the two sections are distinct
    assert names == want, f"missing {sorted(want - names)}, unexpected {sorted(names - want)}"


def test_each_rank_computes_only_items_of_its_own_shard_and_each_item_once(
    shared: dict, expected: dict[str, dict[str, str]]
) -> None:
    """Per section: the ranks' shards are disjoint and cover the datalist; each rank computed only entries of its
    shard, none twice (a padded duplicate is read back from the cache), and no entry was computed by both ranks."""
    for section in SECTIONS:
        (held0, computed0), (held1, computed1) = (_probe(shared["first"], section, r) for r in (0, 1))
        assert not set(held0) & set(held1), f"{section}: the ranks' shards overlap"
        assert set(held0) | set(held1) == set(expected[section]), f"{section}: the shards do not cover the datalist"
        for rank, held, computed in ((0, held0, computed0), (1, held1, computed1)):
            others = set(computed) - set(held)
            assert not others, f"{section}: rank {rank} computed {len(others)} entries of the other rank's shard"
            assert len(computed) == len(set(computed)), f"{section}: rank {rank} computed an entry twice"
        assert sorted(computed0 + computed1) == sorted(expected[section]), f"{section}: not every entry computed once"


def test_a_second_run_with_the_same_cache_dir_computes_and_writes_nothing(shared: dict) -> None:
    """A second DDP run (fresh output_dir, same cache_dir) reads every item from the cache: no rank computed
    anything, no file was added, and the existing files kept their mtime, inode and size."""
    first, second = shared["first_files"], shared["second_files"]
    assert second.keys() == first.keys(), f"files added {sorted(second.keys() - first.keys())}"
    rewritten = sorted(name for name in first if second[name] != first[name])
    assert not rewritten, f"{len(rewritten)} cache files were rewritten: {rewritten[:3]}"
    for section in SECTIONS:
        for rank in (0, 1):
            held, computed = _probe(shared["second"], section, rank)
            assert held and not computed, f"{section}: rank {rank} recomputed {len(computed)} cached entries"
