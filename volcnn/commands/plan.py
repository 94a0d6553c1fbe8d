"""``volcnn plan``: a dataset fingerprint and the training settings that follow from it
(:mod:`volcnn.planning`), written as ``train.json`` overrides for ``--args_file``."""

from __future__ import annotations

import argparse
import json

from volcnn.commands._paths import existing_dir, existing_file

NAME = "plan"
HELP = "fingerprint a datalist's images and plan the training settings (plan.json for --args_file)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datalist", metavar="DATALIST", help="the datalist JSON (training/validation/test)")
    p.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, metavar="D",
                   help="folder the image paths are relative to (default: the datalist's folder)")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="PLAN_JSON", help="plan.json to write (fingerprint and report beside)"
    )
    p.add_argument(
        "--annotations", default=None, metavar="CSV", help="nodule annotations (annotations.csv / nodules.csv): sizes"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device the plan sizes batches for")
    p.add_argument("--max-volumes", type=int, default=50, help="images read for the fingerprint at most (default 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Print the plan's table; exit 0 when it was written, 1 when the dataset cannot be planned for (a clear reason,
    nothing written), 2 for a missing datalist or folder."""
    from volcnn.planning import fingerprint_dataset, plan_settings, write_plan

    existing_file(args.datalist, "datalist")
    if args.dataset_dir is not None:
        existing_dir(args.dataset_dir, "dataset folder")
    if args.annotations is not None:
        existing_file(args.annotations, "annotations CSV")
    fingerprint = fingerprint_dataset(
        args.datalist, args.dataset_dir, max_volumes=args.max_volumes, progress=not args.no_progress,
        annotations=args.annotations,
    )  # fmt: skip
    settings, reasons = plan_settings(fingerprint, args.device)
    paths = write_plan(args.out, settings, reasons, fingerprint)
    for key, value in settings.items():
        print(f"{key:16s} {json.dumps(value):22s} {reasons[key]}")
    for failure in fingerprint["failed"]:
        print(f"not used: {failure['image']}: {failure['reason']}")
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
