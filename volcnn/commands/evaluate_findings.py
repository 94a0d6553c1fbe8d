"""``volcnn evaluate-findings``: FROC and CPM (LUNA16 style) of ``volcnn infer`` findings against annotations."""

from __future__ import annotations

import argparse

from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError, VolcnnError

NAME = "evaluate-findings"
HELP = "FROC and CPM (LUNA16 style) of 'volcnn infer' findings against annotations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("findings_dir", metavar="FINDINGS_DIR", help="'volcnn infer' output: <case>/findings.json")
    p.add_argument(
        "--annotations",
        required=True,
        metavar="CSV",
        help="nodules: LUNA16 annotations.csv (seriesuid,coordX,coordY,coordZ,diameter_mm; LPS) or nodules.csv (RAS)",
    )
    p.add_argument("--excluded", default=None, metavar="CSV", help="irrelevant annotations (findings ignored)")
    p.add_argument(
        "--coords",
        choices=("auto", "lps", "ras"),
        default="auto",
        help="coordinate convention of the CSVs (auto: from the header)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="where froc.json and froc.png go (FINDINGS_DIR)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for 95%% CIs")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when evaluated; 1 for unusable inputs (the message names the file and the problem); 2 for bad usage
    (a path that does not exist, a negative ``--bootstrap``, outputs that cannot be written)."""
    from volcnn.evaluation.findings import evaluate_findings, format_table

    existing_dir(args.findings_dir, "findings folder")
    existing_file(args.annotations, "annotations CSV")
    if args.excluded is not None:
        existing_file(args.excluded, "excluded-annotations CSV")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    out = args.out if args.out is not None else args.findings_dir
    try:
        result = evaluate_findings(
            args.findings_dir,
            args.annotations,
            coords=args.coords,
            excluded=args.excluded,
            out_dir=out,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )
    except ValueError as e:
        raise VolcnnError(str(e)) from e
    except OSError as e:
        raise UsageError(f"{out}: cannot write the outputs ({e})") from e
    print(format_table(result))
    print(f"wrote {result['outputs']['json']} and {result['outputs']['png']}")
    return 0
