#!/usr/bin/env python
"""Verify a MONAI bundle offline: an alias of ``volcnn verify-bundle`` (metadata schema, network I/O, export).

Usage:
    python tools/verify_bundle.py bundles/lung_nodule_ct_classification [--no-export] [-v]

Prints one line per check; exits 0 when all pass, 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from volcnn.cli import main as volcnn_main


def main(argv: Sequence[str] | None = None) -> int:
    """``volcnn verify-bundle ARGV`` (``-v`` / ``--verbose`` may stand anywhere); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in ("-v", "--verbose")]
    rest = [a for a in args if a not in ("-v", "--verbose")]
    return volcnn_main([*verbose[:1], "verify-bundle", *rest])


if __name__ == "__main__":
    sys.exit(main())
