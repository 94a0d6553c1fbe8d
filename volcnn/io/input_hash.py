"""The files an input is made of, and its sha256: one definition for ingest's manifest and inference's findings.

An input is a volume file (a ``.mhd`` header with its data file), or a folder holding one DICOM series. Its hash
(:func:`input_sha256`) is :func:`volcnn.core.hashing.sha256_files` of :func:`input_files`, so the same scan gets
the same ``source_sha256`` in ``manifest.json`` and ``input_sha256`` in ``findings.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from volcnn.core.hashing import sha256_files
from volcnn.io.dicom import discover_series
from volcnn.io.sources import looks_like_dicom, metaimage_data_file
from volcnn.io.types import VolumeError

__all__ = ["input_files", "input_sha256"]


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files whose bytes make up the input at ``path``.

    A file: itself, plus the data file a ``.mhd`` header names. A folder: the files of its DICOM series when it
    holds exactly one (read by headers, as the reader groups them), else every file the DICOM reader would look
    at (the reader then refuses the folder, naming its series).

    Raises:
        VolumeError: a DICOM-looking file in the folder cannot be parsed.
    """
    p = Path(path)
    if not p.is_dir():
        data = metaimage_data_file(p)
        return [p] if data is None else [p, data]
    series = discover_series(p)
    if len(series) == 1:
        return list(series[0].files)
    return sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".") and looks_like_dicom(q))


def input_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of an input (see the module docstring).

    Raises:
        VolumeError: a folder without DICOM files, or a DICOM-looking file that cannot be parsed.
    """
    files = input_files(path)
    if not files:
        raise VolumeError(path, "no DICOM series found in this folder")
    return sha256_files(files)
