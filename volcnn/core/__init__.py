"""What every stage of volcnn uses and nothing in volcnn is imported by: errors with exit codes, option parsing,
hashing, atomic writes and voxel/world geometry. Modules here import only the standard library, NumPy and torch."""

from __future__ import annotations

from volcnn.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from volcnn.core.errors import UsageError, VolcnnError
from volcnn.core.geometry import as_affine, scale_affine, translate, voxel_to_world, world_to_voxel
from volcnn.core.hashing import sha256_file, sha256_files, short_hash
from volcnn.core.options import as_bool

__all__ = [
    "UsageError",
    "VolcnnError",
    "as_affine",
    "as_bool",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "scale_affine",
    "sha256_file",
    "sha256_files",
    "short_hash",
    "translate",
    "voxel_to_world",
    "world_to_voxel",
]
