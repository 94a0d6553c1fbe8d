"""``volcnn verify-bundle``: the offline checks of a MONAI bundle: metadata against the vendored, hash-pinned
schema, network input/output, TorchScript export (``tools/verify_bundle.py`` is an alias)."""

from __future__ import annotations

import argparse
import logging

from volcnn.commands._paths import existing_dir

NAME = "verify-bundle"
HELP = "check a bundle offline: metadata schema, network input/output, TorchScript export"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle_dir", metavar="BUNDLE", help="bundle root, holding configs/metadata.json")
    p.add_argument("--no-export", action="store_true", help="skip the TorchScript export check")
    p.add_argument("--net-id", default="network", help="config id of the instantiated network (default: network)")
    p.add_argument("--device", default="cpu", help="device for the network I/O check (default: cpu)")


def run(args: argparse.Namespace) -> int:
    """Print one line per check; exit 0 when all pass, 1 when one fails (or the vendored schema was modified),
    2 when ``BUNDLE`` has no ``configs/`` folder."""
    from volcnn.bundle import verify_bundle

    existing_dir(args.bundle_dir, "bundle folder")
    existing_dir(f"{args.bundle_dir}/configs", "bundle configs folder (not a bundle)")
    if not getattr(args, "verbose", False):  # MONAI's bundle scripts log every argument at INFO via their own handler
        logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)
    results = verify_bundle(args.bundle_dir, export=not args.no_export, net_id=args.net_id, device=args.device)
    for result in results:
        print(result)
    failed = [r.name for r in results if not r.ok]
    passed = sum(r.status == "pass" for r in results)
    print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped")
    return 1 if failed else 0
