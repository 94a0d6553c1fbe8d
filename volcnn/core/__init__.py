"""What every stage of volcnn uses and nothing in volcnn is imported by: errors with exit codes, option parsing,
hashing, atomic writes, voxel/world geometry and the process's rank under torchrun. Modules here import only the
standard library, NumPy and torch.

Names are loaded on first use (``from volcnn.core import as_bool`` imports ``volcnn.core.options`` only), so that
the ``volcnn`` command can build its parser without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from volcnn.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
    from volcnn.core.errors import UsageError, VolcnnError
    from volcnn.core.geometry import as_affine, scale_affine, translate, voxel_to_world, world_to_voxel
    from volcnn.core.hashing import sha256_file, sha256_files, short_hash
    from volcnn.core.options import as_bool
    from volcnn.core.ranks import (
        is_rank0,
        launched_world_size,
        local_rank,
        process_rank,
        quiet_unless_rank0,
        world_size,
    )

_WHERE = {
    "atomic": ("atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"),
    "errors": ("UsageError", "VolcnnError"),
    "geometry": ("as_affine", "scale_affine", "translate", "voxel_to_world", "world_to_voxel"),
    "hashing": ("sha256_file", "sha256_files", "short_hash"),
    "options": ("as_bool",),
    "ranks": ("is_rank0", "launched_world_size", "local_rank", "process_rank", "quiet_unless_rank0", "world_size"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = [
    "UsageError",
    "VolcnnError",
    "as_affine",
    "as_bool",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "is_rank0",
    "launched_world_size",
    "local_rank",
    "process_rank",
    "quiet_unless_rank0",
    "scale_affine",
    "sha256_file",
    "sha256_files",
    "short_hash",
    "translate",
    "voxel_to_world",
    "world_size",
    "world_to_voxel",
]


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"volcnn.core.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'volcnn.core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
