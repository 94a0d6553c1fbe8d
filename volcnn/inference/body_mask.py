"""A cheap body mask for CT: the patient (lungs included) without the air around it or the table.

Threshold at -500 HU (soft tissue and bone in, air and lung out), downsampled by 2 per axis; keep the largest
connected component and those at least ``keep_fraction`` of its size (the table and blankets are smaller, separate
objects); fill the holes, which brings the lungs and airways back; upsample. Holes are filled in 3D with the first
and last slice (along the slice axis, 2 in RAS) closed, so a lung or trachea cut by the scan's first or last slice
still counts as enclosed, while the air around the body, which reaches the in-plane border, stays outside.
SimpleITK (a dependency) does the connected components and the hole filling, a small cost next to the heat map it
saves (figure in ``pipelines/PERFORMANCE.md``, "Body mask").

Limits: a body cut by the in-plane border of the field of view leaves its lungs open to the outside air in those
slices; they are then filled only where a slice's body wall closes around them. A scan with no tissue above the
threshold (a phantom of lung only) gives a mask of its denser structures only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

__all__ = ["BODY_THRESHOLD_HU", "body_mask"]

#: HU above which a voxel is body (soft tissue about -100..100, fat -100, lung -850, air -1000)
BODY_THRESHOLD_HU = -500.0


def body_mask(
    image: np.ndarray | torch.Tensor,
    *,
    hu_window: Sequence[float] | None = (-1000.0, 400.0),
    threshold_hu: float = BODY_THRESHOLD_HU,
    keep_fraction: float = 0.25,
    downsample: int = 2,
) -> torch.Tensor:
    """Boolean body mask of a CT volume.

    Args:
        image: ``(X, Y, Z)`` or ``(1, X, Y, Z)``: windowed to [0, 1] with ``hu_window`` (the preprocessed volume), or
            HU when ``hu_window`` is None. Axis 2 is the slice axis (RAS after preprocessing).
        hu_window: the ``(lower, upper)`` HU window that mapped the image to [0, 1]; None: ``image`` is in HU.
        threshold_hu: body threshold in HU.
        keep_fraction: components smaller than this fraction of the largest are dropped.
        downsample: factor per axis of the working grid (1: full resolution).

    Returns:
        CPU bool tensor ``(X, Y, Z)``; all False when nothing exceeds the threshold.
    """
    vol = torch.as_tensor(image).detach()
    if vol.ndim == 4 and vol.shape[0] == 1:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) or (1, X, Y, Z) volume, got shape {tuple(vol.shape)}")
    if hu_window is None:
        level = float(threshold_hu)
    else:
        lo, hi = (float(v) for v in hu_window)
        level = (float(threshold_hu) - lo) / (hi - lo)
    shape = tuple(int(n) for n in vol.shape)
    f = max(1, int(downsample))
    small = vol.to(device="cpu", dtype=torch.float32)
    if f > 1:  # mean over f^3 blocks: a voxel is body when most of its block is
        small = F.avg_pool3d(small[None, None], f, f, ceil_mode=True)[0, 0]
    fg = (small > level).numpy().astype(np.uint8)
    if not fg.any():
        return torch.zeros(shape, dtype=torch.bool)
    mask = _largest_components(fg, keep_fraction)
    mask = _fill_holes_closed_ends(mask)
    out = torch.from_numpy(mask.astype(bool))
    if f > 1:
        out = out.repeat_interleave(f, 0).repeat_interleave(f, 1).repeat_interleave(f, 2)
        out = out[: shape[0], : shape[1], : shape[2]].contiguous()
    return out


def _largest_components(fg: np.ndarray, keep_fraction: float) -> np.ndarray:
    """uint8 mask of the 6-connected components of ``fg`` at least ``keep_fraction`` of the largest."""
    labels = sitk.ConnectedComponent(sitk.GetImageFromArray(fg), False)
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SortByObjectSizeOn()
    ranked = relabel.Execute(labels)
    sizes = relabel.GetSizeOfObjectsInPixels()
    n_keep = sum(1 for s in sizes if s >= keep_fraction * sizes[0])
    arr = sitk.GetArrayViewFromImage(ranked)
    return ((arr >= 1) & (arr <= n_keep)).astype(np.uint8)


def _fill_holes_closed_ends(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a uint8 ``(X, Y, Z)`` mask with its first and last ``Z`` slices closed (capped)."""
    capped = np.pad(mask, ((0, 0), (0, 0), (1, 1)), constant_values=0)
    capped[:, :, 0] = 1
    capped[:, :, -1] = 1  # the air around the body still reaches the in-plane border: it is no hole
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(capped), False, 1)
    return sitk.GetArrayViewFromImage(filled)[:, :, 1:-1] | mask  # the view lives while ``filled`` does
