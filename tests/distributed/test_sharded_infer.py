"""``volcnn infer`` under torchrun (two gloo processes on the CPU) shares its inputs between the ranks and writes what
one process writes.

Six inputs: four scans, a truncated file and a second ``ras`` scan from another folder (a case-name clash that only
the whole list can resolve: the first ``ras`` is rank 0's, the clash rank 1's). The same command runs once in this
process and once as two torchrun workers; a one-process re-run then meets the two-process outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.inference import GEOMETRIES, nodule_scan
from volcnn.bundle import configure_bundle
from volcnn.cli import main
from volcnn.io import write_nifti
from volcnn.networks import create_network

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
#: a cheap bundle: a tiny untrained network on a coarse grid (its dense map passes the check against windows)
SMALL = {"network_def": "seed_cnn3d", "patch_size": [8, 8, 8], "pixdim": [2.0, 2.0, 2.0], "stride_mm": 8.0,
         "device": "cpu", "progress": False}  # fmt: skip
#: input order -> case name; input i goes to rank i % 2
CASES = ["ras", "truncated", "lps", "ras-2", "permuted", "oblique"]
#: a line of a case's outcome, as torchrun --tee prefixes it: (rank, input number, case)
CASE_LINE = re.compile(r"^\[default(\d)\]:.* \[(\d)/6\] (\S+?)(?::| failed)", re.MULTILINE)


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sharded")
    bundle = configure_bundle(BUNDLE, root / "bundle", SMALL)
    (bundle / "models").mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(create_network("seed_cnn3d", num_classes=2, spatial_size=(8, 8, 8)).state_dict(),
               bundle / "models" / "model.pt")  # fmt: skip
    paths = {}
    for name, (shape, aff) in GEOMETRIES.items():
        paths[name] = root / "in" / f"{name}.nii.gz"
        write_nifti(paths[name], nodule_scan(shape, aff), aff)
    shape, aff = GEOMETRIES["lps"]  # another scan (other bytes) under the name of the first
    paths["ras-2"] = root / "other" / "ras.nii.gz"
    write_nifti(paths["ras-2"], nodule_scan(shape, aff), aff)
    paths["truncated"] = root / "bad" / "truncated.nii.gz"
    paths["truncated"].parent.mkdir()
    paths["truncated"].write_bytes(paths["ras"].read_bytes()[: paths["ras"].stat().st_size // 2])
    inputs = [str(paths[case]) for case in CASES]
    command = ["infer", "--bundle", str(bundle)]

    one = root / "one"
    assert main([*command, "--out", str(one), *inputs]) == 1

    two, rc_dir = root / "two", root / "rc"
    rc_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VOLCNN_RANK_RC_DIR": str(rc_dir),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee=3",
         "-m", "tests.distributed.volcnn_rank", *command, "--out", str(two), *inputs],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    rank_rc = {p.name: int(p.read_text()) for p in rc_dir.glob("rank*")}
    return {"paths": paths, "inputs": inputs, "bundle": bundle, "one": one, "two": two, "done": done,
            "log": done.stdout + done.stderr, "rank_rc": rank_rc}  # fmt: skip


def test_every_case_is_run_once_by_its_rank(batch):
    """Each input's line (score, failure) comes from one rank only, rank ``i % 2`` for input ``i``: no case folder
    is written by two processes, and none is left out."""
    runs = [(int(rank), int(n), case) for rank, n, case in CASE_LINE.findall(batch["log"])]
    assert sorted((n, case) for _, n, case in runs) == list(enumerate(CASES, 1)), batch["log"][-4000:]
    assert all(rank == (n - 1) % 2 for rank, n, _ in runs), runs


def test_outputs_equal_one_process(batch):
    """summary.csv, failures.json, every findings.json and heat map: byte for byte what one process writes."""
    one, two = batch["one"], batch["two"]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "summary.csv").read_text() == (one / "summary.csv").read_text()
    assert (two / "failures.json").read_text() == (one / "failures.json").read_text()
    for case in CASES:
        if case == "truncated":
            assert not (two / case).exists()
            continue
        # findings.json holds no timing: the whole document must match
        assert json.loads((two / case / "findings.json").read_text()) == json.loads(
            (one / case / "findings.json").read_text()
        ), case
        assert (two / case / "heatmap.nii.gz").read_bytes() == (one / case / "heatmap.nii.gz").read_bytes(), case
    rows = (two / "summary.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == CASES  # input order, not rank order


def test_a_bad_input_is_listed_once_and_every_rank_exits_1(batch):
    failures = json.loads((batch["two"] / "failures.json").read_text())
    assert [f["input"] for f in failures] == [str(batch["paths"]["truncated"])]
    assert batch["done"].returncode == 1, batch["log"][-4000:]
    assert batch["rank_rc"] == {"rank0": 1, "rank1": 1}
    warned = re.findall(r"^\[default(\d)\]:.*1 of 6 inputs failed", batch["log"], re.MULTILINE)
    assert warned == ["0"]  # the batch's verdict, logged once


def test_case_name_clash_resolved_over_the_whole_list(batch):
    """Rank 1 never sees the first ``ras`` input, yet names its clash ``ras-2`` as one process does."""
    two = batch["two"]
    for case in ("ras", "ras-2"):
        doc = json.loads((two / case / "findings.json").read_text())
        assert doc["input_sha256"] == hashlib.sha256(batch["paths"][case].read_bytes()).hexdigest(), case
    assert re.search(r"^\[default1\]:.*case name ras is taken by an earlier input; writing this one as ras-2",
                     batch["log"], re.MULTILINE)  # fmt: skip


def test_one_process_rerun_skips_every_case_two_processes_finished(batch, tmp_path, caplog):
    out = tmp_path / "rerun"
    shutil.copytree(batch["two"], out)
    files = sorted(out.glob("*/*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.set_level(logging.INFO, logger="volcnn")
    assert main(["infer", "--bundle", str(batch["bundle"]), "--out", str(out), *batch["inputs"]]) == 1
    skipped = re.findall(r"\] (\S+): skipped \(done\)", caplog.text)
    assert skipped == [c for c in CASES if c != "truncated"]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert (out / "summary.csv").read_text() == (batch["one"] / "summary.csv").read_text()
