"""``volcnn package``: a training run made into a bundle that infers as it was trained: the settings the run
recorded (``RUN_DIR/run.json``) in a copy of the bundle's configs and metadata, the run's best weights, the offline
check. A ``volcnn crossval`` folder becomes one bundle holding its k models, whose probabilities it averages."""

from __future__ import annotations

import argparse
import json
import logging

from volcnn.core.errors import UsageError

NAME = "package"
HELP = "make a training run (or a crossval folder: an ensemble) into a checked bundle (settings from run.json)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a training run's output_dir (run.json, models/model.pt) or a crossval folder",
    )
    p.add_argument(
        "--out", required=True, metavar="BUNDLE", help="the bundle folder to write (an earlier one is replaced)"
    )
    p.add_argument(
        "--bundle",
        default=None,
        metavar="SRC",
        help="the bundle to copy (default: the bundle_root the run recorded in run.json)",
    )


def run(args: argparse.Namespace) -> int:
    """Print what was written and the checks; exit 0 when the bundle was written, 1 when a check failed or run.json
    cannot be used (nothing is written), 2 for a missing RUN_DIR, run.json, weights or source bundle, or an
    output folder that cannot be used."""
    from pathlib import Path

    from volcnn.bundle import package_crossval, package_run

    if not getattr(args, "verbose", False):  # MONAI's bundle scripts log every argument at INFO via their own handler
        logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)
    try:
        package = package_crossval if (Path(args.run_dir) / "folds.json").is_file() else package_run
        result = package(args.run_dir, args.out, src=args.bundle)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    print(f"{'replaced' if result.replaced else 'wrote'} bundle {result.bundle} (version {result.version})")
    print(f"  from run {result.run_dir} and bundle {result.source}")
    settings = ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in result.settings.items())
    print(f"  settings ({result.mode} mode): {settings}")
    for name in result.files:
        print(f"  {result.bundle / name}")
    for check in result.checks:
        print(f"  {check}")
    return 0
