"""Whole-CT detection on synthetic CTs a bundle never saw: FROC / CPM over many scans, not the demo's 8.

The demo's 8 unseen CTs hold about 11 nodules, so one nodule moves its CPM by about 0.1: too few to tell progress
from noise. This benchmark synthesises cohorts with other seeds (the demo uses seed 0), runs ``volcnn infer`` with
the bundle over every CT of them, and scores the findings with ``volcnn evaluate-findings`` against the planted
nodules, reporting the CPM, the sensitivity at 1/8 to 8 false positives per scan, the false positives per scan at
the bundle's operating threshold, and the per-scan AUC of the volume score (has a nodule or not).

    python -m pipelines.bench_detection --bundle demo_out/bundle --seeds 101,102 --cases 15 --out detection.json

Prints a table and writes the JSON (atomically); the cohorts and inference outputs go under ``--work``
(a temporary folder by default). Cases synthesised once per (seed, cases) are reused when ``--work`` is kept.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from volcnn.core.atomic import atomic_write_json
from volcnn.data import synthesize_cohort
from volcnn.evaluation.findings import evaluate_findings

__all__ = ["main", "run"]


def _cohort(work: Path, seed: int, cases: int, juxtavascular: float = 0.0) -> tuple[list[Path], Path]:
    """The CTs and the ``nodules.csv`` of a synthetic cohort of ``cases`` small CTs (made once per folder)."""
    folder = work / (f"cohort_seed{seed}_n{cases}" + (f"_jv{juxtavascular:g}" if juxtavascular else ""))
    if not (folder / "nodules.csv").is_file():
        synthesize_cohort(folder, cases=cases, seed=seed, size="small", progress=False, juxtavascular=juxtavascular)
    return sorted((folder / "images").glob("*.nii.gz")), folder / "nodules.csv"


def _merged_annotations(csvs: list[Path], prefixes: list[str], out: Path) -> Path:
    """One ``nodules.csv`` over several cohorts, case names prefixed by their cohort (as the inputs are)."""
    rows: list[dict[str, str]] = []
    fields: list[str] = []
    for path, prefix in zip(csvs, prefixes, strict=True):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or fields)
            rows += [{**r, "case": f"{prefix}{r['case']}"} for r in reader]
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def run(
    bundle: Path,
    seeds: list[int],
    cases: int,
    work: Path,
    extra: list[str] | None = None,
    cohorts: Path | None = None,
    juxtavascular: float = 0.0,
) -> dict[str, Any]:
    """Infer every CT of the cohorts with ``bundle`` and score the findings; returns the result dict.

    Args:
        bundle: the trained bundle.
        seeds: cohort seeds; ``cases`` CTs each.
        work: folder of the inference outputs (and of the cohorts unless ``cohorts`` is given).
        extra: further ``volcnn infer`` arguments (``--tta``...).
        cohorts: folder the cohorts are made in once and reused from.
        juxtavascular: share of the cohorts' nodules placed against a vessel (``volcnn synth --juxtavascular``).
    """
    inputs: list[Path] = []
    csvs, prefixes = [], []
    for seed in seeds:
        images, nodules = _cohort(cohorts or work, seed, cases, juxtavascular)
        prefix = f"s{seed}_"
        links = work / "inputs"
        links.mkdir(parents=True, exist_ok=True)
        for image in images:  # case names unique across cohorts: s101_case_003
            link = links / f"{prefix}{image.name}"
            if not link.exists():
                link.symlink_to(image.resolve())
            inputs.append(link)
        csvs.append(nodules)
        prefixes.append(prefix)
    annotations = _merged_annotations(csvs, prefixes, work / "nodules.csv")
    out = work / "infer"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "volcnn", "infer", "--bundle", str(bundle), "--out", str(out), *(extra or [])]
    done = subprocess.run([*cmd, *map(str, inputs)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(f"volcnn infer failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = evaluate_findings(out, annotations, out_dir=out)
    return {
        "bundle": str(bundle),
        "seeds": seeds,
        "cases_per_seed": cases,
        "juxtavascular": juxtavascular,
        "num_scans": result["num_scans"],
        "num_nodules": result["num_nodules"],
        "cpm": result["cpm"],
        "sensitivities": result["sensitivities"],
        "per_scan": result.get("per_scan"),
        "operating_point": result.get("operating_point"),
        "infer_seconds": round(seconds, 1),
        "infer_args": extra or [],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a trained bundle (models/model.pt)")
    parser.add_argument("--seeds", default="101,102", help="cohort seeds, comma-separated (the demo uses 0)")
    parser.add_argument("--cases", type=int, default=15, help="CTs per cohort seed")
    parser.add_argument("--work", type=Path, default=None, help="folder for cohorts and outputs (default: temporary)")
    parser.add_argument("--cohorts", type=Path, default=None, help="folder to make / reuse the cohorts in")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    parser.add_argument(
        "--juxtavascular", type=float, default=0.0, help="share of nodules placed against a vessel in the cohorts"
    )
    args, extra = parser.parse_known_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="volcnn-detection-") as tmp:
        work = args.work or Path(tmp)
        result = run(args.bundle.resolve(), seeds, args.cases, work, extra, args.cohorts, args.juxtavascular)
    print(f"{result['num_scans']} scans, {result['num_nodules']} nodules: CPM {result['cpm']:.3f}")
    for rate, sens in result["sensitivities"].items():
        print(f"  {rate:>6} FP/scan  sensitivity {sens:.3f}")
    op = result["operating_point"]
    if op:
        print(f"  at the operating threshold {op['threshold']}: {op['fps_per_scan']:.2f} FP/scan, sensitivity "
              f"{op['sensitivity']:.3f}")  # fmt: skip
    if result.get("per_scan"):
        print(f"  per-scan AUC of the volume score: {result['per_scan'].get('auc')}")
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
