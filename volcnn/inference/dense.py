"""Dense heat maps: a pooling classifier's convolutional trunk run once over the volume, not once per window.

A classifier that ends in global average pooling and a linear layer (MONAI ResNet, DenseNet121) computes, for a
window, ``linear(mean of the trunk's feature cells)``. Run over a whole volume, the trunk gives the feature cells of
every window at once, and the window logits are a (dilated) mean of the linear layer applied to those cells. This
module splits such a network into trunk and head (:func:`split_classifier`) and evaluates the heat map on the grid
:func:`~volcnn.inference.classifier_heatmap` uses (:func:`dense_heatmap`), so the two agree point for point.

Geometry, per axis (``t`` = the dense map's step, ``s`` = the trunk's total stride, ``P`` = patch size):

* The trunk runs natively up to stride ``t``; every later strided layer runs at stride 1 with its kernel (and
  padding) dilated by its native input stride over ``t`` ("a trous", the standard exact way to evaluate a strided
  network at every ``t``-th shift). Map cell ``q`` then holds exactly what the native trunk computes for the lattice
  whose first cell starts at input voxel ``q * t`` of the tile.
* Cells are mapped to windows by their *start* voxel, not by a centre: the native cell ``j`` of a window starting
  at voxel ``w`` is map cell ``(w + j * s) / t``. Whatever a layer's half-cell offset (an average pool of 2 puts
  its cell between two inputs, a padded 3x3 convolution on one), the native and dense computations have the same
  one, so no offset needs correcting.
* A window centred on grid point ``c`` starts at ``c - P // 2`` (:class:`~volcnn.transforms.WorldPatchCrop`'s
  convention). With grid points ``0, o, 2o, ...`` (``o`` a multiple of ``t``) and tiles starting ``P // 2`` (plus
  a halo that is a multiple of ``t``) before their first grid point, every window starts on a map cell.
* The window has ``m`` native cells per axis (the trunk's output size for one patch); its logits are the mean over
  the map cells ``q, q + s/t, ..., q + (m - 1) s/t`` of the linear layer, which commutes with the mean.

Dense and window-by-window results differ only through padding: a window's trunk zero-pads at the window's faces
where the dense trunk sees the neighbouring tissue. A trunk that pads nothing agrees exactly (tested). With padding,
the dense map is exactly the native network applied to each window *widened by its receptive field* (tested for
ResNet, DenseNet and SeedCNN3d layouts), which is a different function when the receptive field dwarfs the patch:
resnet10's cells see 195 voxels, a 32^3 patch has one cell centred on its corner, and a trained resnet10 (patch 32)
gave a dense map near 0 where windows gave 0.1-0.9 (largest difference 0.87). Such a network must be evaluated
window by window; :func:`dense_window_difference` measures the disagreement, and the runner checks every dense map
with it and falls back to windows (``method="auto"``).

The volume is evaluated in tiles (the mask's bounding box, halved along its longest extent until a tile fits
``tile_mb``) so that memory does not scale with the volume. Each tile holds the windows of its grid points plus
``halo`` voxels of context: ``"window"`` (the default, 0) gives each window at least its own voxels, and whether a
point near a tile face sees more only matters for networks the check rejects anyway; ``"receptive_field"`` makes
the map independent of the tiling (exact stitching) at a cost of twice the receptive-field radius per tile and axis
(about 200 voxels for the ResNets, over 2,000 for DenseNet121). On an out-of-memory error a tile is split, and on
an accelerator the evaluation falls back to the CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from volcnn.core.geometry import as_affine
from volcnn.inference.dense_plan import DensePlan, plan_dense
from volcnn.inference.dense_split import SplitClassifier, triple
from volcnn.inference.heatmap import heatmap_grid, select_windows, stride_from_mm, window_probabilities
from volcnn.inference.tiling import Block, evaluate_block, plan_blocks, run_blocks, tile_voxels
from volcnn.inference.window_heads import WindowHead

__all__ = ["DEFAULT_TILE_MB", "DensePlan", "SplitClassifier", "dense_heatmap", "dense_window_difference", "plan_dense"]

logger = logging.getLogger(__name__)

#: memory budget of one tile's trunk evaluation (estimated from the layer sizes), MiB
DEFAULT_TILE_MB = 768


def dense_heatmap(
    volume: torch.Tensor,
    network: nn.Module,
    patch_size: Sequence[int],
    stride_vox: int | Sequence[int] | None = None,
    *,
    stride_mm: float = 4.0,
    device: str | torch.device | None = None,
    class_index: int = 1,
    mask: np.ndarray | torch.Tensor | None = None,
    halo: int | Sequence[int] | str = "window",
    tile_mb: float = DEFAULT_TILE_MB,
    split: SplitClassifier | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Probability of ``class_index`` for a window centred at every grid point, from one trunk pass per tile.

    Same inputs, grid and outputs as :func:`~volcnn.inference.classifier_heatmap` (windows centred on voxel
    ``size // 2``, replicated border voxels outside the volume), except that the grid step is a divisor-compatible
    one (see :attr:`DensePlan.grid_stride`; the returned affine says which).

    Args:
        volume: preprocessed MetaTensor ``(C, X, Y, Z)`` (RAS, resampled, windowed to [0, 1]) with ``affine``.
        network: a classifier :func:`split_classifier` accepts; run in eval mode (restored afterwards), no gradients.
        patch_size: the network's input size.
        stride_vox: grid step in voxels; ``None`` derives it from ``stride_mm``.
        stride_mm: grid step in mm when ``stride_vox`` is None.
        device: where the trunk runs (default: its parameters' device); tiles are moved there one at a time.
        class_index: the softmax channel recorded.
        mask: boolean ``(X, Y, Z)`` (e.g. :func:`~volcnn.inference.body_mask`): grid points whose voxel is False get
            probability 0, and the trunk runs only over the bounding box of the others' windows.
        halo: context per tile, see :func:`plan_dense`.
        tile_mb: memory budget of one tile (estimated); bigger volumes run in more tiles.
        split: a precomputed :func:`split_classifier` of ``network``.
        progress: tqdm bar over tiles.

    Returns:
        ``(heat, heat_affine)``: float32 ``(nx, ny, nz)`` and float64 ``(4, 4)`` ``volume.affine @ diag(step, 1)``.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected a preprocessed volume (C, X, Y, Z), got shape {tuple(volume.shape)}")
    affine = as_affine(volume.affine) if hasattr(volume, "affine") else np.eye(4)
    if stride_vox is None:
        want = stride_from_mm(stride_mm, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    else:
        want = triple(stride_vox)
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    data = torch.as_tensor(volume, dtype=torch.float32).as_subclass(torch.Tensor).cpu()

    was_training = network.training
    network.eval()
    try:
        plan = plan_dense(split if split is not None else network, patch_size, want, halo)
        grid_shape, centres = heatmap_grid(data.shape[1:], plan.grid_stride)
        keep = select_windows(data, centres, skip_air=False, mask=mask).reshape(grid_shape)
        heat = np.zeros(grid_shape, dtype=np.float32)
        if keep.any():
            max_voxels = max(1, int(tile_mb * 2**20 / plan.bytes_per_voxel))
            blocks = plan_blocks(plan, keep, max_voxels)
            modules: dict[torch.device, tuple[nn.Module, WindowHead]] = {device: (plan.trunk, plan.split.head)}

            def evaluate(block: Block, dev: torch.device) -> np.ndarray:
                if dev not in modules:  # the CPU fallback: a copy of the modules there
                    modules[dev] = (copy.deepcopy(plan.trunk).to(dev), copy.deepcopy(plan.split.head).to(dev))
                with torch.inference_mode():
                    return evaluate_block(data, block, plan, modules[dev], dev)

            def store(block: Block, probs: np.ndarray) -> None:
                if not 0 <= class_index < probs.shape[0]:
                    raise ValueError(f"expected logits with K > {class_index} classes, got K = {probs.shape[0]}")
                sl = tuple(slice(lo, hi) for lo, hi in zip(block.lo, block.hi, strict=True))
                heat[sl] = np.where(keep[sl], probs[class_index], 0.0)

            run_blocks(blocks, evaluate, device, store, lambda b: tile_voxels(plan, b.size), progress)
            logger.debug(
                "dense heat map %s at step %s: %d tiles, %d of %d points in the mask",
                *(grid_shape, plan.grid_stride, len(blocks), int(keep.sum()), keep.size),
            )
    finally:
        network.train(was_training)
    heat_affine = affine @ np.diag([*(float(s) for s in plan.grid_stride), 1.0])
    return heat, heat_affine


def dense_window_difference(
    volume: torch.Tensor,
    network: nn.Module,
    heat: np.ndarray,
    heat_affine: np.ndarray,
    patch_size: Sequence[int],
    *,
    evaluated: np.ndarray | None = None,
    n_points: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    class_index: int = 1,
) -> tuple[float, int]:
    """Check a dense heat map against the window-by-window reference at a few grid points.

    The points are the ``n_points // 2`` highest of ``heat`` (where findings come from) and as many drawn at random
    (``seed``) among the other evaluated points (a dense map that is near 0 everywhere, where windows are not,
    shows there). A network that depends on its patch's zero padding gives a dense map that differs everywhere.

    Args:
        volume: the preprocessed ``(C, X, Y, Z)`` volume the map was computed from.
        network: the classifier.
        heat: ``(nx, ny, nz)`` dense map; ``heat_affine`` its grid-to-world map (its step is read from it).
        patch_size: the window size.
        evaluated: boolean ``heat.shape``, the points the dense map evaluated (default: its non-zero points).
        n_points: points compared at most.
        seed: draws the random points.
        batch_size, device, class_index: as in :func:`~volcnn.inference.classifier_heatmap`.

    Returns:
        ``(max_abs_diff, n)``: the largest probability difference and the number of points compared (``(0.0, 0)``
        when no point was evaluated).
    """
    affine = as_affine(volume.affine) if hasattr(volume, "affine") else np.eye(4)
    step = np.rint(np.linalg.solve(affine, as_affine(heat_affine))[:3, :3].diagonal()).astype(np.int64)
    flat = np.asarray(heat, dtype=np.float32).ravel()
    candidates = np.flatnonzero(flat > 0 if evaluated is None else np.asarray(evaluated, dtype=bool).ravel())
    if len(candidates) == 0 or n_points < 1:
        return 0.0, 0
    top = candidates[np.argsort(-flat[candidates], kind="stable")[: max(1, n_points // 2)]]
    rest = np.setdiff1d(candidates, top)
    rng = np.random.default_rng(seed)
    drawn = rng.choice(rest, size=min(len(rest), n_points - len(top)), replace=False) if len(rest) else rest
    points = np.concatenate([top, drawn]).astype(np.int64)
    centres = np.stack(np.unravel_index(points, heat.shape), axis=1) * step
    ref = window_probabilities(volume, network, centres, patch_size, batch_size, device, class_index)
    return float(np.abs(ref - flat[points]).max()), len(points)
