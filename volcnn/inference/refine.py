"""Findings moved onto the classifier's response: a coarse-to-fine search around each heat-map peak.

The heat map samples the classifier on a grid (4 mm by default), and a finding starts at its peak's half-maximum
centroid on that grid. For a small nodule the classifier's probability can fall off within a few millimetres of the
centre (measured on an earlier demo model: 0.92 at the centre of a part-solid 8.8 mm nodule, 0.65 at 4 mm): the grid
then reports a lower probability than the classifier gives the nodule, and a position off the nodule's radius, where
LUNA16's rule counts a false positive. Refining evaluates the window centres around each finding, first on a 3x3x3
lattice ``refine_mm`` apart, then ``refine_mm / 2`` apart (27 windows per step; the finest lattice again, at most twice,
while the finding keeps moving out of its centre voxel); after each step the finding moves to the lattice's
half-maximum centroid, and it reports the most probable window's probability.

Centroid, not the most probable window: a trained model's response is flat-topped (p > 0.99 up to 4-5 mm from a
nodule's centre, since training shifts patches that far), so the best window is decided by noise in the fourth
decimal. Probing a demo model before mining (12 + 3 epochs, without the scale augmentation) on a 9x9x9 lattice of
windows 1 mm apart around 7 nodules of unseen CTs: the most probable window lay 2.7-5.0 mm from the nodule's centre,
the half-maximum centroid 0.4-0.7 mm.

Measured with ``python -m pipelines.bench_detection`` on 30 CTs of cohort seeds 101 and 102 (56 nodules; the demo's
mined bundle, 4 mm grid, ``refine_mm`` 2 against 0): CPM 0.870 -> 0.906. It costs 1080-2160 windows per CT (20
findings, 2-4 lattices of 27): inference of the 30 CTs took 256 s instead of 91 s on the 2-core CPU
(pipelines/PERFORMANCE.md).

With test-time flips the windows are scored as the heat map is: the mean probability over the patch as it is and
mirrored along each axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.core.geometry import as_affine, voxel_to_world, world_to_voxel
from volcnn.inference.heatmap import window_probabilities

__all__ = ["FlipMean", "refine_findings", "refinement_steps"]

#: extra passes of the finest lattice while the centroid keeps leaving its centre voxel
_SETTLE = 2
#: the 27 offsets of a 3x3x3 lattice, in units of the step
_LATTICE = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.int64)


class FlipMean(nn.Module):
    """A classifier whose class probabilities are the mean over the patch as it is and mirrored along each spatial
    axis; it returns their log, so a softmax of its output gives that mean back.

    ``(B, C, X, Y, Z)`` -> ``(B, K)``.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = (x, x.flip(2), x.flip(3), x.flip(4))
        mean = torch.stack([torch.softmax(self.network(v).float(), dim=1) for v in views]).mean(0)
        return mean.clamp_min(1e-30).log()


def _half_max_centroid(centres: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Centroid ``(3,)`` of the window centres ``(N, 3)`` whose probability ``p`` ``(N,)`` is at least half the
    largest, weighted by how far each rises above that half (the largest alone when none other does).

    Unlike :func:`volcnn.inference.findings.half_max_centroid` on the heat grid, every lattice point counts, connected
    or not: the lattice spans at most 2 steps around one finding, too little to hold a second blob beyond a saddle."""
    weights = np.clip(p - 0.5 * p.max(), 0.0, None)
    if weights.sum() <= 0:
        return centres[int(np.argmax(p))].astype(np.float64)
    return (weights[:, None] * centres).sum(axis=0) / weights.sum()


def refinement_steps(refine_mm: float, pixdim: Sequence[float]) -> list[np.ndarray]:
    """The search's steps in voxels per axis: ``refine_mm`` then ``refine_mm / 2``, each rounded at ``pixdim``;
    steps that round to nothing, or repeat the one before, are dropped. ``[]`` when ``refine_mm`` is 0.

    Raises:
        ValueError: a negative or non-finite ``refine_mm``.
    """
    if not math.isfinite(refine_mm) or refine_mm < 0:
        raise ValueError(f"refine_mm must be a finite number >= 0, got {refine_mm!r}")
    steps: list[np.ndarray] = []
    for mm in (refine_mm, refine_mm / 2):
        step = np.rint(mm / np.asarray(pixdim, dtype=np.float64)).astype(np.int64)
        if step.any() and not (steps and np.array_equal(steps[-1], step)):
            steps.append(step)
    return steps


def refine_findings(
    image: torch.Tensor,
    network: nn.Module,
    findings: list[dict[str, Any]],
    patch_size: Sequence[int],
    steps: Sequence[np.ndarray],
    *,
    min_distance_mm: float,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    class_index: int = 1,
) -> list[dict[str, Any]]:
    """Move each finding to the half-maximum centroid of the classifier's windows around it
    (:func:`refinement_steps`; see the module's docstring).

    Args:
        image: the preprocessed volume ``(1, X, Y, Z)`` with its ``affine`` (a MONAI ``MetaTensor``), as the heat map
            was computed on.
        network: the classifier (a :class:`FlipMean` for test-time flips); it gives logits ``(B, K)``.
        findings: ``[{"center_ras_mm", "probability", ...}]`` with uncalibrated probabilities.
        patch_size: the window size in voxels.
        steps: the search's steps in voxels, coarse first.
        min_distance_mm: two refined findings closer than this are one: the less probable is dropped.

    Returns:
        The findings, most probable first, each with its refined ``center_ras_mm`` (mm rounded to 0.01),
        ``probability`` (the best window's, rounded to 1e-4; the start's own window is among those searched) and
        ``refine_shift_mm`` (how far it moved); other keys are kept.
    """
    if not findings or not steps:
        return [dict(f) for f in findings]
    affine = as_affine(image.affine)  # type: ignore[attr-defined]
    shape = np.asarray(image.shape[1:])
    refined = []
    for f in findings:
        pos = np.asarray(world_to_voxel(affine, f["center_ras_mm"]), dtype=np.float64)
        best_p, last_centre = -1.0, np.full(3, -1, dtype=np.int64)
        # each step once, then the finest again (up to _SETTLE times) until the centroid stays in the voxel its
        # lattice was centred on
        for i, step in enumerate([*steps, *[steps[-1]] * _SETTLE]):
            centre = np.rint(pos).astype(np.int64)
            if i >= len(steps) and np.array_equal(centre, last_centre):
                break
            centres = np.clip(centre[None] + _LATTICE * step[None], 0, shape - 1)
            p = window_probabilities(image, network, centres, patch_size, batch_size, device, class_index)
            best_p = max(best_p, float(p.max()))
            pos, last_centre = _half_max_centroid(centres, p.astype(np.float64)), centre
        world = voxel_to_world(affine, pos[None])[0]
        refined.append(
            {
                **f,
                "center_ras_mm": [round(float(v), 2) for v in world],
                "probability": round(best_p, 4),
                "refine_shift_mm": round(math.dist(world, f["center_ras_mm"]), 2),
            }
        )
    refined.sort(key=lambda f: -f["probability"])
    kept: list[dict[str, Any]] = []
    for f in refined:
        if all(math.dist(f["center_ras_mm"], k["center_ras_mm"]) >= min_distance_mm for k in kept):
            kept.append(f)
    return kept
