"""Reading and writing volumes (validated: a reader returns the volume acquired or refuses, naming the file),
datalists, and ingest; what an input is (``sources``) and its hash (``input_hash``).

The atomic writers are :mod:`volcnn.core.atomic`'s, re-exported here for the code written against ``volcnn.io``."""

from __future__ import annotations

from volcnn.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from volcnn.io.datalist import DatalistError, load_datalist, read_datalist_json
from volcnn.io.input_hash import input_files, input_sha256
from volcnn.io.reader import LoadVolumed, PreloadedReader, VolcnnReader
from volcnn.io.sources import case_name
from volcnn.io.types import Volume, VolumeError
from volcnn.io.volume import load_volume
from volcnn.io.writer import write_nifti

__all__ = [
    "DatalistError",
    "LoadVolumed",
    "PreloadedReader",
    "VolcnnReader",
    "Volume",
    "VolumeError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "case_name",
    "input_files",
    "input_sha256",
    "load_datalist",
    "read_datalist_json",
    "load_volume",
    "write_nifti",
]
