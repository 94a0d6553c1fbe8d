"""The ``volcnn`` command. It only parses arguments and calls library functions.

Exit codes: 0 all good; 1 some inputs failed (the rest were processed, failures listed); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from volcnn import __version__

__all__ = ["main", "build_parser"]

logger = logging.getLogger("volcnn")


def _cmd_synth(args: argparse.Namespace) -> int:
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
        )
    except ValueError as e:
        logger.error("%s", e)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from volcnn.inference import infer_main

    overrides = {k: v for k, v in {"device": args.device, "stride_mm": args.stride_mm}.items() if v is not None}
    return infer_main(args.bundle, args.out, args.inputs, **overrides)


def _cmd_networks(args: argparse.Namespace) -> int:
    from volcnn.networks import list_networks

    print("\n".join(list_networks()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``volcnn`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="volcnn", description="3D CT classification with MONAI: data, inference.")
    parser.add_argument("--version", action="version", version=f"volcnn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic chest-CT cohort (NIfTI, optional DICOM, CSVs, datalists)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=20, help="number of cases (one patient each)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    p.add_argument("--size", choices=["tiny", "small", "full"], default="small", help="tiny: tests; small: demo")
    p.add_argument("--dicom", action="store_true", help="also write each case as a DICOM series")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients in validation")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in test")
    p.add_argument("--negatives", type=int, default=None, help="negative candidates per case (default: by size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("infer", help="heat map, findings and score for whole volumes with a trained bundle")
    p.add_argument("--bundle", required=True, help="bundle folder with configs/ and models/model.pt")
    p.add_argument("--out", required=True, help="output folder: OUT/<case>/heatmap.nii.gz, findings.json, summary.csv")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--stride-mm", type=float, default=None, help="heat-map stride in mm (default: the bundle's)")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) files, or DICOM series folders",
    )
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser("networks", help="list the registered network names (for network_def)")
    p.set_defaults(func=_cmd_networks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volcnn`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
