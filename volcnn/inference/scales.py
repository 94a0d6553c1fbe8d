"""Multi-scale heat maps: the classifier run on the CT at its training voxel size and, besides, resampled to coarser
voxels, so that nodules larger than its window are seen whole.

A candidate classifier sees ``patch_size`` voxels at ``pixdim``: at the demo's 32^3 at 1 mm, a 25-30 mm nodule fills
the window with no lung around it, unlike anything it was trained on, and it scores it low. Resampled to ``s`` times
the voxel size the same window covers ``s`` times the field of view and the nodule looks ``s`` times smaller. Each scale
gets its own heat map and peaks; the peaks of all scales are merged by non-maximum suppression (:func:`merge_findings`:
the most probable of those closer than ``min_distance_mm`` is kept), each kept one is refined on its own scale's image
(:class:`~volcnn.inference.InferenceRunner`), and the heat map written is the voxelwise maximum of the scales' maps on
the finest grid.

Measured with ``python -m pipelines.bench_detection`` (30 CTs of cohort seeds 101 and 102, 56 nodules; the demo's
mined bundle, threshold 0.02; 2-core Xeon, one run; the two scales' findings of separate runs merged): scales
``[1.0]`` CPM 0.883, ``[1.0, 1.6]`` 0.901; the 1.6 scale found the four nodules of 23-30 mm at 0.82-1.0 that the 1 mm
scale scored 0.12-0.44, and added no false positive among the 25 most probable; it costs about a quarter of the 1 mm
scale's time (1.6^3 fewer windows). Alone, the 1.6 scale reached CPM 0.571: it is a complement, not a replacement.

The scales' outputs are combined as they are: the probability calibration fitted on the training scale's windows is
applied to every scale's findings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from volcnn.transforms.resample import resample_to_grid

__all__ = ["check_scales", "fuse_heatmaps", "merge_findings", "scaled_pixdim"]


def check_scales(scales: Sequence[float] | float | None) -> tuple[float, ...]:
    """``scales`` as floats: voxel-size factors, the first 1 (the training scale), then strictly increasing.

    Raises:
        ValueError: empty, not numbers, not finite, a first factor other than 1, or not increasing.
    """
    if scales is None:
        return (1.0,)
    raw = [scales] if isinstance(scales, int | float) else list(scales)
    try:
        values = tuple(float(s) for s in raw)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be numbers, got {scales!r}") from None
    if not values or not all(math.isfinite(s) for s in values):
        raise ValueError(f"scales must be a non-empty list of finite numbers, got {scales!r}")
    if values[0] != 1.0 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"scales must start at 1.0 (the training voxel size) and increase, got {list(values)}")
    return values


def scaled_pixdim(pixdim: Sequence[float], scale: float) -> tuple[float, ...]:
    """The voxel size ``pixdim`` times ``scale``, in mm."""
    return tuple(float(p) * float(scale) for p in pixdim)


def fuse_heatmaps(maps: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Voxelwise maximum of heat maps ``[(heat (X, Y, Z), affine (4, 4)), ...]`` on the grid of the first.

    The others are resampled onto it trilinearly (:func:`~volcnn.transforms.resample.resample_to_grid`, clamped at
    their border). Returns float32 on the first map's grid.
    """
    first, affine = maps[0]
    fused = np.asarray(first, dtype=np.float32).copy()
    for heat, heat_affine in maps[1:]:
        on_grid = resample_to_grid(np.asarray(heat, dtype=np.float32), heat_affine, fused.shape, affine)
        np.maximum(fused, on_grid.astype(np.float32, copy=False), out=fused)
    return fused


def merge_findings(
    groups: Sequence[list[dict[str, Any]]], min_distance_mm: float, max_findings: int
) -> list[dict[str, Any]]:
    """The findings of several scales as one list: most probable first, a finding dropped when a more probable one
    lies closer than ``min_distance_mm`` or within that one's estimated radius (``diameter_mm / 2``, as
    :func:`~volcnn.inference.find_peaks` suppresses with ``nms="size"``); at most ``max_findings``.

    Ties keep the earlier group's finding (the finer scale, when groups are in scale order).
    """
    ordered = sorted(
        ((f, g, i) for g, group in enumerate(groups) for i, f in enumerate(group)),
        key=lambda t: (-float(t[0]["probability"]), t[1], t[2]),
    )
    kept: list[dict[str, Any]] = []
    reach: list[float] = []
    for f, _, _ in ordered:
        if len(kept) >= max_findings:
            break
        if any(math.dist(f["center_ras_mm"], k["center_ras_mm"]) < r for k, r in zip(kept, reach, strict=True)):
            continue
        kept.append(f)
        reach.append(max(float(min_distance_mm), 0.5 * float(f.get("diameter_mm") or 0.0)))
    return kept
