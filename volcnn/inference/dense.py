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
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volcnn.inference.heatmap import heatmap_grid, select_windows, stride_from_mm, window_probabilities
from volcnn.transforms.geometry import as_affine

__all__ = [
    "DEFAULT_TILE_MB",
    "DensePlan",
    "FlattenLinearHead",
    "PooledLinearHead",
    "SplitClassifier",
    "WindowHead",
    "dense_heatmap",
    "dense_window_difference",
    "plan_dense",
    "split_classifier",
]

logger = logging.getLogger(__name__)

#: memory budget of one tile's trunk evaluation (estimated from the layer sizes), MiB
DEFAULT_TILE_MB = 768

Triple = tuple[int, int, int]
_POINTWISE = (
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
_SPATIAL = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)
#: probe sizes for the shape arithmetic on the meta device (free): strides are size differences over _PROBE_STEP
_PROBE_BASE, _PROBE_STEP = 512, 512


# ---------------------------------------------------------------------------------------------------- heads


class WindowHead(nn.Module):
    """The classifier's head applied to a dense feature map: window logits ``(B, K, *out)`` from cells ``(B, C, *F)``.

    ``forward(features, cells, spacing, step)``: the window starting at map cell ``q`` is made of the cells
    ``q + i * spacing`` for ``i < cells`` per axis; output ``j`` is the window starting at cell ``j * step``.
    """

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        raise NotImplementedError


