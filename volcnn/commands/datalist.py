"""``volcnn datalist``: build datalists from LUNA16 CSVs or a plain CSV, split by patient, and check them."""

from __future__ import annotations

import argparse
import json

from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError

NAME = "datalist"
HELP = "build datalists (LUNA16 CSVs, plain CSV) and check them"


def _add_split_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="datalist JSON to write")
    p.add_argument("--dataset-dir", default=None, help="folder the image paths are made relative to")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    p.add_argument(
        "--skip-missing", action="store_true", help="drop rows whose image is missing (listed) instead of failing"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="datalist_command", required=True, metavar="ACTION")
    q = sub.add_parser("from-luna16", help="LUNA16 candidates.csv (LPS mm) + scan folder -> datalist (RAS mm)")
    q.add_argument("--candidates", required=True, help="LUNA16 candidates CSV: seriesuid,coordX,coordY,coordZ,class")
    q.add_argument("--images", required=True, help="folder (with subset* subfolders) of <seriesuid>.mhd / .nii.gz")
    q.add_argument("--annotations", default=None, help="LUNA16 annotations CSV, adds diameter_mm to nodules")
    _add_split_options(q)
    q = sub.add_parser("from-csv", help="CSV image,label[,patient][,center_x,center_y,center_z] -> datalist")
    q.add_argument("csv", help="the CSV (centres in RAS mm)")
    q.add_argument(
        "--features",
        default=None,
        metavar="COL[:TYPE],...",
        help="extra columns taken as clinical features, e.g. age,sex:categorical,smoker:binary; TYPE is numeric, "
        "binary or categorical, inferred from the cells when omitted; an empty cell is a missing value",
    )
    _add_split_options(q)
    q = sub.add_parser(
        "check",
        help="every image loads, labels declared, centres inside, no patient in two splits, features typed",
    )
    q.add_argument("datalist", help="datalist JSON")
    q.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="base of relative paths")
    q.add_argument("--no-load", action="store_true", help="only check that images exist (faster, no centre check)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the datalist was written (or checks out), 1 when its content has problems (listed), 2 for a
    missing path, an invalid split fraction or an invalid --features."""
    from volcnn.io.datalist_check import check_datalist
    from volcnn.io.datalist_import import from_csv, from_luna16, parse_feature_columns
    from volcnn.io.datalist_split import check_fractions

    if args.datalist_command == "check":
        existing_file(args.datalist, "datalist")
        report = check_datalist(args.datalist, args.dataset_dir, load_images=not args.no_load, progress=True)
        print(report.format())
        return 0 if report.ok else 1
    try:
        check_fractions(args.val_fraction, args.test_fraction)
    except ValueError as e:
        raise UsageError(str(e)) from e
    split = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction, "seed": args.seed}
    if args.datalist_command == "from-luna16":
        existing_file(args.candidates, "candidates CSV")
        existing_dir(args.images, "image folder")
        if args.annotations is not None:
            existing_file(args.annotations, "annotations CSV")
        summary = from_luna16(
            args.candidates,
            args.images,
            args.out,
            annotations_csv=args.annotations,
            skip_missing=args.skip_missing,
            dataset_dir=args.dataset_dir,
            **split,
        )
    else:
        existing_file(args.csv, "CSV")
        if args.features is not None:
            try:
                parse_feature_columns(args.features)  # a bad option is a usage error (2), before reading the CSV
            except ValueError as e:
                raise UsageError(f"--features: {e}") from e
        summary = from_csv(
            args.csv,
            args.out,
            dataset_dir=args.dataset_dir,
            skip_missing=args.skip_missing,
            features=args.features,
            **split,
        )
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 1 if summary.get("problems") else 0
