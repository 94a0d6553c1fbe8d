"""The ``volcnn`` command: one front door for every subcommand (:mod:`volcnn.commands`).

It builds the parser from the subcommand modules, sets up logging, runs the chosen subcommand and maps its errors
to exit codes in one place:

* 0: all good;
* 1: some inputs failed (the rest were processed, failures listed), or an input could not be used
  (:class:`~volcnn.core.errors.VolcnnError`, and any unexpected error, reported in one line; ``-v`` shows the
  traceback);
* 2: bad usage: argparse's errors and :class:`~volcnn.core.errors.UsageError` (a missing path, an invalid option,
  an unusable bundle or output folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from volcnn import __version__
from volcnn.commands import COMMANDS
from volcnn.core.errors import EXIT_FAILED, VolcnnError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("volcnn")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``volcnn`` and its subcommands.

    Abbreviated options are refused (``allow_abbrev=False``): a command that takes bundle overrides would otherwise
    read ``--margin 6`` (the bundle's patch margin) as its own ``--margin-mm 6``, silently, as ``volcnn mine`` did.
    """
    parser = argparse.ArgumentParser(
        prog="volcnn", description="3D CT classification with MONAI: data, inference.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"volcnn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP, allow_abbrev=False)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volcnn`` console script; returns the exit code (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        command = next(c for c in COMMANDS if args.command == c.NAME)
        if not getattr(command, "ACCEPTS_OVERRIDES", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except VolcnnError as e:
        logger.error("%s", e)
        logger.debug("traceback", exc_info=True)
        return e.exit_code
    except Exception as e:  # a failure the library did not foresee: one line, the traceback with -v
        logger.error("volcnn %s failed: %s: %s", args.command, type(e).__name__, e, exc_info=args.verbose)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
