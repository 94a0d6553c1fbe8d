"""The checks every volume passes before a reader returns it: 3D, a usable affine, finite values, HU-like values.

:func:`check_volume` refuses what cannot be right (a single slice, a degenerate affine, NaN/Inf unless asked to
replace them) with :class:`~volcnn.io.types.VolumeError`, and records what only looks wrong (values that are not
HU) in :attr:`Volume.warnings <volcnn.io.types.Volume.warnings>`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from volcnn.io.types import Volume, VolumeError

__all__ = ["CHECK_CHUNK_BYTES", "NAN_FILL_HU", "NAN_POLICIES", "check_volume"]

logger = logging.getLogger(__name__)

#: what :func:`load_volume` does with NaN/Inf voxels
NAN_POLICIES = ("refuse", "replace")
#: fill value for NaN/Inf voxels when a volume has no finite voxel at all
NAN_FILL_HU = -1024.0
#: bytes per numerical check chunk in :func:`check_volume`
CHECK_CHUNK_BYTES = 1 << 22


def check_volume(vol: Volume, nan_policy: str = "refuse", expect_hu: bool = True) -> None:
    """Refuse a non-3D volume or a degenerate affine; refuse or replace NaN/Inf; warn on non-HU values.

    ``expect_hu=False`` (a model whose intensity setting is not ``hu``, or ``volcnn plan``, which gives its own
    verdict on the whole cohort) leaves out the warnings about values that do not look like HU: a cohort of
    8-bit images would otherwise log one per image, at every load.

    The value checks read ``vol.array`` ``(X, Y, Z)`` in chunks of :data:`CHECK_CHUNK_BYTES` along ``X``, with no
    full-size temporary: the minimum and maximum (NaN propagates into both, and +-Inf shows in one) decide
    whether any voxel is non-finite, and only then are the non-finite voxels counted.
    """
    if vol.array.ndim != 3 or min(vol.array.shape) < 2:
        raise VolumeError(vol.path, f"expected a 3D volume, got shape {vol.array.shape} (a single slice?)")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise VolumeError(vol.path, "degenerate or non-finite affine (voxel-to-world geometry)")
    lo, hi = _min_max(vol.array)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = sum(int(c.size - np.count_nonzero(np.isfinite(c))) for c in _chunks(vol.array))
        if nan_policy != "replace":
            raise VolumeError(vol.path, f"{bad} NaN/Inf voxels (load with nan_policy='replace' to replace them)")
        finite_mins = [float(c[f].min()) for c in _chunks(vol.array) if (f := np.isfinite(c)).any()]
        fill = min(finite_mins) if finite_mins else NAN_FILL_HU
        for c in _chunks(vol.array):
            c[~np.isfinite(c)] = fill
        vol.warnings.append(f"replaced {bad} NaN/Inf voxels with {fill:g}")
        lo, hi = _min_max(vol.array)
    if expect_hu:
        vol.warnings.extend(_hu_warnings(vol.array, lo, hi))
    for w in vol.warnings:
        logger.warning("%s: %s", vol.path, w)


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``array`` along its first axis, about :data:`CHECK_CHUNK_BYTES` each (contiguous for C order)."""
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, CHECK_CHUNK_BYTES // row_bytes)
    for i in range(0, array.shape[0], step):
        yield array[i : i + step]


def _min_max(array: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a non-empty array in one pass over memory (each chunk is reduced twice while in cache).

    NaN anywhere makes both NaN, as ``np.min``/``np.max`` do.
    """
    lows, highs = zip(*((c.min(), c.max()) for c in _chunks(array)), strict=True)
    return float(np.min(lows)), float(np.max(highs))


def _hu_warnings(array: np.ndarray, lo: float, hi: float) -> list[str]:
    """Warnings for values that do not look like CT in Hounsfield units (air is near -1000 HU).

    Args:
        array: the finite voxel values ``(X, Y, Z)``.
        lo, hi: their minimum and maximum.
    """
    if lo < 0:
        return []
    if hi < 100:
        return [f"values lie in [{lo:g}, {hi:g}]: looks like a mask or probability map, not CT in HU"]
    if hi <= 255 and all(bool(np.all(np.mod(c, 1) == 0)) for c in _chunks(array)):
        return [f"integer values in [{lo:g}, {hi:g}]: looks like an 8-bit image or label map, not CT in HU"]
    return [
        f"no negative values (range [{lo:g}, {hi:g}]): CT in HU has air near -1000; MR, or stored values "
        "without RescaleIntercept?"
    ]
