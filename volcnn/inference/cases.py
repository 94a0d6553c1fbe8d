"""Case names of a batch: the folder each input's outputs go to, decided over the whole input list.

Two inputs with the same file or folder name (``a/scan.nii.gz``, ``b/scan.nii.gz``) must not share a folder; the
later one gets ``-2``, ``-3``... The names are a function of the whole list, never of the inputs one process
happens to run, so that a batch split over the ranks of a torchrun job (:mod:`volcnn.inference.sharding`) writes
the same folders as one process, and a re-run with another number of processes finds them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from volcnn.io.sources import case_name

__all__ = ["case_names"]


def case_names(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The case name of each input, in order: :func:`~volcnn.io.sources.case_name`, with ``-K`` appended (K = 2,
    3, ...) when an earlier input of the list already has that name."""
    used: set[str] = set()
    names: list[str] = []
    for path in inputs:
        name = case_name(path)
        out, i = name, 1
        while out in used:
            i += 1
            out = f"{name}-{i}"
        used.add(out)
        names.append(out)
    return names
