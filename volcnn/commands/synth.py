"""``volcnn synth``: write a synthetic chest-CT cohort (NIfTI, optional DICOM, LUNA16-style CSVs, datalists)."""

from __future__ import annotations

import argparse
import json

from volcnn.core.errors import UsageError

NAME = "synth"
HELP = "write a synthetic chest-CT cohort (NIfTI, optional DICOM, CSVs, datalists)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=20, help="number of cases (one patient each)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    p.add_argument("--size", choices=["tiny", "small", "full"], default="small", help="tiny: tests; small: demo")
    p.add_argument("--dicom", action="store_true", help="also write each case as a DICOM series")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test")
    p.add_argument("--negatives", type=int, default=None, help="negative candidates per case (default: by size)")
    p.add_argument("--junctions", type=int, default=0, help="more negative candidates per case at vessel branch points")
    p.add_argument(
        "--juxtavascular",
        type=float,
        default=0.0,
        help="share of nodules placed against a pulmonary vessel that runs into them (0-1); other nodules, "
        "candidates and voxels stay as with 0",
    )
    p.add_argument(
        "--clinical",
        action="store_true",
        help="give patients clinical features (datalist_malignancy.json, clinical.csv) and draw nodule malignancy "
        "from a risk model over them and the nodules' visible traits; images unchanged",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from volcnn.data import synthesize_cohort

    try:
        summary = synthesize_cohort(
            args.out,
            cases=args.cases,
            seed=args.seed,
            size=args.size,
            dicom=args.dicom,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            progress=not args.no_progress,
            negatives=args.negatives,
            junctions=args.junctions,
            clinical=args.clinical,
            juxtavascular=args.juxtavascular,
        )
    except ValueError as e:  # an invalid setting
        raise UsageError(str(e)) from e
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
