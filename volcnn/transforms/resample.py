"""``ResampleToSpacing(d)``: MONAI ``Spacing(d)``'s output grid, trilinear in float32, slab by slab.

MONAI's ``Spacingd(pixdim, mode="bilinear", dtype=np.float32)`` resamples through one ``affine_grid`` /
``grid_sample`` call over the whole output: a ``(X', Y', Z', 3)`` sampling grid (plus temporaries) is built
before a single value is interpolated, so its time and peak memory grow with the whole output. This
transform produces the *same* output grid and the same trilinear values with a small, bounded working set:

* **Geometry** is computed exactly as ``monai.transforms.Spacing`` computes it (:func:`spacing_geometry`, which
  calls MONAI's own ``zoom_affine`` / ``compute_shape_offset``): the rotation of an oblique affine is kept and
  its columns rescaled to ``pixdim`` (shear is dropped), the first input voxel stays where it is (or the grids are
  centre-aligned when no input corner is the minimum), a spacing within ``AFFINE_TOL`` (1e-3 mm) of ``pixdim`` is
  kept, and when nothing changes the input is returned as float32 without a copy.
* **Values**: output voxel ``j`` samples input index ``p = xform @ j`` (``xform = inv(src_affine) @ dst_affine``)
  trilinearly, with each coordinate clamped to ``[0, n - 1]`` first: exactly ``grid_sample(mode="bilinear",
  padding_mode="border")``, Spacingd's default, so the volume faces behave the same (edge values repeated).
* **Work** goes slab by slab along the first spatial axis of the output (``slab_voxels`` output voxels at a
  time, 1 MiB by default, so a slab's temporaries stay in cache). When ``xform`` is diagonal (any RAS/LPS/oblique
  affine without shear: Spacing keeps the rotation) the interpolation is separable: per slab, 1-D linear
  interpolation along each axis in turn (one gather of both neighbours, then a lerp; the axis that shrinks the
  data most first, the last one written straight into the output; axes needing no interpolation are skipped).
  On the CPU the kernels are numpy (which releases the GIL) and slabs are spread over ``torch.get_num_threads()``
  threads: a few large kernels with no OpenMP barriers, which keeps the time steady on a busy 2-core machine;
  elsewhere the same steps run as torch ops. A sheared affine falls back to ``grid_sample`` per slab over the
  slab's bounding box in the input. Everything is float32; the only whole-volume allocation is the output.

Compared with ``Spacingd`` on a 512x512x600 CT: a fraction of its time, no memory beyond the output against its
GBs of temporaries, and values that agree with it to ~0.02 HU (figures, with the machine, in
``pipelines/PERFORMANCE.md``, "Resampling"). ``python -m pipelines.bench_preprocess`` measures the preprocessing
chain that uses it against SimpleITK.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import AFFINE_TOL, affine_to_spacing, compute_shape_offset, to_affine_nd, zoom_affine
from monai.transforms import InvertibleTransform, MapTransform
from monai.transforms.inverse import TraceableTransform
from monai.utils import TraceKeys, TransformBackends, convert_to_tensor

from volcnn.core.geometry import as_affine

__all__ = [
    "ResampleToSpacing",
    "ResampleToSpacingd",
    "SpacingGeometry",
    "resample_linear",
    "resample_to_grid",
    "spacing_geometry",
]

#: output voxels interpolated per slab (1 MiB of float32): the working set besides the input and the output is a
#: few times this per worker thread, small enough to stay in cache
DEFAULT_SLAB_VOXELS = 1 << 18

#: the general (``grid_sample``) path takes slabs this many times larger: its cost per slab is mostly fixed
GENERAL_SLAB_FACTOR = 8

#: an ``xform`` whose off-diagonal terms move no output voxel's sampling point by more than this (input voxels)
#: is treated as diagonal (separable interpolation); rotations without shear give ~1e-13
SEPARABLE_TOL_VOXELS = 1e-4

#: a sampling coordinate within this of an integer needs no interpolation along its axis
_INTEGER_TOL = 1e-6


class SpacingGeometry(NamedTuple):
    """The output grid of ``Spacing(pixdim)`` for one input grid.

    Attributes:
        shape: output spatial shape ``(X', Y', Z')``.
        affine: ``(4, 4)`` float64 output index -> world, as ``Spacing`` writes it into the MetaTensor.
        xform: ``(4, 4)`` float64 output index -> input index (``inv(src_affine) @ dst_affine``).
        unchanged: ``Spacing`` would return the input as is (same shape, affine within ``AFFINE_TOL``); then
            ``affine`` is the input's affine and ``xform`` the identity.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    xform: np.ndarray
    unchanged: bool


def _pixdim3(pixdim: Sequence[float] | np.ndarray | float) -> np.ndarray:
    """``pixdim`` as 3 positive floats; a shorter sequence repeats its last value, as ``Spacing`` does."""
    p = np.atleast_1d(np.asarray(pixdim, dtype=np.float64)).ravel()
    if p.size == 0 or p.size > 3:
        raise ValueError(f"pixdim must have 1 to 3 values, got {pixdim!r}")
    p = np.concatenate([p, np.repeat(p[-1], 3 - p.size)])
    if not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"pixdim must be positive and finite, got {pixdim!r}")
    return p


