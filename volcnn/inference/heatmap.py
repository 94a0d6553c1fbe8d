"""Whole-volume probability heat maps from a patch classifier, window by window.

MONAI's ``sliding_window_inference`` stitches dense outputs ``(B, C, *spatial)`` and rejects a classifier's
``(B, K)`` logits, so the heat map is built here: a window of ``patch_size`` voxels is centred on every point
of a regular grid (every ``stride`` voxels of the preprocessed volume) and the network's softmax probability of
one class is recorded at that point. Windows are centred the way training patches are
(:class:`~volcnn.transforms.WorldPatchCrop`): voxel ``size // 2`` of the window is the grid point, so the
probability at a grid point is what the classifier says about a candidate there.

The window loop is deliberately plain (one forward pass per window, batched); it is the reference against
which the dense evaluation (:mod:`volcnn.inference.dense`) is checked. The heat map goes back onto the input's own
grid with :func:`volcnn.transforms.resample_to_grid`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volcnn.core.geometry import as_affine

__all__ = [
    "AIR_THRESHOLD",
    "classifier_heatmap",
    "heatmap_grid",
    "iter_window_batches",
    "select_windows",
    "stride_from_mm",
    "window_probabilities",
]

logger = logging.getLogger(__name__)

#: windowed intensity below which a window's centre voxel counts as air (about -930 HU for the window
#: [-1000, 400]); lung parenchyma (about -850 HU -> 0.1) stays above it
AIR_THRESHOLD = 0.05


def stride_from_mm(stride_mm: float | Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid stride in voxels, per axis, nearest to ``stride_mm`` at voxel size ``spacing`` (at least 1)."""
    mm = np.broadcast_to(np.asarray(stride_mm, dtype=np.float64), (3,))
    if np.any(mm <= 0):
        raise ValueError(f"stride_mm must be > 0, got {stride_mm}")
    vox = np.maximum(1, np.rint(mm / np.asarray(spacing, dtype=np.float64)))
    return tuple(int(v) for v in vox)  # type: ignore[return-value]


