"""``volcnn compare``: classification runs side by side on the same samples: ROC curves, each run's AUC with its
bootstrap CI, and the paired bootstrap CI of every AUC difference (:mod:`volcnn.evaluation.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from volcnn.commands._paths import existing_file
from volcnn.core.errors import UsageError, VolcnnError

NAME = "compare"
HELP = "compare runs' predictions.csv on the same samples: ROC curves, AUC CIs, paired bootstrap CIs of differences"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="NAME=PRED_CSV",
        help="a run's name and its evaluation's predictions.csv (binary), at least two, e.g. image=img/predictions.csv",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where comparison.json/.md/.html and roc_comparison.png go"
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="NAME",
        help="compare every other run with this one (run - reference); default: every pair (later - earlier)",
    )
    p.add_argument("--n-boot", "--n_boot", dest="n_boot", type=int, default=2000, metavar="N",
                   help="bootstrap replicates (default 2000)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--group-by", "--group_by", dest="group_by", default="case", metavar="COLUMN",
        help="resample whole groups of rows sharing this column, when the files have it (default: case)",
    )  # fmt: skip
    group.add_argument(
        "--no-group", "--no_group", dest="no_group", action="store_true",
        help="resample rows (stratified by label), even when the files have the group column",
    )  # fmt: skip


def _parse_runs(items: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UsageError(f"{item!r}: a run is NAME=PRED_CSV (e.g. fusion=eval_fusion/predictions.csv)")
        if name in runs:
            raise UsageError(f"run name {name!r} is given twice")
        runs[name] = existing_file(path, f"predictions CSV of run {name!r}")
    return runs


def run(args: argparse.Namespace) -> int:
    """Print the tables; exit 0 when compared; 1 for unusable predictions (unreadable or malformed, or runs that did
    not score the same samples: the message names the files and the first differing row); 2 for bad usage (fewer
    than two runs, a malformed NAME=PRED_CSV, a missing file, an unknown --reference, a bad --n-boot or --level,
    outputs that cannot be written)."""
    from volcnn.evaluation.compare import format_comparison, write_comparison

    runs = _parse_runs(args.runs)
    if len(runs) < 2:
        raise UsageError(f"compare needs at least two runs (NAME=PRED_CSV), got {len(runs)}")
    if args.reference is not None and args.reference not in runs:
        raise UsageError(f"--reference {args.reference!r} is not one of the runs: {', '.join(runs)}")
    if args.n_boot < 1:
        raise UsageError(f"--n-boot must be >= 1, got {args.n_boot}")
    if not 0 < args.level < 1:
        raise UsageError(f"--level must be in (0, 1), got {args.level}")
    try:
        result = write_comparison(
            args.out,
            runs,
            n_boot=args.n_boot,
            seed=args.seed,
            level=args.level,
            reference=args.reference,
            group_by=None if args.no_group else args.group_by,
        )
    except VolcnnError:
        raise
    except ValueError as e:
        raise VolcnnError(str(e)) from e
    except OSError as e:
        raise UsageError(f"{args.out}: cannot write the outputs ({e})") from e
    print(result["bootstrap"]["description"])
    print(format_comparison(result))
    out = Path(args.out)
    print("wrote " + ", ".join(str(out / name) for name in result["files"].values()))
    return 0
