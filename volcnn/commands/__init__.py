"""The ``volcnn`` command's subcommands, one module each, nnU-Net style: a module holds its subcommand's argument
parser (``add_arguments``) beside the code that runs it (``run``), and imports the library it calls only when it
runs, so that ``volcnn --help`` stays fast.

Every module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code). ``run`` raises :class:`~volcnn.core.errors.VolcnnError` (exit 1) or
:class:`~volcnn.core.errors.UsageError` (exit 2) for a problem it reports as one message; :func:`volcnn.cli.main`
maps them to exit codes in one place.
"""

from __future__ import annotations

from volcnn.commands import (
    compare,
    crossval,
    datalist,
    evaluate_findings,
    export,
    infer,
    ingest,
    mine,
    networks,
    package,
    plan,
    synth,
    verify_bundle,
)

__all__ = ["COMMANDS"]

#: the subcommand modules, in the order ``volcnn --help`` lists them
COMMANDS = (
    synth,
    ingest,
    datalist,
    plan,
    crossval,
    mine,
    infer,
    evaluate_findings,
    compare,
    package,
    export,
    verify_bundle,
    networks,
)