def heatmap_grid(shape: Sequence[int], stride: Sequence[int]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The heat-map grid over a volume of ``shape`` voxels: points ``0, s, 2s, ...`` per axis.

    The last point of each axis is at or beyond the last voxel (``n - 1``), so the grid covers the whole
    volume and resampling back never extrapolates.

    Returns:
        ``(grid_shape, centres)``: the grid's shape ``(nx, ny, nz)`` and the voxel index of every grid point,
        int64 ``(nx * ny * nz, 3)`` in C order (x slowest).
    """
    n = [int(v) for v in shape]
    s = [int(v) for v in stride]
    if len(n) != 3 or len(s) != 3 or min(s) < 1 or min(n) < 1:
        raise ValueError(f"need a 3D shape and strides >= 1, got shape {shape}, stride {stride}")
    grid_shape = tuple(-(-(ni - 1) // si) + 1 for ni, si in zip(n, s, strict=True))
    axes = [np.arange(g, dtype=np.int64) * si for g, si in zip(grid_shape, s, strict=True)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid_shape, centres  # type: ignore[return-value]


def select_windows(
    volume: torch.Tensor,
    centres: np.ndarray,
    *,
    skip_air: bool = True,
    air_threshold: float = AIR_THRESHOLD,
    mask: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Which windows to evaluate: by default those whose centre voxel is not air.

    Args:
        volume: preprocessed ``(C, X, Y, Z)`` in [0, 1]; channel 0 is tested.
        centres: voxel indices ``(N, 3)``; points beyond the volume are tested at the nearest voxel inside.
        skip_air: skip windows whose centre voxel is below ``air_threshold``.
        air_threshold: see :data:`AIR_THRESHOLD`.
        mask: optional boolean ``(X, Y, Z)``; windows whose centre voxel is False are skipped too.

    Returns:
        Boolean ``(N,)``: True where the window is evaluated.
    """
    shape = np.asarray(volume.shape[1:])
    c = np.clip(centres, 0, shape - 1)
    keep = np.ones(len(centres), dtype=bool)
    if skip_air:
        values = volume[0][c[:, 0], c[:, 1], c[:, 2]]
        keep &= (values >= air_threshold).cpu().numpy()
    if mask is not None:
        m = torch.as_tensor(mask).cpu().numpy().astype(bool)
        if m.shape != tuple(shape):
            raise ValueError(f"mask shape {m.shape} differs from the volume's {tuple(shape)}")
        keep &= m[c[:, 0], c[:, 1], c[:, 2]]
    return keep


def iter_window_batches(
    volume: torch.Tensor, centres: np.ndarray, patch_size: Sequence[int], batch_size: int
) -> Iterator[torch.Tensor]:
    """Yield batches ``(B, C, *patch_size)`` of windows centred (voxel ``size // 2``) on ``centres``.

    The volume is padded once by replicating its border voxels, so that every window is complete. Zero
    (air) padding would put an artificial slab of air against the tissue where a scan's field of view ends,
    which a patch classifier has never seen and answers with false positives along the first and last
    slices; replicating the border continues the anatomy smoothly instead.

    Args:
        volume: ``(C, X, Y, Z)``, on the device the batches should be on.
        centres: voxel indices ``(N, 3)``, possibly up to ``stride - 1`` beyond the last voxel.
        patch_size: window size ``(px, py, pz)``.
        batch_size: windows per batch (the last batch may be smaller).
    """
    size = np.asarray([int(p) for p in patch_size])
    if len(centres) == 0:
        return
    shape = np.asarray(volume.shape[1:])
    lo = size // 2
    hi = np.maximum(0, centres.max(axis=0) - lo + size - shape)
    pads: list[int] = []
    for a in (2, 1, 0):  # F.pad lists the last dimension first
        pads += [int(lo[a]), int(hi[a])]
    padded = F.pad(volume, pads, mode="replicate")
    # in padded coordinates a window centred on voxel c starts at c - size // 2 + lo = c
    px, py, pz = (int(v) for v in size)
    for b in range(0, len(centres), batch_size):
        windows = [padded[:, x : x + px, y : y + py, z : z + pz] for x, y, z in centres[b : b + batch_size].tolist()]
        yield torch.stack(windows)


def classifier_heatmap(
    volume: torch.Tensor,
    network: nn.Module,
    patch_size: Sequence[int],
    stride_vox: int | Sequence[int] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    class_index: int = 1,
    mask: np.ndarray | torch.Tensor | None = None,
    progress: bool = False,
    *,
    stride_mm: float = 4.0,
    skip_air: bool = True,
    air_threshold: float = AIR_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """Probability of ``class_index`` for a window centred at every point of a regular grid over ``volume``.

    Args:
        volume: preprocessed MetaTensor ``(C, X, Y, Z)`` (RAS, resampled, windowed to [0, 1]) whose ``affine``
            maps voxel indices to world RAS mm; a plain tensor is taken to have the identity affine.
        network: classifier ``(B, C, *patch_size)`` -> logits ``(B, K)``. It is run in eval mode (its previous
            mode is restored afterwards) without gradients.
        patch_size: the network's input size ``(px, py, pz)``.
        stride_vox: grid step in voxels (int or per axis); ``None`` derives it from ``stride_mm`` and the
            volume's voxel size.
        batch_size: windows per forward pass.
        device: where the network runs; default: the device of its parameters.
        class_index: which softmax channel to record (1 = nodule).
        mask: optional boolean ``(X, Y, Z)``: windows whose centre voxel is False are not evaluated (probability 0).
        progress: show a tqdm progress bar over the windows.
        stride_mm: grid step in mm, used when ``stride_vox`` is None.
        skip_air: a cheap body mask: windows whose centre voxel is below ``air_threshold`` (air, < about
            -930 HU for the default window) are not evaluated and get probability 0. Lung parenchyma is kept.
        air_threshold: see :data:`AIR_THRESHOLD`.

    Returns:
        ``(heat, heat_affine)``: float32 ``(nx, ny, nz)`` probabilities (see :func:`heatmap_grid`) and the
        float64 ``(4, 4)`` map from heat-grid indices to world RAS mm, ``volume.affine @ diag(stride, 1)``.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected a preprocessed volume (C, X, Y, Z), got shape {tuple(volume.shape)}")
    affine = as_affine(volume.affine) if hasattr(volume, "affine") else np.eye(4)
    stride: tuple[int, ...]
    if stride_vox is None:
        stride = stride_from_mm(stride_mm, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    else:
        stride = tuple(int(s) for s in np.broadcast_to(np.asarray(stride_vox, dtype=int), (3,)))
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    grid_shape, centres = heatmap_grid(volume.shape[1:], stride)
    data = torch.as_tensor(volume, dtype=torch.float32).as_subclass(torch.Tensor).to(device)
    keep = select_windows(data, centres, skip_air=skip_air, air_threshold=air_threshold, mask=mask)
    probs = _predict(network, data, centres[keep], patch_size, batch_size, device, class_index, progress)
    heat = np.zeros(len(centres), dtype=np.float32)
    heat[keep] = probs
    heat_affine = affine @ np.diag([*(float(s) for s in stride), 1.0])
    logger.debug(
        "heat map %s at stride %s voxels: %d of %d windows evaluated", grid_shape, stride, keep.sum(), len(keep)
    )
    return heat.reshape(grid_shape), heat_affine


def window_probabilities(
    volume: torch.Tensor,
    network: nn.Module,
    centres: np.ndarray,
    patch_size: Sequence[int],
    batch_size: int = 32,
    device: str | torch.device | None = None,
    class_index: int = 1,
) -> np.ndarray:
    """Softmax probability of ``class_index`` for windows centred (voxel ``size // 2``) on ``centres``.

    Args:
        volume: ``(C, X, Y, Z)`` preprocessed volume (any device).
        network: classifier, run in eval mode (restored afterwards) without gradients.
        centres: voxel indices ``(N, 3)``.
        patch_size: window size.
        batch_size: windows per forward pass.
        device: where the network runs (default: its parameters' device).
        class_index: the softmax channel.

    Returns:
        float32 ``(N,)``.
    """
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    data = torch.as_tensor(volume, dtype=torch.float32).as_subclass(torch.Tensor).to(device)
    points = np.asarray(centres, dtype=np.int64)
    return _predict(network, data, points, patch_size, batch_size, device, class_index, False)


def _predict(
    network: nn.Module,
    volume: torch.Tensor,
    centres: np.ndarray,
    patch_size: Sequence[int],
    batch_size: int,
    device: torch.device,
    class_index: int,
    progress: bool,
) -> np.ndarray:
    """Softmax probability of ``class_index`` for the windows at ``centres``, float32 ``(N,)``."""
    from tqdm.auto import tqdm

    out = np.empty(len(centres), dtype=np.float32)
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(centres), unit="win", disable=not progress) as bar:
            done = 0
            for batch in iter_window_batches(volume, centres, patch_size, batch_size):
                logits = network(batch.to(device))
                if logits.ndim != 2 or not 0 <= class_index < logits.shape[1]:
                    raise ValueError(f"expected logits (B, K) with K > {class_index}, got {tuple(logits.shape)}")
                p = torch.softmax(logits.float(), dim=1)[:, class_index]
                out[done : done + len(p)] = p.cpu().numpy()
                done += len(p)
                bar.update(len(p))
    finally:
        network.train(was_training)
    return out
