#!/usr/bin/env python
"""Verify a MONAI bundle offline: metadata schema (vendored, hash-pinned), network I/O, TorchScript export.

Usage:
    python tools/verify_bundle.py bundles/lung_nodule_ct_classification [--no-export]

Prints one line per check; exits 0 when all pass, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from volcnn.bundle import SchemaIntegrityError, verify_bundle


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run :func:`volcnn.bundle.verify_bundle` and return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle_dir", type=Path, help="bundle root, holding configs/metadata.json")
    parser.add_argument("--no-export", action="store_true", help="skip the TorchScript export check")
    parser.add_argument("--net-id", default="network", help="config id of the instantiated network (default: network)")
    parser.add_argument("--device", default="cpu", help="device for the network I/O check (default: cpu)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show MONAI's log and failure tracebacks")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:  # MONAI's bundle scripts log every argument at INFO through their own handler
        logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)
    if not (args.bundle_dir / "configs").is_dir():
        parser.error(f"{args.bundle_dir} is not a bundle: no configs/ folder")
    try:
        results = verify_bundle(args.bundle_dir, export=not args.no_export, net_id=args.net_id, device=args.device)
    except SchemaIntegrityError as err:
        print(f"FAIL schema: {err}")
        return 1
    for result in results:
        print(result)
    failed = [r.name for r in results if not r.ok]
    passed = sum(r.status == "pass" for r in results)
    print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