class PooledLinearHead(WindowHead):
    """Global average pooling then ``linear``: the linear layer as a 1x1x1 convolution, then the window mean.

    Args:
        linear: the classifier's last layer, ``C -> K``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        w = self.linear.weight.to(features.dtype)[:, :, None, None, None]
        logits = window_mean(F.conv3d(features, w), cells, spacing, step)
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.to(logits.dtype)[None, :, None, None, None]
        return logits


class FlattenLinearHead(WindowHead):
    """A dense layer over the flattened feature grid, as a convolution whose kernel is that grid (FCN trick).

    Args:
        linear: the first layer after the flatten, ``C * prod(grid) -> H``.
        grid: the feature grid of one window, ``(gx, gy, gz)``.
        rest: what follows, applied per cell over channels (activations, dropout, linear layers).
    """

    def __init__(self, linear: nn.Linear, grid: Triple, rest: nn.Module) -> None:
        super().__init__()
        self.linear, self.grid, self.rest = linear, tuple(grid), rest

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        if tuple(cells) != self.grid:
            raise ValueError(f"the dense layer was built for a feature grid {self.grid}, the patch gives {cells}")
        w = self.linear.weight.view(self.linear.out_features, -1, *self.grid).to(features.dtype)
        bias = None if self.linear.bias is None else self.linear.bias.to(features.dtype)
        h = F.conv3d(features, w, bias, stride=step, dilation=spacing)
        return self.rest(h.movedim(1, -1)).movedim(-1, 1)


def window_mean(x: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
    """Mean of ``x (B, C, *F)`` over the cells ``j * step + i * spacing`` (``i < cells``) of every window ``j``.

    Returns:
        ``(B, C, *n)`` with ``n = (F - 1 - (cells - 1) * spacing) // step + 1`` per axis.
    """
    n = [(f - 1 - (m - 1) * d) // st + 1 for f, m, d, st in zip(x.shape[2:], cells, spacing, step, strict=True)]
    if min(n) < 1:
        raise ValueError(f"feature map {tuple(x.shape[2:])} is smaller than one window of {cells} cells")
    out: torch.Tensor | None = None
    for i in range(cells[0]):
        for j in range(cells[1]):
            for k in range(cells[2]):
                lo = (i * spacing[0], j * spacing[1], k * spacing[2])
                view = x[
                    :,
                    :,
                    lo[0] : lo[0] + (n[0] - 1) * step[0] + 1 : step[0],
                    lo[1] : lo[1] + (n[1] - 1) * step[1] + 1 : step[1],
                    lo[2] : lo[2] + (n[2] - 1) * step[2] + 1 : step[2],
                ]
                out = view.clone() if out is None else out.add_(view)
    assert out is not None
    return out.div_(math.prod(cells))


# ---------------------------------------------------------------------------------------------------- split


class SplitClassifier(NamedTuple):
    """A classifier as ``head(trunk(x))``: ``trunk (B, C, *S) -> (B, C', *S / total_stride)``, a :class:`WindowHead`."""

    trunk: nn.Module
    head: WindowHead
    total_stride: Triple


def split_classifier(network: nn.Module) -> SplitClassifier:
    """Split a registry classifier into its convolutional trunk and a head that can be applied densely.

    Supported: MONAI ``ResNet`` with a linear head (``resnet10/18/34`` of the registry), MONAI ``DenseNet``
    (``densenet121``), :class:`~volcnn.networks.SeedCNN3d` (its dense layer becomes a convolution whose kernel is the
    feature grid), and any ``nn.Sequential(*trunk, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear)``. The trunk may
    hold 3D convolutions, max / average pools and pointwise layers (batch norm, activations, dropout) only. Modules
    are shared with ``network``, not copied.

    Raises:
        ValueError: the network cannot be evaluated densely (its message says why).
    """
    from monai.networks.nets import DenseNet, ResNet

    from volcnn.networks.seed_cnn import SeedCNN3d

    net = getattr(network, "_orig_mod", network)  # torch.compile wrapper
    name = type(net).__name__
    head: WindowHead
    if isinstance(net, ResNet):
        if getattr(net, "fc", None) is None or not isinstance(net.fc, nn.Linear):
            raise ValueError(f"{name} has no linear head (built with feed_forward=False): nothing to evaluate densely")
        if not _is_global_pool(net.avgpool):
            raise ValueError(f"{name}: expected global average pooling before the head, got {net.avgpool}")
        layers = [net.conv1, net.bn1, net.act] + ([] if net.no_max_pool else [net.maxpool])
        trunk: nn.Module = nn.Sequential(*layers, net.layer1, net.layer2, net.layer3, net.layer4)
        head = PooledLinearHead(net.fc)
    elif isinstance(net, DenseNet):
        cls = dict(net.class_layers.named_children())
        out = cls.get("out")
        if set(cls) != {"relu", "pool", "flatten", "out"} or not _is_global_pool(cls["pool"]):
            raise ValueError(f"{name}: expected class layers relu, global average pool, flatten, linear")
        if not isinstance(out, nn.Linear):
            raise ValueError(f"{name}: expected a linear output layer, got {type(out).__name__}")
        trunk, head = nn.Sequential(net.features, cls["relu"]), PooledLinearHead(out)
    elif isinstance(net, SeedCNN3d):
        flat, first, *rest = list(net.classifier)
        if not isinstance(flat, nn.Flatten) or not isinstance(first, nn.Linear):
            raise ValueError(f"{name}: expected flatten then linear in its classifier")
        trunk = net.features
        grid = _output_size(trunk, _in_channels(trunk), net.spatial_size)
        head = FlattenLinearHead(first, grid, nn.Sequential(*rest))
    elif (
        isinstance(net, nn.Sequential)
        and len(net) >= 4
        and _is_global_pool(net[-3])
        and isinstance(net[-2], nn.Flatten)
        and isinstance(net[-1], nn.Linear)
    ):
        trunk, head = nn.Sequential(*list(net)[:-3]), PooledLinearHead(net[-1])
    else:
        raise ValueError(
            f"{name} cannot be evaluated densely: supported are MONAI ResNet and DenseNet, SeedCNN3d and "
            "nn.Sequential(trunk..., AdaptiveAvgPool3d(1), Flatten(), Linear)"
        )
    _check_trunk(trunk, name)
    strides = _probe(trunk)
    return SplitClassifier(trunk, head, strides.total)


def _is_global_pool(m: nn.Module) -> bool:
    size = getattr(m, "output_size", None)
    return isinstance(m, nn.AdaptiveAvgPool3d) and size in (1, (1, 1, 1), [1, 1, 1])


def _check_trunk(trunk: nn.Module, name: str) -> None:
    for sub_name, m in trunk.named_modules():
        if len(m._modules) or isinstance(m, _POINTWISE):
            continue
        if not isinstance(m, _SPATIAL):
            raise ValueError(f"{name} cannot be evaluated densely: its trunk holds {sub_name} ({type(m).__name__})")
        if isinstance(m, nn.Conv3d) and m.padding_mode != "zeros":
            raise ValueError(f"{name}: {sub_name} pads with {m.padding_mode!r}; dense evaluation needs zero padding")
        if isinstance(m, nn.AvgPool3d) and (_triple(m.padding) != (0, 0, 0) or m.divisor_override is not None):
            raise ValueError(f"{name}: {sub_name} is a padded average pool; dense evaluation needs padding 0")


def _triple(v: int | Sequence[int]) -> Triple:
    t = tuple(int(x) for x in np.broadcast_to(np.asarray(v, dtype=np.int64), (3,)))
    return t  # type: ignore[return-value]


def _in_channels(trunk: nn.Module) -> int:
    for m in trunk.modules():
        if isinstance(m, nn.Conv3d):
            return int(m.in_channels)
    raise ValueError("the trunk has no Conv3d")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device (no data is copied): shapes only."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo).eval()


def _output_size(trunk: nn.Module, in_channels: int, size: Sequence[int]) -> Triple:
    with torch.no_grad():
        out = _meta_copy(trunk)(torch.empty(1, in_channels, *(int(s) for s in size), device="meta"))
    return tuple(int(v) for v in out.shape[2:])  # type: ignore[return-value]


@dataclass(frozen=True)
class _Strides:
    total: Triple
    inputs: dict[str, Triple]  # native input stride of every spatial module, by name


def _probe(trunk: nn.Module) -> _Strides:
    """Native strides, from two shape-only runs whose sizes differ by ``_PROBE_STEP`` voxels."""
    meta = _meta_copy(trunk)
    names: dict[nn.Module, str] = {m: n for n, m in meta.named_modules() if isinstance(m, _SPATIAL)}
    seen: list[dict[str, Triple]] = [{}, {}]
    outs = []
    for run, n in enumerate((_PROBE_BASE, _PROBE_BASE + _PROBE_STEP)):

        def record(mod: nn.Module, args: tuple[torch.Tensor, ...], run: int = run) -> None:
            seen[run].setdefault(names[mod], tuple(int(v) for v in args[0].shape[2:]))  # type: ignore[arg-type]

        hooks = [m.register_forward_pre_hook(record) for m in names]
        try:
            with torch.no_grad():
                outs.append(meta(torch.empty(1, _in_channels(trunk), n, n, n, device="meta")).shape[2:])
        finally:
            for h in hooks:
                h.remove()

    def stride(a: Sequence[int], b: Sequence[int]) -> Triple:
        d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
        if min(d) < 1 or any(_PROBE_STEP % v for v in d):
            raise ValueError(f"the trunk's stride is not an integer (sizes {tuple(a)} -> {tuple(b)})")
        return tuple(_PROBE_STEP // v for v in d)  # type: ignore[return-value]

    if set(seen[0]) != set(names.values()):
        raise ValueError("some trunk layers are not used in its forward pass")
    inputs = {k: stride(seen[0][k], seen[1][k]) for k in seen[0]}
    return _Strides(stride(outs[0], outs[1]), inputs)


# ---------------------------------------------------------------------------------------------------- a trous


class _DilatedMaxPool3d(nn.Module):
    """Max pooling with explicit ``-inf`` padding (``F.max_pool3d`` limits padding to half the *undilated* kernel)."""

    def __init__(self, kernel: Triple, stride: Triple, dilation: Triple, padding: Triple) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation, self.padding = kernel, stride, dilation, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if any(p):
            x = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride, 0, self.dilation)


class _DilatedAvgPool3d(nn.Module):
    """Unpadded average pooling with a dilated kernel (``F.avg_pool3d`` has no dilation)."""

    def __init__(self, kernel: Triple, stride: Triple, dilation: Triple) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_mean(x, self.kernel, self.dilation, self.stride)


def _atrous(trunk: nn.Module, strides: _Strides, t: Triple) -> nn.Module:
    """A copy of ``trunk`` (sharing its parameters) whose output has stride ``t`` instead of ``strides.total``."""
    memo: dict[int, object] = {id(p): p for p in trunk.parameters()}
    memo.update({id(b): b for b in trunk.buffers()})
    out = copy.deepcopy(trunk, memo).eval()
    for name, m in list(out.named_modules()):
        if name not in strides.inputs:
            continue
        r = strides.inputs[name]
        k = _triple(m.kernel_size)
        st = _triple(m.stride if m.stride is not None else m.kernel_size)
        dil = _triple(getattr(m, "dilation", 1))
        pad = _triple(m.padding) if not isinstance(m.padding, str) else (0, 0, 0)
        new_st, new_dil, new_pad = [], [], []
        for a in range(3):
            if r[a] >= t[a]:  # the input is already dense at step t: stride 1, kernel spread over r / t cells
                if r[a] % t[a]:
                    raise ValueError(f"{name}: input stride {r[a]} is not a multiple of the dense step {t[a]}")
                f = r[a] // t[a]
                new_st.append(1)
                new_dil.append(dil[a] * f)
                new_pad.append(pad[a] * f)
            else:  # still native: keep the stride unless it would step past t
                if r[a] * st[a] > t[a] and t[a] % r[a]:
                    raise ValueError(f"{name}: input stride {r[a]} does not divide the dense step {t[a]}")
                new_st.append(min(st[a], t[a] // r[a]))
                new_dil.append(dil[a])
                new_pad.append(pad[a])
        if (tuple(new_st), tuple(new_dil), tuple(new_pad)) == (st, dil, pad):
            continue
        if isinstance(m, nn.Conv3d):
            m.stride, m.dilation = tuple(new_st), tuple(new_dil)
            if not isinstance(m.padding, str):
                m.padding = tuple(new_pad)
            continue
        repl: nn.Module
        if isinstance(m, nn.MaxPool3d):
            repl = _DilatedMaxPool3d(k, tuple(new_st), tuple(new_dil), tuple(new_pad))  # type: ignore[arg-type]
        else:
            repl = _DilatedAvgPool3d(k, tuple(new_st), tuple(new_dil))  # type: ignore[arg-type]
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, repl)
    return out


def _receptive_halo(trunk: nn.Module, strides: _Strides) -> tuple[Triple, Triple]:
    """Voxels before / after a cell's first input that the cell depends on, summed over every spatial layer.

    An upper bound on the receptive field (exact for chains, and for ResNet and DenseNet blocks, whose shortcuts are
    1x1 or identity).
    """
    before, after = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for name, m in trunk.named_modules():
        if name not in strides.inputs:
            continue
        r = np.asarray(strides.inputs[name])
        k, dil = np.asarray(_triple(m.kernel_size)), np.asarray(_triple(getattr(m, "dilation", 1)))
        span = (k - 1) * dil
        pad = span // 2 if isinstance(m.padding, str) and m.padding == "same" else np.asarray(_triple(m.padding))
        if isinstance(m.padding, str) and m.padding == "valid":
            pad = np.zeros(3, dtype=np.int64)
        before += pad * r
        after += (span - pad) * r
    return tuple(int(v) for v in before), tuple(int(v) for v in after)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- plan


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
    patch = _triple(patch_size)
    want = _triple(stride_vox)
    if min(want) < 1:
        raise ValueError(f"stride must be >= 1 voxel, got {stride_vox}")
    strides = _probe(split.trunk)
    s = strides.total
    t = tuple(max(d for d in range(1, s[a] + 1) if s[a] % d == 0 and d <= want[a]) for a in range(3))
    grid = tuple(want[a] if want[a] % t[a] == 0 else t[a] for a in range(3))
    if grid != want:
        logger.info("dense heat map: grid step %s voxels (asked %s; the trunk's stride is %s)", grid, want, s)
    cells = _output_size(split.trunk, _in_channels(split.trunk), patch)
    if min(cells) < 1:
        raise ValueError(f"patch {patch} is too small for the trunk")
    rf = _receptive_halo(split.trunk, strides)
    if halo == "receptive_field":
        h = tuple(max(rf[0][a], rf[1][a]) for a in range(3))
    elif halo == "window":
        h = (0, 0, 0)
    elif isinstance(halo, str):
        raise ValueError(f"halo must be 'receptive_field', 'window' or voxels, got {halo!r}")
    else:
        h = _triple(halo)
    h = tuple(-(-h[a] // t[a]) * t[a] for a in range(3))
    trunk = _atrous(split.trunk, strides, t)  # type: ignore[arg-type]
    return DensePlan(split, patch, cells, t, grid, h, rf, trunk, _bytes_per_voxel(trunk))  # type: ignore[arg-type]


def _bytes_per_voxel(trunk: nn.Module, n: int = 256) -> float:
    """Peak bytes per tile voxel: 12 float32 copies of the largest layer output.

    The factor is measured (peak RSS over a 96^3 tile on CPU): resnet10 at step 4, 276 B per voxel for a largest
    output of 8 floats per voxel (factor 8.6); densenet121 at step 4, 638 B for 16 floats (factor 10): batch norm
    and concatenation copies, oneDNN's reordered buffers.
    """
    meta = _meta_copy(trunk)
    largest = [1]

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor):
            largest.append(out.numel())

    hooks = [m.register_forward_hook(record) for m in meta.modules() if not len(m._modules)]
    try:
        with torch.no_grad():
            meta(torch.empty(1, _in_channels(trunk), n, n, n, device="meta"))
    finally:
        for hk in hooks:
            hk.remove()
    return 12.0 * 4.0 * max(largest) / n**3


# ---------------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class _Block:
    """Grid indices ``lo[a] <= g < hi[a]``."""

    lo: Triple
    hi: Triple

    @property
    def size(self) -> Triple:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    def split(self) -> tuple[_Block, _Block]:
        a = int(np.argmax(self.size))
        mid = self.lo[a] + self.size[a] // 2
        hi0, lo1 = list(self.hi), list(self.lo)
        hi0[a], lo1[a] = mid, mid
        return _Block(self.lo, tuple(hi0)), _Block(tuple(lo1), self.hi)  # type: ignore[arg-type]


def _tile_voxels(plan: DensePlan, size: Sequence[int]) -> int:
    sizes = zip(size, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    return math.prod((n - 1) * o + p + 2 * h for n, o, p, h in sizes)


def _plan_blocks(plan: DensePlan, keep: np.ndarray, max_voxels: int) -> list[_Block]:
    """Blocks covering the kept grid points: the bounding box, halved along its longest extent until it fits.

    An axis is halved only while its block extent is at least the tile's fixed overhead on that axis (the patch plus
    twice the halo), since below that halving saves little memory and doubles the work; a block that cannot be
    split further runs over the budget (logged).
    """
    idx = np.argwhere(keep)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    size = [int(v) for v in hi - lo]
    overhead = [p + 2 * h for p, h in zip(plan.patch_size, plan.halo, strict=True)]
    while _tile_voxels(plan, size) > max_voxels:
        extent = [(n - 1) * o for n, o in zip(size, plan.grid_stride, strict=True)]
        worth = [a for a in range(3) if size[a] > 1 and extent[a] >= overhead[a]]
        if not worth:
            logger.info(
                "dense tiles of %d voxels exceed the budget of %d (patch %s, halo %s)",
                *(_tile_voxels(plan, size), max_voxels, plan.patch_size, plan.halo),
            )
            break
        a = max(worth, key=lambda i: extent[i])
        size[a] = -(-size[a] // 2)
    blocks = []
    ranges = [range(int(lo[a]), int(hi[a]), size[a]) for a in range(3)]
    for x0 in ranges[0]:
        for y0 in ranges[1]:
            for z0 in ranges[2]:
                b0 = (x0, y0, z0)
                b1 = tuple(min(int(hi[a]), b0[a] + size[a]) for a in range(3))
                if keep[b0[0] : b1[0], b0[1] : b1[1], b0[2] : b1[2]].any():
                    blocks.append(_Block(b0, b1))  # type: ignore[arg-type]
    return blocks


def _extract(volume: torch.Tensor, start: Sequence[int], stop: Sequence[int]) -> torch.Tensor:
    """``volume[:, start:stop]`` (per axis) with the border voxels replicated outside the volume: ``(1, C, *size)``."""
    shape = volume.shape[1:]
    inner = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(start, stop, shape, strict=True))
    part = volume[(slice(None), *inner)][None]
    pads: list[int] = []
    for a in (2, 1, 0):
        pads += [max(0, -start[a]), max(0, stop[a] - shape[a])]
    return F.pad(part, pads, mode="replicate") if any(pads) else part


def _forward_tile(trunk: nn.Module, head: WindowHead, tile: torch.Tensor, plan: DensePlan) -> torch.Tensor:
    """Window logits ``(1, K, *n)`` of one tile, the first window starting ``halo`` voxels into the tile."""
    features = trunk(tile)
    skip = [h // t for h, t in zip(plan.halo, plan.map_step, strict=True)]
    features = features[:, :, skip[0] :, skip[1] :, skip[2] :]
    return head(features, plan.cells, plan.spacing, plan.step)


def _evaluate_block(
    volume: torch.Tensor, block: _Block, plan: DensePlan, modules: tuple[nn.Module, WindowHead], device: torch.device
) -> np.ndarray:
    """Softmax logits ``(K, *block.size)`` of the windows centred on the block's grid points."""
    start = [
        lo * o - p // 2 - h for lo, o, p, h in zip(block.lo, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    ]
    stop = [
        (hi - 1) * o - p // 2 + p + h
        for hi, o, p, h in zip(block.hi, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    ]
    tile = _extract(volume, start, stop).to(device)
    logits = _forward_tile(modules[0], modules[1], tile, plan)
    n = block.size
    if any(got < want for got, want in zip(logits.shape[2:], n, strict=True)):
        raise RuntimeError(f"dense map {tuple(logits.shape[2:])} is smaller than the block {n} (internal error)")
    probs = torch.softmax(logits[0, :, : n[0], : n[1], : n[2]].float(), dim=0)
    return probs.cpu().numpy()


def _run_blocks(
    blocks: Iterable[_Block],
    evaluate: Callable[[_Block, torch.device], np.ndarray],
    device: torch.device,
    on_result: Callable[[_Block, np.ndarray], None],
    max_voxels: Callable[[_Block], int],
    progress: bool = False,
) -> torch.device:
    """Evaluate blocks, splitting a block on an out-of-memory error and at last falling back to the CPU.

    After an out-of-memory error, every later block larger than half the failed one is split before it is tried.

    Returns:
        The device the last block ran on.
    """
    from tqdm.auto import tqdm

    todo = list(blocks)[::-1]
    cap: int | None = None
    with tqdm(total=len(todo), unit="tile", disable=not progress) as bar:
        while todo:
            block = todo.pop()
            if cap is not None and max_voxels(block) > cap and max(block.size) > 1:
                todo.extend(block.split()[::-1])
                bar.total += 1
                continue
            try:
                result = evaluate(block, device)
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if max(block.size) > 1:
                    cap = max_voxels(block) // 2
                    logger.warning(
                        "out of memory on %s for a tile of %d voxels; retrying in smaller tiles",
                        device,
                        max_voxels(block),
                    )
                    todo.extend(block.split()[::-1])
                    bar.total += 1
                    continue
                if device.type == "cpu":
                    raise
                logger.warning("out of memory on %s for the smallest tile; falling back to the CPU", device)
                device, cap = torch.device("cpu"), None
                todo.append(block)
                continue
            on_result(block, result)
            bar.update(1)
    return device


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
        want = _triple(stride_vox)
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
            blocks = _plan_blocks(plan, keep, max_voxels)
            modules: dict[torch.device, tuple[nn.Module, WindowHead]] = {device: (plan.trunk, plan.split.head)}

            def evaluate(block: _Block, dev: torch.device) -> np.ndarray:
                if dev not in modules:  # the CPU fallback: a copy of the modules there
                    modules[dev] = (copy.deepcopy(plan.trunk).to(dev), copy.deepcopy(plan.split.head).to(dev))
                with torch.inference_mode():
                    return _evaluate_block(data, block, plan, modules[dev], dev)

            def store(block: _Block, probs: np.ndarray) -> None:
                if not 0 <= class_index < probs.shape[0]:
                    raise ValueError(f"expected logits with K > {class_index} classes, got K = {probs.shape[0]}")
                sl = tuple(slice(lo, hi) for lo, hi in zip(block.lo, block.hi, strict=True))
                heat[sl] = np.where(keep[sl], probs[class_index], 0.0)

            _run_blocks(blocks, evaluate, device, store, lambda b: _tile_voxels(plan, b.size), progress)
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
