"""sha256 of files and of inputs made of several files: one definition for every output that records a hash.

An input's hash (``source_sha256`` in ingest's ``manifest.json``, ``input_sha256`` in ``findings.json``) is
:func:`sha256_files` of the files the input is made of (:func:`volcnn.io.sources.input_files`): the file's own
sha256 for a single file, otherwise the sha256 of one ``name NUL sha256 LF`` line per file in name order. Hashing
names with per-file digests (rather than the bytes of all files joined) keeps two inputs apart whose files only
differ in where one ends and the next begins.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CHUNK_BYTES", "sha256_file", "sha256_files", "short_hash"]

#: bytes read at a time while hashing
CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in :data:`CHUNK_BYTES` blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: Iterable[str | os.PathLike[str]]) -> str:
    """Hex sha256 of an input made of ``files``: a single file's own sha256, else that of its name/hash lines.

    Raises:
        ValueError: for no files.
    """
    paths = sorted((Path(f) for f in files), key=lambda p: (p.name, str(p)))
    if not paths:
        raise ValueError("no files to hash")
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode("utf-8", "surrogateescape") + b"\0" + sha256_file(p).encode("ascii") + b"\n")
    return h.hexdigest()


def short_hash(text: str, digits: int = 12) -> str:
    """The first ``digits`` hex digits of the sha256 of ``text``: a stable name that does not expose ``text``
    (a DICOM UID, for example)."""
    return hashlib.sha256(str(text).encode("utf-8", "replace")).hexdigest()[:digits]
