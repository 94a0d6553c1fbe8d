"""What the pipeline scripts share: the repository root and fresh child interpreters that run a sibling module."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["REPO", "child_env", "module_command"]

#: the repository root (the folder holding ``pipelines/`` and ``volcnn/``)
REPO = Path(__file__).resolve().parents[1]


def module_command(module: str, *args: str) -> list[str]:
    """``python -m pipelines.<module> *args`` with this interpreter (``module`` e.g. ``"bench_train"``)."""
    return [sys.executable, "-m", f"pipelines.{module}", *args]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment (plus ``extra``) with the repository root first on ``PYTHONPATH``.

    A child started by :func:`module_command` then imports ``pipelines`` and ``volcnn`` from this checkout whatever
    its working directory.
    """
    env = {**os.environ, **(extra or {})}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    return env
