"""Checks of paths given on the command line: a missing one is bad usage (exit 2), named in the message."""

from __future__ import annotations

import os
from pathlib import Path

from volcnn.core.errors import UsageError

__all__ = ["existing_dir", "existing_file"]


def existing_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path when it is a file; :class:`UsageError` naming it and ``what`` it should be otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: {what} not found")
    return p


def existing_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path when it is a folder; :class:`UsageError` naming it and ``what`` it should be otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p}: {what} not found")
    return p
