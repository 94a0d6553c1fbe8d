"""Where a layer's feature cells sit on the network's input, and Grad-CAM upsampling that puts them there.

Cell ``i`` of a convolutional layer's output (along one axis) depends on the input voxels ``[a + J i, b + J i]``
(its receptive field, before clipping to the input), ``J`` being the layer's total stride ("jump"). Its centre,
``offset + J i`` with ``offset = (a + b) / 2``, is where the cell's activation belongs on the input grid. MONAI's
default CAM upsampler (trilinear ``F.interpolate``, ``align_corners=False``) instead assumes that the ``n`` cells tile
a patch of ``P`` voxels evenly, cell ``i`` centred at ``(i + 0.5) P / n - 0.5``, which holds for neither kind of
network used here:

* unpadded ("valid") networks, e.g. ``valid_cnn3d``'s fourth convolution at a 32^3 patch: 10 cells centred at
  ``6.5 + 2 i``, not ``1.1 + 3.2 i``, so the map is stretched 1.6x about the patch centre (5.4 voxels off at the
  edges);
* padded networks, e.g. MONAI's ResNets with a stride-2 7^3 stem padded 3: ``layer2`` cells centred at ``8 i``,
  not ``8 i + 3.5``, half a cell off everywhere.

:func:`layer_cell_geometry` measures ``offset`` and ``J`` per axis for any layer of any network (cached by the
network's structure, layer and patch size):

* ``J`` by shape arithmetic: two shape-only runs on the meta device (free) whose inputs differ by
  :data:`SIZE_STEP` voxels along the axis;
* ``offset`` by following NaNs, exactly: on a float32 CPU copy of the network, the input is zero except for one
  NaN slice across the axis at voxel ``v``. A NaN reaches every output cell whose receptive field contains ``v``
  and no other (``0 * NaN`` is NaN; ReLU, max pooling, eval-mode batch norm and PyTorch's direct / GEMM CPU
  convolutions pass it on, only to the windows holding it), so the NaN cells of the target layer are the cells
  ``i`` with ``a + J i <= v <= b + J i``. ``J + 1`` samples, ``v = v0 .. v0 + J``, give ``a`` and ``b`` exactly
  (the last sample checks that shifting ``v`` by ``J`` shifts the cells by one). The probe input is thin
  (along the other axes only as many voxels as the layer needs to produce a cell) and along the axis as long as
  the NaN cells need to stay clear of the ends of the layer's output: receptive fields exceed the patch (51 voxels for
  ResNet ``layer2``, 195 for ``layer4``, ~1000 for DenseNet121 ``denseblock3``). The probe runs on one thread (the
  inputs are small) and takes longer the larger the network and its receptive field, DenseNet121 longest (timed by hand
  per network and patch size; figures in ``pipelines/PERFORMANCE.md``, "Grad-CAM cell geometry"). A network that only
  runs at the patch size (``seed_cnn3d``) is probed at that size with a NaN slice at every voxel, its centres read from
  the cells whose receptive fields lie inside the patch.

For networks with branches (ResNet shortcuts, DenseNet concatenations), the receptive field is the hull over all
paths. Normalisation layers whose statistics span the whole volume (instance, group and layer norm) are replaced
by identities in the probe copy: they act voxel by voxel apart from those statistics, which carry no location. A
layer whose cells nonetheless depend on the whole input (squeeze-and-excitation, attention), or whose stride is not
a whole number of voxels, gets MONAI's even tiling, with a warning.

:func:`upsample_cells` interpolates the CAM linearly between the cell centres; a voxel outside the span of the
centres takes the value of the nearest edge cell (constant extrapolation, as ``F.interpolate`` does at the edges:
there is no cell beyond the edge to interpolate towards, and linear extrapolation could turn the map negative or
overshoot its maximum). :func:`cell_upsampler` wraps it in the ``upsampler`` contract of
:class:`monai.visualize.GradCAM`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.modules.instancenorm import _InstanceNorm

from volcnn.networks.introspect import detached_copy
from volcnn.networks.introspect import in_channels as network_in_channels

__all__ = [
    "SIZE_STEP",
    "CellGeometry",
    "cell_upsampler",
    "interpolation_matrix",
    "layer_cell_geometry",
    "upsample_cells",
]

#: the jump is ``SIZE_STEP`` over the growth of the layer's output when the input grows by ``SIZE_STEP`` voxels
#: (shapes only, on the meta device); divisible by every total stride up to 10, by 12, 14, 15, 16, 18, 20, 21, 24,
#: 28, 30, 32, ... and by every power of two up to 1024
SIZE_STEP = 2**10 * 3**2 * 5 * 7
#: largest probe input (voxels summed over the batch) before the probe gives up
_MAX_PROBE_VOXELS = 32_000_000
#: longest probe input along the probed axis
_MAX_PROBE_LENGTH = 8192
#: largest probe input (voxels summed over the batch) run at once
_CHUNK_VOXELS = 1 << 20
#: normalisations whose statistics span the whole volume: identities in the NaN probe
_GLOBAL_NORMS = (_InstanceNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class CellGeometry:
    """Per axis, cell ``i`` of a layer's output is centred on input voxel ``offset[d] + jump[d] * i``.

    Attributes:
        offset: ``(3,)`` centre of cell 0 in input voxel coordinates (voxel ``k`` is centred at ``k``).
        jump: ``(3,)`` voxels between neighbouring cells (the layer's total stride).
        exact: True when measured on the network (:func:`layer_cell_geometry`), False for MONAI's even tiling.
    """

    offset: tuple[float, float, float]
    jump: tuple[float, float, float]
    exact: bool = True

    def centres(self, cells: Sequence[int]) -> list[np.ndarray]:
        """Cell centres per axis: ``cells`` ``(n0, n1, n2)`` -> three float64 arrays ``(n_d,)`` in input voxels."""
        return [
            o + j * np.arange(int(n), dtype=np.float64) for o, j, n in zip(self.offset, self.jump, cells, strict=True)
        ]

    @classmethod
    def even_tiling(cls, cells: Sequence[int], spatial_size: Sequence[int]) -> CellGeometry:
        """The placement MONAI's default upsampler assumes: ``n`` cells tiling ``P`` voxels evenly, cell ``i`` centred
        at ``(i + 0.5) P / n - 0.5`` (``F.interpolate``, ``align_corners=False``).

        Args:
            cells: ``(n0, n1, n2)`` cells of the layer.
            spatial_size: ``(P0, P1, P2)`` voxels of the input.
        """
        jump = tuple(float(p) / int(n) for p, n in zip(spatial_size, cells, strict=True))
        return cls(tuple(0.5 * j - 0.5 for j in jump), jump, exact=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ upsampling


def interpolation_matrix(centres: np.ndarray | Sequence[float], size: int) -> np.ndarray:
    """Linear interpolation from values at ``centres`` to the voxels ``0 .. size - 1`` of one axis.

    Args:
        centres: ``(n,)`` increasing cell centres in voxel coordinates.
        size: voxels ``P`` along the axis.

    Returns:
        float64 ``(P, n)``, rows summing to 1: row ``p`` interpolates linearly between the two centres around voxel
        ``p``; a voxel outside ``[centres[0], centres[-1]]`` takes the nearest edge cell (weight 1).
    """
    c = np.asarray(centres, dtype=np.float64).reshape(-1)
    n = c.size
    if n == 0 or size < 1:
        raise ValueError(f"need at least one cell centre and one voxel, got {n} centres and size {size}")
    weights = np.zeros((int(size), n), dtype=np.float64)
    if n == 1:
        weights[:, 0] = 1.0
        return weights
    if np.any(np.diff(c) <= 0):
        raise ValueError(f"cell centres must increase, got {c.tolist()}")
    p = np.arange(int(size), dtype=np.float64)
    right = np.clip(np.searchsorted(c, p, side="right"), 1, n - 1)  # c[right - 1] <= p < c[right] inside the span
    left = right - 1
    t = np.clip((p - c[left]) / (c[right] - c[left]), 0.0, 1.0)  # clamped: the edge cell outside the span
    rows = np.arange(int(size))
    weights[rows, left] = 1.0 - t
    weights[rows, right] += t
    return weights


def upsample_cells(cam: torch.Tensor, geometry: CellGeometry, spatial_size: Sequence[int]) -> torch.Tensor:
    """A layer-resolution map on the input grid, interpolated linearly between the cells' receptive-field centres.

    Args:
        cam: ``(B, C, n0, n1, n2)`` on the layer's cells.
        geometry: where the cells sit (:func:`layer_cell_geometry`).
        spatial_size: ``(P0, P1, P2)`` input voxels.

    Returns:
        ``(B, C, P0, P1, P2)``, same dtype and device as ``cam``; separable linear interpolation, the edge cell's
        value beyond the outermost centres (see :func:`interpolation_matrix`).
    """
    if cam.ndim != 5 or len(spatial_size) != 3:
        raise ValueError(f"expected a (B, C, n0, n1, n2) map and three sizes, got {tuple(cam.shape)}, {spatial_size}")
    mats = [
        torch.as_tensor(interpolation_matrix(c, int(p)), dtype=cam.dtype, device=cam.device)
        for c, p in zip(geometry.centres(cam.shape[2:]), spatial_size, strict=True)
    ]
    return torch.einsum("bcijk,xi,yj,zk->bcxyz", cam, *mats)


def cell_upsampler(geometry: CellGeometry) -> Callable[[Sequence[int]], Callable[[torch.Tensor], torch.Tensor]]:
    """``upsampler`` for :class:`monai.visualize.GradCAM` / ``GradCAMpp``: ``upsampler(spatial_size)(cam)`` is
    :func:`upsample_cells` of ``cam`` ``(B, 1, n0, n1, n2)`` -> ``(B, 1, *spatial_size)``."""

    def factory(spatial_size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        size = tuple(int(s) for s in spatial_size)

        def up(cam: torch.Tensor) -> torch.Tensor:
            return upsample_cells(cam, geometry, size)

        return up

    return factory


# ------------------------------------------------------------------------------------------------ probing


class _Reached(Exception):
    """Raised by the target layer's hook: the rest of the network is not needed."""


class _ProbeFailed(Exception):
    """The layer's cells do not sit on a lattice of receptive-field centres that the probe can measure."""


def _without_global_norms(module: nn.Module) -> nn.Module:
    """``module`` with instance, group and layer norms replaced by identities (in place; returns it)."""
    for parent in list(module.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, _GLOBAL_NORMS):
                setattr(parent, attr, nn.Identity())
    return module


def _layer_output(network: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor | None:
    """Output of ``layer`` (its first call) when ``network`` runs on ``x``; the rest of the network is skipped.
    None when the network cannot run on ``x`` or the layer's output is not a 5D tensor."""
    module = dict(network.named_modules())[layer]
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            seen.append(out)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            network(x)
    except _Reached:
        pass
    except (RuntimeError, ValueError, TypeError, IndexError, ZeroDivisionError, AssertionError):
        return None
    finally:
        handle.remove()
    return seen[0] if seen and seen[0].ndim == 5 else None


def layer_cell_geometry(
    network: nn.Module, layer: str, spatial_size: Sequence[int], in_channels: int | None = None
) -> CellGeometry:
    """Receptive-field centres of ``layer``'s cells on the network's input (see the module docstring).

    Computed on copies of the network (``network`` is not modified): shape arithmetic on the meta device and one
    NaN probe per axis on the CPU. A network that only accepts ``spatial_size`` itself is probed at that
    size, with a NaN slice at every voxel, its cells' centres read from the cells whose receptive fields lie inside
    the patch.

    Args:
        network: the classifier ``(B, C, *spatial_size)`` -> anything (only the part up to ``layer`` runs).
        layer: a module name of ``network.named_modules()`` whose output is ``(B, channels, n0, n1, n2)``.
        spatial_size: ``(P0, P1, P2)``, an input size the network accepts (the patch).
        in_channels: C; default the first ``Conv3d``'s input channels.

    Returns:
        :class:`CellGeometry`: cell ``i`` along axis ``d`` is centred on input voxel ``offset[d] + jump[d] * i``
        (for any input size). When the probe cannot measure the layer (cells depending on the whole input, a
        fractional stride), MONAI's :meth:`CellGeometry.even_tiling` for ``spatial_size``, with a warning.

    Raises:
        ValueError: an unknown layer, or one without a 3D output at ``spatial_size``.
    """
    if layer not in dict(network.named_modules()):
        raise ValueError(f"unknown layer {layer!r}")
    size = tuple(int(s) for s in spatial_size)
    channels = in_channels if in_channels is not None else network_in_channels(network, default=1)
    key = (_fingerprint(network), layer, size, channels)
    if key not in _CACHE:
        _CACHE[key] = _measure(network, layer, size, channels)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    geometry, reason = _CACHE[key]
    if reason:
        warnings.warn(
            f"cannot place the cells of layer {layer!r} on the input ({reason}); assuming they tile the patch "
            f"evenly, as MONAI does",
            stacklevel=2,
        )
    return geometry


#: measured geometries (and why a measurement failed, "" when it did not) by network structure, layer, size, channels
_CACHE: dict[tuple[object, ...], tuple[CellGeometry, str]] = {}
_CACHE_SIZE = 32


def _fingerprint(network: nn.Module) -> tuple[object, ...]:
    """What a layer's cell geometry depends on: every module's name, class and hyper-parameters (not its weights)."""
    return tuple((name, type(m), m.extra_repr()) for name, m in network.named_modules())


def _measure(network: nn.Module, layer: str, size: tuple[int, ...], channels: int) -> tuple[CellGeometry, str]:
    """:func:`layer_cell_geometry` without the cache: the geometry, and why it is MONAI's even tiling ("": it is
    not)."""
    meta = detached_copy(network, "meta", torch.float32)

    def cells_at(shape: Sequence[int]) -> tuple[int, ...] | None:
        out = _layer_output(meta, layer, torch.empty(1, channels, *shape, device="meta"))
        return tuple(int(v) for v in out.shape[2:]) if out is not None and out.numel() > 0 else None

    cells = cells_at(size)
    if cells is None:
        raise ValueError(
            f"layer {layer!r} has no (B, C, X, Y, Z) output for a {size} input; choose a convolutional layer"
        )
    try:
        probe = _without_global_norms(detached_copy(network, "cpu", torch.float32))
        thin: list[int] | None = None
        lattice: list[tuple[float, float]] = []
        for d in range(3):
            grown = list(size)
            grown[d] += SIZE_STEP
            out = cells_at(grown)
            if out is None:  # the network only runs on the patch size
                lattice.append(_fixed_size_lattice(probe, layer, channels, size, d))
                continue
            growth = out[d] - cells[d]
            if growth < 1 or SIZE_STEP % growth:
                raise _ProbeFailed(f"its stride along axis {d} is not a whole number of voxels")
            jump = SIZE_STEP // growth
            thin = thin or [_thinnest(cells_at, size, e) for e in range(3)]
            lattice.append((_offset(probe, layer, channels, size, thin, d, jump), float(jump)))
    except _ProbeFailed as e:
        return CellGeometry.even_tiling(cells, size), str(e)
    return CellGeometry(tuple(o for o, _ in lattice), tuple(j for _, j in lattice)), ""  # type: ignore[arg-type]


def _thinnest(cells_at: Callable[[Sequence[int]], tuple[int, ...] | None], size: tuple[int, ...], axis: int) -> int:
    """The fewest voxels along ``axis`` (the others at ``size``) for which the layer still has a cell."""
    lo, hi = 1, size[axis]  # hi works: the network runs on the patch
    while lo < hi:
        mid = (lo + hi) // 2
        shape = list(size)
        shape[axis] = mid
        if cells_at(shape) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _nan_spans(
    probe: nn.Module, layer: str, channels: int, shape: Sequence[int], axis: int, positions: Sequence[int]
) -> tuple[list[tuple[int, int] | None], int]:
    """For each position ``v``, the first and last cell along ``axis`` reached by a NaN slice at voxel ``v`` (None:
    no cell), one sample per position; and the number of cells along ``axis``."""
    voxels = int(np.prod(shape))
    per_run = max(1, _CHUNK_VOXELS // voxels)
    hits: list[torch.Tensor] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small inputs: one thread is fastest, and far faster on a busy machine
    try:
        for start in range(0, len(positions), per_run):
            chunk = positions[start : start + per_run]
            x = torch.zeros(len(chunk), channels, *(int(s) for s in shape), dtype=torch.float32)
            index: list[slice] = [slice(None)] * 5
            for k, v in enumerate(chunk):
                index[0], index[2 + axis] = slice(k, k + 1), slice(v, v + 1)
                x[tuple(index)] = float("nan")
            out = _layer_output(probe, layer, x)
            if out is None:
                raise _ProbeFailed("the network does not run on the probe input")
            hits.append(torch.isnan(out).transpose(1, 2 + axis).flatten(2).any(dim=2))  # (chunk, cells along axis)
    finally:
        torch.set_num_threads(threads)
    hit = torch.cat(hits)  # (positions, cells along axis)
    spans: list[tuple[int, int] | None] = []
    for row in hit:
        where = torch.nonzero(row).flatten()
        spans.append((int(where.min()), int(where.max())) if where.numel() else None)
    return spans, int(hit.shape[1])


def _offset(
    probe: nn.Module, layer: str, channels: int, size: tuple[int, ...], thin: list[int], axis: int, jump: int
) -> float:
    """Centre of cell 0's receptive field along ``axis``, from NaN slices at ``v0 .. v0 + jump`` (one sample each)
    in an input long enough along ``axis`` for the cells they reach to stay clear of the output's ends.

    One slice first, the input doubling until its cells fit; the input is then cut to those cells plus a margin
    (removing ``jump`` voxels removes one cell) before the ``jump + 1`` slices run."""
    length = max(2 * size[axis], 8 * jump, 64)
    v0 = length // 2 - jump // 2
    batch = 1
    while True:
        shape = [thin[d] if d != axis else length for d in range(3)]
        if length > _MAX_PROBE_LENGTH or batch * int(np.prod(shape)) > _MAX_PROBE_VOXELS:
            raise _ProbeFailed(
                f"along axis {axis} its cells depend on the whole input, or on more voxels than a probe of "
                f"{length // 2} voxels holds"
            )
        found, n = _nan_spans(probe, layer, channels, shape, axis, range(v0, v0 + batch))
        if any(s is None for s in found):
            raise _ProbeFailed(f"no cell depends on some input voxels along axis {axis}")
        spans = [s for s in found if s is not None]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        if lo < 1 or hi > n - 2:  # the reached cells touch an end of the layer's output: a longer input
            length *= 2
            v0 = length // 2 - jump // 2
            continue
        if batch > 1:
            break
        batch = jump + 1
        shift = max(lo - 2, 0)  # move the slices this many cells to the left, keeping two cells before them
        keep = hi - shift + 4  # then keep the reached cells (+1 for the last slice) and two after them
        if keep < n and v0 - jump * shift + batch < length - jump * (n - keep):
            v0, length = v0 - jump * shift, length - jump * (n - keep)
    if spans[jump] != (spans[0][0] + 1, spans[0][1] + 1):
        raise _ProbeFailed(f"shifting the input by {jump} voxels along axis {axis} does not shift the cells by one")
    # cell i depends on v = v0 + k + jump * m for lo_k + m <= i <= hi_k + m: of those, the first and the last
    first = min(v0 + k - jump * hi for k, (_, hi) in enumerate(spans[:jump]))
    last = max(v0 + k - jump * lo for k, (lo, _) in enumerate(spans[:jump]))
    return 0.5 * (first + last)


def _fixed_size_lattice(
    probe: nn.Module, layer: str, channels: int, size: tuple[int, ...], axis: int
) -> tuple[float, float]:
    """``(offset, jump)`` along ``axis`` for a network that only runs on ``size``: a NaN slice at every voxel of the
    axis; the cells whose receptive fields lie inside the patch (not touching its first or last voxel) give the
    centres, which must be evenly spaced."""
    if size[axis] * int(np.prod(size)) > _MAX_PROBE_VOXELS:
        raise _ProbeFailed(f"the network only runs on {size} voxels, too large to probe voxel by voxel")
    spans, n = _nan_spans(probe, layer, channels, size, axis, range(size[axis]))
    centres: dict[int, float] = {}
    for i in range(n):
        reach = [v for v, s in enumerate(spans) if s is not None and s[0] <= i <= s[1]]
        if reach and reach[0] > 0 and reach[-1] < size[axis] - 1:
            centres[i] = 0.5 * (reach[0] + reach[-1])
    if len(centres) < 2:
        raise _ProbeFailed(f"fewer than two cells along axis {axis} see only voxels inside the patch")
    (i0, c0), (i1, c1) = sorted(centres.items())[:2]
    jump = (c1 - c0) / (i1 - i0)
    if jump <= 0 or any(abs(c - (c0 + jump * (i - i0))) > 1e-9 for i, c in centres.items()):
        raise _ProbeFailed(f"the cells along axis {axis} are not evenly spaced")
    return c0 - jump * i0, jump