def spacing_geometry(
    spatial_shape: Sequence[int], affine: np.ndarray | torch.Tensor, pixdim: Sequence[float] | np.ndarray | float
) -> SpacingGeometry:
    """The grid ``monai.transforms.Spacing(pixdim, diagonal=False, scale_extent=False)`` resamples onto.

    Mirrors ``Spacing.__call__`` and ``spatial_resample`` (MONAI 1.6) step by step, with MONAI's own helpers, so
    that shapes and affines agree with ``Spacingd`` to rounding.

    Args:
        spatial_shape: input ``(X, Y, Z)``.
        affine: input ``(4, 4)`` index -> world (any orientation, oblique and sheared included).
        pixdim: target spacing in mm, 1 to 3 positive values.

    Returns:
        :class:`SpacingGeometry`.
    """
    shape = [int(s) for s in spatial_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected a 3D spatial shape, got {tuple(spatial_shape)}")
    src = to_affine_nd(3, np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64))
    target = _pixdim3(pixdim)
    orig = np.asarray(affine_to_spacing(src, 3, np.float64), dtype=np.float64)
    out_d = np.where(np.abs(orig - target) <= AFFINE_TOL, orig, target)  # Spacing keeps a spacing this close
    dst = zoom_affine(src, out_d, diagonal=False)
    out_shape, offset = compute_shape_offset(shape, src, dst, scale_extent=False)
    dst[:3, 3] = offset[:3]
    xform = np.linalg.solve(src, dst)
    size = tuple(int(s) for s in out_shape)
    same_size = size == tuple(shape)
    unchanged = same_size and (
        np.allclose(src, dst, rtol=1e-5, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), rtol=1e-5, atol=AFFINE_TOL)
    )
    if unchanged:
        return SpacingGeometry((shape[0], shape[1], shape[2]), src, np.eye(4), True)
    out_affine = src @ xform  # as MONAI's track_transform_meta composes it
    return SpacingGeometry((size[0], size[1], size[2]), out_affine, xform, False)


_Plan = tuple[np.ndarray, "np.ndarray | None"]


def _axis_plan(a: float, b: float, n_in: int, n_out: int) -> _Plan | None:
    """Input index ``i0`` and weight ``w`` per output index along one axis: ``(1 - w) x[i0] + w x[i0 + 1]``.

    The coordinate ``a * j + b`` is clamped to ``[0, n_in - 1]`` (``grid_sample``'s ``border`` padding). Returns
    ``None`` for the identity, ``w = None`` when every coordinate is (within 1e-6) an integer.
    """
    p = np.clip(a * np.arange(n_out, dtype=np.float64) + b, 0.0, n_in - 1.0)
    near = np.rint(p)
    if np.all(np.abs(p - near) <= _INTEGER_TOL):
        i0 = near.astype(np.int64)
        if n_out == n_in and np.array_equal(i0, np.arange(n_in)):
            return None
        return i0, None
    i0 = np.clip(np.floor(p), 0, max(n_in - 2, 0)).astype(np.int64)
    return i0, (p - i0).astype(np.float32)


