"""Reading and writing volumes, datalists and outputs, with validation and atomic writes."""

from __future__ import annotations

from volcnn.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from volcnn.io.datalist import DatalistError, load_datalist, read_datalist_json
from volcnn.io.reader import LoadVolumed, VolcnnReader
from volcnn.io.volume import Volume, VolumeError, load_volume
from volcnn.io.writer import write_nifti

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "DatalistError",
    "load_datalist",
    "read_datalist_json",
    "LoadVolumed",
    "VolcnnReader",
    "Volume",
    "VolumeError",
    "load_volume",
    "write_nifti",
]
