"""How a dense heat map evaluates one network for one patch size and grid step: map step, grid, halo, the a trous
trunk and its memory per voxel (:class:`DensePlan`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from volcnn.inference.atrous import atrous_trunk, receptive_halo
from volcnn.inference.dense_split import SplitClassifier, probe_strides, split_classifier, triple
from volcnn.inference.window_heads import Triple
from volcnn.networks.introspect import detached_copy, in_channels, output_size

__all__ = ["DensePlan", "bytes_per_voxel", "plan_dense"]

logger = logging.getLogger(__name__)


@dataclass
class DensePlan:
    """How :func:`dense_heatmap` evaluates a split classifier for one patch size and grid step.

    Attributes:
        split: the classifier's trunk, head and native stride.
        patch_size: the window ``(px, py, pz)``.
        cells: native feature cells of one window per axis (the trunk's output size for one patch).
        map_step: voxels between dense feature-map cells (``t``): the largest divisor of the trunk stride not above
            the requested grid step.
        grid_stride: voxels between heat-map grid points: the requested step when ``map_step`` divides it,
            else ``map_step`` (finer than asked, never coarser).
        halo: voxels of context beyond each tile's windows (multiples of ``map_step``).
        receptive_halo: per axis, the voxels before and after a cell's input that it depends on.
        trunk: the a trous trunk (shares the network's parameters).
        bytes_per_voxel: estimated peak memory of the trunk per tile input voxel.
    """

    split: SplitClassifier
    patch_size: Triple
    cells: Triple
    map_step: Triple
    grid_stride: Triple
    halo: Triple
    receptive_halo: tuple[Triple, Triple]
    trunk: nn.Module
    bytes_per_voxel: float

    @property
    def spacing(self) -> Triple:
        """Map cells between a window's native cells: ``total_stride / map_step``."""
        return tuple(s // t for s, t in zip(self.split.total_stride, self.map_step, strict=True))  # type: ignore[return-value]

    @property
    def step(self) -> Triple:
        """Map cells between grid points: ``grid_stride / map_step``."""
        return tuple(g // t for g, t in zip(self.grid_stride, self.map_step, strict=True))  # type: ignore[return-value]


def plan_dense(
    network: nn.Module | SplitClassifier,
    patch_size: Sequence[int],
    stride_vox: int | Sequence[int],
    halo: int | Sequence[int] | str = "window",
) -> DensePlan:
    """Prepare the dense evaluation of ``network`` on windows of ``patch_size`` at grid step ``stride_vox``.

    Args:
        network: a classifier :func:`split_classifier` accepts, or its split.
        patch_size: the network's input size.
        stride_vox: requested grid step in voxels (int or per axis).
        halo: context voxels per side beyond each tile's windows: ``"window"`` (0: each window sees at least its own
            voxels, the reference's context; smallest tiles), ``"receptive_field"`` (tiles stitch exactly: the result
            does not depend on the tiling), or a number per axis. Rounded up to the map step.

    Raises:
        ValueError: the network cannot be split, or the patch is smaller than the trunk's stride.
    """
    split = network if isinstance(network, SplitClassifier) else split_classifier(network)
    patch = triple(patch_size)
    want = triple(stride_vox)
    if min(want) < 1:
        raise ValueError(f"stride must be >= 1 voxel, got {stride_vox}")
    strides = probe_strides(split.trunk)
    s = strides.total
    t = tuple(max(d for d in range(1, s[a] + 1) if s[a] % d == 0 and d <= want[a]) for a in range(3))
    grid = tuple(want[a] if want[a] % t[a] == 0 else t[a] for a in range(3))
    if grid != want:
        logger.info("dense heat map: grid step %s voxels (asked %s; the trunk's stride is %s)", grid, want, s)
    cells = output_size(split.trunk, in_channels(split.trunk), patch)
    if min(cells) < 1:
        raise ValueError(f"patch {patch} is too small for the trunk")
    rf = receptive_halo(split.trunk, strides)
    if halo == "receptive_field":
        h = tuple(max(rf[0][a], rf[1][a]) for a in range(3))
    elif halo == "window":
        h = (0, 0, 0)
    elif isinstance(halo, str):
        raise ValueError(f"halo must be 'receptive_field', 'window' or voxels, got {halo!r}")
    else:
        h = triple(halo)
    h = tuple(-(-h[a] // t[a]) * t[a] for a in range(3))
    trunk = atrous_trunk(split.trunk, strides, t)  # type: ignore[arg-type]
    return DensePlan(split, patch, cells, t, grid, h, rf, trunk, bytes_per_voxel(trunk))  # type: ignore[arg-type]


def bytes_per_voxel(trunk: nn.Module, n: int = 256) -> float:
    """Peak bytes per tile voxel: 12 float32 copies of the largest layer output.

    The factor is measured and rounded up: peak RSS over a 96^3 tile on CPU for resnet10 and densenet121 at step 4
    (batch norm and concatenation copies, oneDNN's reordered buffers), measured by hand; the figures are in
    ``pipelines/PERFORMANCE.md`` ("Dense heat-map tile memory").
    """
    meta = detached_copy(trunk)
    largest = [1]

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor):
            largest.append(out.numel())

    hooks = [m.register_forward_hook(record) for m in meta.modules() if not len(m._modules)]
    try:
        with torch.no_grad():
            meta(torch.empty(1, in_channels(trunk), n, n, n, device="meta"))
    finally:
        for hk in hooks:
            hk.remove()
    return 12.0 * 4.0 * max(largest) / n**3