class _Scratch:
    """Two reusable float32 buffers of one worker thread, used in turn by the interpolation steps of its slabs.

    Each step gathers into one buffer what the previous step left in the other. Allocating these temporaries
    afresh for every slab made glibc map and unmap them again and again: with one worker (a DataLoader worker runs
    torch with one thread) a whole CT's resampling took several times the page faults and the time (figures in
    ``pipelines/PERFORMANCE.md``, "Resampling").
    """

    def __init__(self) -> None:
        self._buffers = [np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)]
        self._next = 0

    def __call__(self, shape: Sequence[int]) -> np.ndarray:
        """The next buffer as an uninitialised float32 array of ``shape`` (valid until the one after is asked for)."""
        i, self._next = self._next, 1 - self._next
        n = int(np.prod(shape))
        if self._buffers[i].size < n:
            self._buffers[i] = np.empty(n + n // 4, dtype=np.float32)  # headroom: slabs differ a little in size
        return self._buffers[i][:n].reshape(shape)


def _interp_axis_numpy(
    x: np.ndarray,
    dim: int,
    i0: np.ndarray,
    w: np.ndarray | None,
    out: Any = None,
    scratch: _Scratch | None = None,
) -> np.ndarray:
    """Linear interpolation of ``x`` along ``dim`` at ``i0 + w`` (the size along ``dim`` becomes ``len(i0)``), in
    float32, written into ``out`` when given. One gather of both neighbours (``np.take``) and three in-place ufunc
    passes over a slab that stays in cache; numpy releases the GIL, so slabs run in parallel threads. With
    ``scratch`` a float32 ``x`` is gathered into a reused buffer (the result, when not ``out``, lives there)."""
    m = len(i0)
    index = i0 if w is None else np.concatenate([i0, i0 + 1])
    if scratch is not None and x.dtype == np.float32:
        shape = list(x.shape)
        shape[dim] = len(index)
        # the indices are in range by construction; with mode="clip" take writes straight into the buffer given
        # (mode="raise" would gather into a temporary first)
        gathered = np.take(x, index, axis=dim, out=scratch(shape), mode="clip")
    else:
        gathered = np.take(x, index, axis=dim)
    if w is None:
        if out is None:
            return gathered.astype(np.float32, copy=False)
        out[...] = gathered
        return out
    both = gathered.astype(np.float32, copy=False)
    lead = (slice(None),) * dim
    lo, hi = both[(*lead, slice(0, m))], both[(*lead, slice(m, 2 * m))]
    shape = [1] * x.ndim
    shape[dim] = m
    np.subtract(hi, lo, out=hi)
    hi *= w.reshape(shape)
    if out is None:
        lo += hi
        return lo
    np.add(lo, hi, out=out)
    return out


def _interp_axis_torch(
    x: torch.Tensor, dim: int, i0: np.ndarray, w: np.ndarray | None, out: Any = None
) -> torch.Tensor:
    """:func:`_interp_axis_numpy` with torch ops (for tensors not on the CPU): one gather, one ``lerp``."""
    m = len(i0)
    if w is None:
        picked = x.index_select(dim, torch.from_numpy(i0).to(x.device))
        if out is None:
            return picked if picked.dtype == torch.float32 else picked.float()
        return out.copy_(picked)
    both = x.index_select(dim, torch.from_numpy(np.concatenate([i0, i0 + 1])).to(x.device))
    if both.dtype != torch.float32:
        both = both.float()
    view = [1] * x.ndim
    view[dim] = m
    weight = torch.from_numpy(w).to(x.device).view(view)
    lo, hi = both.narrow(dim, 0, m), both.narrow(dim, m, m)
    if out is None:
        return lo.lerp_(hi, weight)
    return torch.lerp(lo, hi, weight, out=out)


def _separable_slab(x: Any, plans: list[_Plan | None], o0: int, o1: int, out: Any, interp: Callable[..., Any]) -> None:
    """Write output rows ``o0:o1`` (first spatial axis) of the separable resampling of ``x`` ``(C, X, Y, Z)``
    (numpy array or tensor, with the matching ``interp``) into ``out[:, o0:o1]``."""
    plan0 = plans[0]
    todo: dict[int, _Plan] = {}
    if plan0 is None:
        sub = x[:, o0:o1]
    else:
        i0, w = plan0[0][o0:o1], None if plan0[1] is None else plan0[1][o0:o1]
        lo, hi = int(i0.min()), int(i0.max()) + (0 if w is None else 1)
        sub = x[:, lo : hi + 1]
        todo[1] = (i0 - lo, w)
    for axis in (1, 2):
        plan = plans[axis]
        if plan is not None:
            todo[axis + 1] = plan
    target = out[:, o0:o1]
    if not todo:
        target[...] = sub
        return
    while todo:  # the axis leaving the fewest voxels first; the last one writes into the output
        dim = min(todo, key=lambda d: len(todo[d][0]) / sub.shape[d])
        i0, w = todo.pop(dim)
        sub = interp(sub, dim, i0, w, None if todo else target)


def _general_slab(x: torch.Tensor, xform: np.ndarray, out_shape: Sequence[int], o0: int, o1: int) -> torch.Tensor:
    """Output rows ``o0:o1`` of the resampling of ``x`` ``(C, X, Y, Z)`` through a non-diagonal ``xform``.

    ``grid_sample`` (trilinear, border, ``align_corners=True`` on voxel centres) over the bounding box, in the
    input, of the slab's sampling points; the sampling grid is computed with numpy (float64, then normalised to
    float32) so that the only parallel torch op per slab is ``grid_sample``. Returns float32 ``(C, o1 - o0, Y', Z')``.
    """
    j = [
        np.arange(o0, o1, dtype=np.float64).reshape(-1, 1, 1),
        np.arange(int(out_shape[1]), dtype=np.float64).reshape(1, -1, 1),
        np.arange(int(out_shape[2]), dtype=np.float64).reshape(1, 1, -1),
    ]
    first = np.array([o0, 0.0, 0.0])
    last = np.array([o1 - 1, int(out_shape[1]) - 1, int(out_shape[2]) - 1], dtype=np.float64)
    grid = np.empty((1, o1 - o0, int(out_shape[1]), int(out_shape[2]), 3), dtype=np.float32)
    box: list[slice] = []
    for i in range(3):
        row = xform[i, :3]
        n = int(x.shape[i + 1])
        low = float(np.minimum(row * first, row * last).sum() + xform[i, 3])  # extremes of an affine map on a box
        high = float(np.maximum(row * first, row * last).sum() + xform[i, 3])
        lo = int(np.clip(np.floor(low), 0, n - 1))
        hi = int(np.clip(np.ceil(high), 0, n - 1))
        box.append(slice(lo, hi + 1))
        m = hi - lo + 1
        if m == 1:
            grid[..., 2 - i] = 0.0  # grid_sample: last grid coordinate indexes W (= Z), the first D (= X)
            continue
        scale = 2.0 / (m - 1)
        grid[0, ..., 2 - i] = (
            (row[0] * scale) * j[0]
            + (row[1] * scale) * j[1]
            + (row[2] * scale) * j[2]
            + ((xform[i, 3] - lo) * scale - 1.0)
        )
    crop = x[:, box[0], box[1], box[2]].float().unsqueeze(0)
    out = F.grid_sample(
        crop, torch.from_numpy(grid).to(x.device), mode="bilinear", padding_mode="border", align_corners=True
    )
    return out.squeeze(0)


def resample_linear(
    img: torch.Tensor,
    xform: np.ndarray,
    out_shape: Sequence[int],
    slab_voxels: int = DEFAULT_SLAB_VOXELS,
    workers: int | None = None,
    kernels: Literal["auto", "numpy", "torch"] = "auto",
) -> torch.Tensor:
    """Trilinear resampling with border clamping, slab by slab, in float32.

    Output voxel ``j`` gets the input sampled at index ``xform @ j`` (each coordinate clamped to ``[0, n - 1]``),
    i.e. ``grid_sample(mode="bilinear", padding_mode="border")`` as MONAI's ``SpatialResample`` calls it. A diagonal
    ``xform`` is done separably (numpy kernels on the CPU, slabs spread over ``workers`` threads; torch ops on other
    devices), any other with ``grid_sample`` per slab.

    Args:
        img: ``(C, X, Y, Z)`` any real dtype, any strides (plain tensor; a MetaTensor's data is used as is).
        xform: ``(4, 4)`` output index -> input index.
        out_shape: output ``(X', Y', Z')``.
        slab_voxels: output voxels per slab (bounds the working memory: a few times this per worker).
        workers: threads for the separable CPU path; default ``torch.get_num_threads()`` (at most 8).
        kernels: separable kernels: ``"auto"`` (numpy on the CPU, torch elsewhere), or force one (``"numpy"``
            needs a CPU tensor).

    Returns:
        float32 ``(C, X', Y', Z')`` on ``img``'s device, laid out in memory like ``img`` (the work runs along the
        input's memory order, slabs across its slowest spatial axis): contiguous for a contiguous input.
    """
    x = img.as_tensor() if isinstance(img, MetaTensor) else img
    if x.ndim != 4:
        raise ValueError(f"expected (C, X, Y, Z), got shape {tuple(x.shape)}")
    if len(out_shape) != 3 or min(int(s) for s in out_shape) < 1:
        raise ValueError(f"expected a 3D output shape, got {tuple(out_shape)}")
    if kernels not in ("auto", "numpy", "torch"):
        raise ValueError(f"kernels must be 'auto', 'numpy' or 'torch', got {kernels!r}")
    order = sorted(range(3), key=lambda a: -x.stride(a + 1))  # spatial axes, slowest first ([0, 1, 2] for C order)
    to_mem = np.eye(4)[[*order, 3]]  # index in memory order = to_mem @ index
    m = to_mem @ np.asarray(xform, dtype=np.float64) @ to_mem.T
    x = x.permute(0, *(a + 1 for a in order))
    shape = [int(out_shape[a]) for a in order]
    back = (0, *(int(a) + 1 for a in np.argsort(order)))
    out = torch.empty((x.shape[0], *shape), dtype=torch.float32, device=x.device)
    rows = max(1, int(slab_voxels) // max(1, x.shape[0] * shape[1] * shape[2]))
    starts = list(range(0, shape[0], rows))
    extent = np.asarray(shape, dtype=np.float64) - 1.0
    off = np.abs(m[:3, :3] - np.diag(np.diag(m[:3, :3]))) @ extent  # largest shift from off-diagonal terms
    if not bool(np.all(off <= SEPARABLE_TOL_VOXELS)):
        rows = max(1, rows * GENERAL_SLAB_FACTOR)
        for o0 in range(0, shape[0], rows):
            o1 = min(shape[0], o0 + rows)
            out[:, o0:o1].copy_(_general_slab(x, m, shape, o0, o1))
        return out.permute(back)
    plans = [_axis_plan(m[i, i], m[i, 3], int(x.shape[i + 1]), shape[i]) for i in range(3)]
    if kernels == "torch" or (kernels == "auto" and x.device.type != "cpu"):
        for o0 in starts:
            _separable_slab(x, plans, o0, min(shape[0], o0 + rows), out, _interp_axis_torch)
        return out.permute(back)
    xs, outs = x.detach().numpy(), out.numpy()
    local = threading.local()

    def run(o0: int) -> None:
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            scratch = local.scratch = _Scratch()
        interp = functools.partial(_interp_axis_numpy, scratch=scratch)
        _separable_slab(xs, plans, o0, min(shape[0], o0 + rows), outs, interp)

    n_workers = min(len(starts), max(1, min(8, torch.get_num_threads() if workers is None else int(workers))))
    if n_workers == 1:
        for o0 in starts:
            run(o0)
    else:
        with ThreadPoolExecutor(n_workers, thread_name_prefix="volcnn-resample") as pool:
            for _ in pool.map(run, starts):
                pass
    return out.permute(back)


def resample_to_grid(
    values: np.ndarray | torch.Tensor,
    values_affine: np.ndarray,
    out_shape: Sequence[int],
    out_affine: np.ndarray,
    slab_voxels: int = DEFAULT_SLAB_VOXELS,
) -> np.ndarray:
    """Trilinear resampling of a 3D map onto another voxel grid, through world coordinates (:func:`resample_linear`).

    For every output voxel ``j``: ``world = out_affine @ j``, and the value is the map interpolated trilinearly at
    continuous index ``inv(values_affine) @ world``, clamped to the map's grid at its border. Works for any pair of
    affines (LPS, RAS, permuted, oblique, a heat map's coarse grid).

    Args:
        values: ``(nx, ny, nz)`` values (a heat map, a saliency patch).
        values_affine: ``(4, 4)`` index of ``values`` -> world mm.
        out_shape: output ``(X, Y, Z)``.
        out_affine: ``(4, 4)`` output index -> world mm.
        slab_voxels: output voxels per slab (bounds the working memory).

    Returns:
        float32 ``out_shape``.
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if v.ndim != 3:
        raise ValueError(f"expected a 3D map, got shape {tuple(v.shape)}")
    xform = np.linalg.solve(as_affine(values_affine), as_affine(out_affine))
    out = resample_linear(v[None], xform, [int(s) for s in out_shape], slab_voxels=slab_voxels)
    return out[0].numpy()


class ResampleToSpacing(InvertibleTransform):
    """Resample a channel-first MetaTensor to ``pixdim``: ``Spacing(pixdim, mode="bilinear", dtype=float32)``'s
    grid and values (border padding, ``align_corners=False``, ``diagonal=False``), in float32, slab by slab.

    Args:
        pixdim: output voxel size in mm (1 to 3 positive values; a shorter sequence repeats its last value).
        slab_voxels: output voxels interpolated at a time (bounds the working memory).

    Shapes:
        ``(C, X, Y, Z)`` MetaTensor (any real dtype; a plain tensor is taken to have an identity affine)
        -> ``(C, X', Y', Z')`` float32 MetaTensor with the new affine; ``(X', Y', Z')`` and the affine are
        :func:`spacing_geometry`'s. When the grid is unchanged the input's data is returned without a copy
        (cast to float32 if needed). The operation is recorded in ``applied_operations`` and can be inverted
        (trilinear resampling back onto the input grid).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, pixdim: Sequence[float] | float, slab_voxels: int = DEFAULT_SLAB_VOXELS) -> None:
        self.pixdim = _pixdim3(pixdim)
        if int(slab_voxels) < 1:
            raise ValueError(f"slab_voxels must be >= 1, got {slab_voxels}")
        self.slab_voxels = int(slab_voxels)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first (C, X, Y, Z) volume, got shape {tuple(img.shape)}")
        if isinstance(img, MetaTensor) and img.pending_operations:
            raise ValueError("ResampleToSpacing does not support lazy (pending) operations")
        in_shape = tuple(int(s) for s in img.shape[1:])
        src = img.affine if isinstance(img, MetaTensor) else torch.eye(4, dtype=torch.float64)
        geo = spacing_geometry(in_shape, src, self.pixdim)
        data = img.as_tensor() if isinstance(img, MetaTensor) else img
        if geo.unchanged:
            result = data if data.dtype == torch.float32 else data.float()
        else:
            result = resample_linear(data, geo.xform, geo.shape, self.slab_voxels)
        return self._with_meta(img, result, geo.shape, None if geo.unchanged else geo.xform, in_shape, src)

    def _with_meta(
        self,
        img: torch.Tensor,
        result: torch.Tensor,
        out_shape: Sequence[int],
        xform: np.ndarray | None,
        in_shape: Sequence[int],
        src_affine: torch.Tensor,
    ) -> torch.Tensor:
        """``result`` as a MetaTensor carrying ``img``'s meta, the composed affine and this operation's record."""
        meta_info = TraceableTransform.track_transform_meta(
            img,
            sp_size=torch.as_tensor(list(out_shape)),
            affine=None if xform is None else torch.as_tensor(xform, dtype=torch.float64),
            extra_info={
                "mode": "bilinear",
                "padding_mode": "border",
                "dtype": "float32",
                "src_affine": torch.as_tensor(src_affine, dtype=torch.float64).clone(),
            },
            orig_size=tuple(in_shape),
            transform_info=self.get_transform_info(),
            lazy=False,
        )
        out = convert_to_tensor(result, track_meta=get_track_meta())
        return out.copy_meta_from(meta_info) if isinstance(out, MetaTensor) else out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Resample back onto the grid the input had (shape and affine), trilinearly."""
        transform = self.pop_transform(data)
        orig_size = tuple(int(s) for s in transform[TraceKeys.ORIG_SIZE])
        src = np.asarray(transform[TraceKeys.EXTRA_INFO]["src_affine"], dtype=np.float64)
        cur = np.asarray(data.affine if isinstance(data, MetaTensor) else np.eye(4), dtype=np.float64)
        x = data.as_tensor() if isinstance(data, MetaTensor) else data
        xform = np.linalg.solve(cur, src)
        same = tuple(int(s) for s in x.shape[1:]) == orig_size and np.allclose(xform, np.eye(4), atol=AFFINE_TOL)
        back = x.float() if same else resample_linear(x, xform, orig_size, self.slab_voxels)
        out = convert_to_tensor(back, track_meta=get_track_meta())
        if isinstance(out, MetaTensor) and isinstance(data, MetaTensor):
            out.copy_meta_from(data)
            out.affine = torch.as_tensor(src, dtype=torch.float64)
        return out


class ResampleToSpacingd(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`ResampleToSpacing` (the drop-in for ``Spacingd(keys, pixdim, mode="bilinear",
    dtype=np.float32)``).

    Args:
        keys: keys of the ``(C, X, Y, Z)`` volumes.
        pixdim: output voxel size in mm.
        slab_voxels: output voxels interpolated at a time.
        allow_missing_keys: skip absent keys.
    """

    backend = ResampleToSpacing.backend

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float] | float,
        slab_voxels: int = DEFAULT_SLAB_VOXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleToSpacing(pixdim, slab_voxels)

    @property
    def pixdim(self) -> np.ndarray:
        return self.resampler.pixdim

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d
