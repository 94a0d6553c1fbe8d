"""``volcnn ingest``: validate scans and convert them to NIfTI with a manifest (DICOM series, NIfTI, MetaImage)."""

from __future__ import annotations

import argparse

NAME = "ingest"
HELP = "validate scans and convert them to NIfTI with a manifest (DICOM, NIfTI, .mhd)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders, walked for series and volumes")
    p.add_argument("--out", required=True, help="output folder: <name>.nii.gz, manifest.json, failures.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Exit 0 when every input was converted (or already was), 1 when some failed (listed), 2 when the output
    folder cannot be used (:class:`~volcnn.io.ingest.IngestError`)."""
    from volcnn.io.ingest import ingest

    result = ingest(args.sources, args.out, progress=not args.no_progress)
    n_done, n_skip, n_bad = len(result.converted), len(result.skipped), len(result.failures)
    print(f"converted {n_done}, skipped {n_skip} (already done), failed {n_bad}")
    for failure in result.failures:
        print(f"  FAILED {failure['error']}")
    print(
        f"manifest: {result.out_dir}/manifest.json"
        + (f"; failures: {result.out_dir}/failures.json" if result.failures else "")
    )
    return result.exit_code
