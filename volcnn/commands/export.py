"""``volcnn export``: a trained bundle's network to TorchScript (``models/model.ts``) and ONNX (``models/model.onnx``),
each checked against the eager network before it replaces the previous file."""

from __future__ import annotations

import argparse

from volcnn.commands._paths import existing_dir, existing_file
from volcnn.core.errors import UsageError, VolcnnError

NAME = "export"
HELP = "export a trained bundle to TorchScript (models/model.ts) and ONNX (models/model.onnx)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder with models/model.pt")
    p.add_argument("--formats", default="ts,onnx", help="comma-separated: ts, onnx (default: both)")
    p.add_argument("--ckpt", default=None, help="weights to export (default: BUNDLE/models/model.pt)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every format was written; 1 when an export failed its check against the eager network (the
    previous file is kept); 2 for a missing bundle or weights, weights that do not fit the bundle's network (the
    message names both), or an unknown format."""
    from volcnn.bundle import EXPORT_FORMATS, export_bundle
    from volcnn.models import WeightsMismatchError

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise UsageError(f"unknown export format(s) {unknown or [args.formats]}; choose from {sorted(EXPORT_FORMATS)}")
    existing_dir(args.bundle, "bundle folder")
    if args.ckpt is not None:
        existing_file(args.ckpt, "checkpoint")
    try:
        written = export_bundle(args.bundle, formats=formats, ckpt=args.ckpt)
    except (FileNotFoundError, WeightsMismatchError) as e:  # an unusable bundle; the message names the files
        raise UsageError(str(e)) from e
    except ValueError as e:  # the exported file disagrees with the eager network
        raise VolcnnError(str(e)) from e
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0
