"""Findings (peaks of a heat map, in world mm) and a volume-level score.

A finding is a local maximum of the probability heat map (3x3x3 neighbourhood) at or above a threshold.
Candidates are ordered by probability and thinned by greedy non-maximum suppression on their distance in mm: a
fixed distance, or (``size_aware``) the larger of that distance and the radius of the kept peak's blob, the
connected region where the map stays at or above half the peak (a large nodule lights up a large region, whose
secondary peaks would otherwise be reported as findings of their own beside it). The blob also gives each finding
an estimated ``diameter_mm`` (of the sphere of the blob's volume, at most :data:`MAX_BLOB_DIAMETER_MM`).
The heat grid is coarse (typically 4 mm), so a finding is placed between grid points, at the centroid of its peak's
half-maximum region in its 3x3x3 neighbourhood (weights: how far each point rises above half the peak; points beyond a
saddle left out, see :func:`half_max_centroid`). A trained classifier's map is flat-topped: it says "nodule" with
p > 0.99 for windows up to 4-5 mm off a nodule's centre (training shifts its patches that far), so the highest grid
point, or a parabola through it and its neighbours, can land anywhere on that top; the top's centroid lies near the
nodule's centre. On flat tops with noise in the fourth decimal (``tests/inference/test_heatmap.py``) the centroid is
0.14 cells from the centre on average, a per-axis parabola 0.25, the highest grid point 0.55. A saturated top (grid
points of exactly equal probability) is reported once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from volcnn.core.geometry import as_affine, voxel_to_world

__all__ = [
    "MAX_BLOB_DIAMETER_MM",
    "NMS_METHODS",
    "SCORE_METHODS",
    "find_peaks",
    "half_max_centroid",
    "local_maxima",
    "volume_score",
]

SCORE_METHODS = ("max", "topk_mean", "noisy_or")
#: non-maximum suppression of :class:`~volcnn.inference.InferenceRunner`: by blob size and distance, or distance
NMS_METHODS = ("size", "fixed")
#: the largest blob diameter a finding is given (and suppresses within): the largest nodules of the setting
#: (LUNA16 annotates up to ~32 mm); larger blobs are merged structures, not one nodule
MAX_BLOB_DIAMETER_MM = 30.0


def _as_grid(heat: np.ndarray | torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(np.asarray(heat, dtype=np.float32))
    if h.ndim != 3:
        raise ValueError(f"expected a 3D heat map (nx, ny, nz), got shape {tuple(h.shape)}")
    return h


def local_maxima(heat: np.ndarray | torch.Tensor) -> np.ndarray:
    """Boolean ``(nx, ny, nz)``: True where a value is the maximum of its 3x3x3 neighbourhood (ties included)."""
    h = _as_grid(heat)[None, None]
    pooled = F.max_pool3d(h, kernel_size=3, stride=1, padding=1)
    return (h >= pooled)[0, 0].numpy()


#: reach (grid cells) of the half-maximum region whose centroid places a finding
CENTROID_CELLS = 1


def half_max_centroid(h: np.ndarray, point: np.ndarray, reach: int = CENTROID_CELLS) -> np.ndarray:
    """Centroid ``(3,)`` (grid index units) of the peak at ``point``: the points within ``reach`` cells of it where
    ``h`` is at least half of ``h[point]`` and that it reaches by a path going downhill (26-connected steps that rise
    by at most 5% of the half, so that noise on a flat top does not cut it, while a neighbouring blob beyond a saddle
    stays out), each weighted by how far it rises above that half.

    Args:
        h: the heat map ``(nx, ny, nz)``.
        point: the peak's grid index ``(3,)``.
        reach: half-width of the neighbourhood, in cells.

    Returns:
        Grid coordinates ``(3,)`` (fractional); ``point`` itself when nothing around it rises above the half.
    """
    point = np.asarray(point, dtype=np.int64)
    lo = np.maximum(point - reach, 0)
    hi = np.minimum(point + reach + 1, np.asarray(h.shape))
    box = h[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    level = 0.5 * float(h[tuple(point)])
    rise = 0.05 * level
    shape = np.asarray(box.shape)
    steps = np.argwhere(np.ones((3, 3, 3), dtype=bool)) - 1
    seen = np.zeros(box.shape, dtype=bool)
    first = point - lo
    seen[tuple(first)] = True
    stack, points = [first], []
    while stack:
        q = stack.pop()
        points.append(q)
        nb = q + steps
        nb = nb[np.all((nb >= 0) & (nb < shape), axis=1)]
        v = box[nb[:, 0], nb[:, 1], nb[:, 2]]
        nb = nb[(v >= level) & (v <= box[tuple(q)] + rise) & ~seen[nb[:, 0], nb[:, 1], nb[:, 2]]]
        seen[nb[:, 0], nb[:, 1], nb[:, 2]] = True
        stack.extend(nb)
    region = np.asarray(points)
    weights = box[region[:, 0], region[:, 1], region[:, 2]] - level
    if weights.sum() <= 0:
        return point.astype(np.float64)
    return lo + (weights[:, None] * region).sum(axis=0) / weights.sum()


def find_peaks(
    heat: np.ndarray | torch.Tensor,
    heat_affine: np.ndarray,
    threshold: float = 0.5,
    min_distance_mm: float = 10.0,
    max_findings: int = 20,
    subgrid: bool = True,
    size_aware: bool = False,
) -> list[dict[str, Any]]:
    """Local maxima of ``heat`` at or above ``threshold``, most probable first, at least ``min_distance_mm`` apart.

    A saturated top (connected local maxima of exactly equal probability, as float32 softmax gives for large
    logits) is one finding. With ``subgrid`` a finding lies at its peak's :func:`half_max_centroid`, between grid
    points; without, on the grid (a saturated top's centroid).

    Args:
        heat: probabilities ``(nx, ny, nz)``.
        heat_affine: ``(4, 4)`` heat-grid index -> world RAS mm.
        threshold: smallest probability reported.
        min_distance_mm: a peak closer than this to a more probable kept peak is suppressed.
        max_findings: at most this many findings.
        subgrid: place findings between grid points (:func:`half_max_centroid`).
        size_aware: suppress within the kept peak's blob radius too, and report each finding's ``diameter_mm``.

    Returns:
        ``[{"center_ras_mm": [x, y, z], "probability": p}, ...]`` (plus ``"diameter_mm"`` when ``size_aware``),
        mm rounded to 0.01, probability to 1e-4.
    """
    world, prob, diam = _peaks(
        _as_grid(heat), heat_affine, threshold, min_distance_mm, max_findings, subgrid, size_aware
    )
    out: list[dict[str, Any]] = []
    for w, p, d in zip(world, prob, diam, strict=True):
        finding: dict[str, Any] = {"center_ras_mm": [round(float(v), 2) for v in w], "probability": round(float(p), 4)}
        if size_aware:
            finding["diameter_mm"] = round(float(d), 1)
        out.append(finding)
    return out


def _peaks(
    h: torch.Tensor,
    heat_affine: np.ndarray,
    threshold: float,
    min_distance_mm: float,
    max_findings: int,
    subgrid: bool,
    size_aware: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept peaks of :func:`find_peaks`: world mm ``(M, 3)``, probabilities ``(M,)`` and blob diameters in mm
    ``(M,)`` (0 unless ``size_aware``), unrounded."""
    hn = h.numpy()
    is_max = local_maxima(h)
    idx = np.argwhere(is_max & (hn >= threshold))
    if len(idx) == 0 or max_findings <= 0:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.float32), np.zeros(0)
    prob = hn[idx[:, 0], idx[:, 1], idx[:, 2]]
    smooth = F.avg_pool3d(h[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0].numpy()
    tie = smooth[idx[:, 0], idx[:, 1], idx[:, 2]]
    order = np.lexsort((-tie, -prob))  # by probability, then by neighbourhood mean; stable otherwise
    idx, prob = idx[order], prob[order]
    affine = as_affine(heat_affine)
    cell_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    seen = np.zeros(hn.shape, dtype=bool)
    kept_world: list[np.ndarray] = []
    kept_prob: list[float] = []
    kept_reach: list[float] = []  # suppression radius of each kept peak
    kept_diam: list[float] = []
    for point, p in zip(idx, prob, strict=True):
        if seen[tuple(point)]:
            continue  # part of a plateau already reported
        plateau = _plateau(is_max & (hn == p), point, seen)  # a saturated top is one finding, around its middle
        middle = plateau[np.argmin(np.linalg.norm(plateau - plateau.mean(axis=0), axis=1))].astype(np.int64)
        pos = half_max_centroid(hn, middle) if subgrid else plateau.mean(axis=0)
        world = voxel_to_world(affine, pos)
        if kept_world and np.any(np.linalg.norm(np.asarray(kept_world) - world, axis=1) < np.asarray(kept_reach)):
            continue
        diameter = _blob_diameter(hn, point, 0.5 * float(p), cell_mm3) if size_aware else 0.0
        kept_world.append(world)
        kept_prob.append(float(p))
        kept_diam.append(diameter)
        kept_reach.append(max(min_distance_mm, 0.5 * diameter))
        if len(kept_world) >= max_findings:
            break
    return np.asarray(kept_world), np.asarray(kept_prob), np.asarray(kept_diam)


def _blob_diameter(h: np.ndarray, point: np.ndarray, level: float, cell_mm3: float) -> float:
    """Diameter (mm) of the sphere of the volume of the 26-connected region of ``h >= level`` around ``point``,
    at most :data:`MAX_BLOB_DIAMETER_MM` (the flood fill stops once the region is larger)."""
    limit = int(np.ceil((np.pi / 6.0) * MAX_BLOB_DIAMETER_MM**3 / max(cell_mm3, 1e-9))) + 1
    region = h >= level
    seen = np.zeros(h.shape, dtype=bool)
    shape = np.asarray(h.shape)
    steps = np.argwhere(np.ones((3, 3, 3), dtype=bool)) - 1
    stack, count = [np.asarray(point)], 0
    seen[tuple(point)] = True
    while stack and count < limit:
        q = stack.pop()
        count += 1
        nb = q + steps
        nb = nb[np.all((nb >= 0) & (nb < shape), axis=1)]
        nb = nb[region[nb[:, 0], nb[:, 1], nb[:, 2]] & ~seen[nb[:, 0], nb[:, 1], nb[:, 2]]]
        seen[nb[:, 0], nb[:, 1], nb[:, 2]] = True
        stack.extend(nb)
    diameter = (6.0 * count * cell_mm3 / np.pi) ** (1.0 / 3.0)
    return float(min(diameter, MAX_BLOB_DIAMETER_MM))


def _plateau(region: np.ndarray, start: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Points ``(N, 3)`` of the 26-connected component of ``region`` containing ``start``; marks them in ``seen``."""
    shape = np.asarray(region.shape)
    steps = np.argwhere(np.ones((3, 3, 3), dtype=bool)) - 1
    stack, points = [np.asarray(start)], []
    seen[tuple(start)] = True
    while stack:
        q = stack.pop()
        points.append(q)
        nb = q + steps
        nb = nb[np.all((nb >= 0) & (nb < shape), axis=1)]
        nb = nb[region[nb[:, 0], nb[:, 1], nb[:, 2]] & ~seen[nb[:, 0], nb[:, 1], nb[:, 2]]]
        seen[nb[:, 0], nb[:, 1], nb[:, 2]] = True
        stack.extend(nb)
    return np.asarray(points, dtype=np.float64)


def volume_score(
    heat: np.ndarray | torch.Tensor,
    method: str = "max",
    k: int = 5,
    *,
    heat_affine: np.ndarray | None = None,
    min_distance_mm: float = 10.0,
) -> float:
    """One probability for the whole volume.

    Args:
        heat: probabilities ``(nx, ny, nz)``.
        method: ``"max"``: the largest probability; ``"topk_mean"``: the mean of the ``k`` most probable peaks
            (missing peaks count as 0); ``"noisy_or"``: ``1 - prod(1 - p)`` over the ``k`` most probable peaks,
            the probability that at least one is positive if they were independent.
        k: peaks combined by ``topk_mean`` and ``noisy_or``.
        heat_affine: heat-grid index -> world mm, for the peaks' suppression distance; the identity (grid cells
            of 1 mm) when omitted.
        min_distance_mm: peaks are those of :func:`find_peaks` (non-maximum suppression at this distance), so a
            nodule spanning several grid points counts once.

    Returns:
        The score in [0, 1] (0 for an all-zero heat map).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    h = _as_grid(heat)
    if h.numel() == 0:
        return 0.0
    if method == "max":
        return float(h.max())
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    affine = np.eye(4) if heat_affine is None else heat_affine
    positive = float(h[h > 0].min()) if bool((h > 0).any()) else 1.0
    _, p, _ = _peaks(h, affine, positive, min_distance_mm, k, subgrid=False)
    p = p.astype(np.float64)
    if method == "topk_mean":
        return float(p.sum() / k)
    return float(1.0 - np.prod(1.0 - p))
