"""C-ordered float32 ``(X, Y, Z)`` arrays for whole volumes: allocation and fast transposing copies into them.

Readers get voxels slice by slice, ``(Z, Y, X)`` in memory (NIfTI blocks, SimpleITK buffers, DICOM slices);
MONAI and torch take a C-contiguous ``(X, Y, Z)`` array without a copy. numpy's own transposing copy
(``np.ascontiguousarray`` of the transposed volume) writes every element to another cache line and page; the
copies here work tile by tile or plane by plane so that writes stay in cache, spread over :data:`COPY_THREADS`
threads (numpy releases the GIL while it copies). ``python -m pipelines.bench_preprocess`` measures the reader that
uses them against SimpleITK; the figures are in ``pipelines/PERFORMANCE.md``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["COPY_THREADS", "PLANE_TASKS_PER_THREAD", "TILE_BYTES", "BlockCopier", "empty_float32", "touch_pages",
           "xyz_float32"]  # fmt: skip

#: source bytes per transposed tile (about a core's L2 cache): the strided writes of a tile stay in cache
TILE_BYTES = 1 << 18
#: tasks per copy thread when a whole volume in memory is copied into C order (see ``BlockCopier.put_all``)
PLANE_TASKS_PER_THREAD = 8
#: threads copying a volume into C order (the copy is memory-bound: two get most of what more would)
COPY_THREADS = 2


def _zyx_block_into_xyz(
    out: np.ndarray,
    block: np.ndarray,
    z0: int,
    y0: int = 0,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Write ``block`` ``(n, m, X)`` into ``out[:, y0:y0 + m, z0:z0 + n]``, ``out`` ``(X, Y, Z)``.

    Tile by tile of a few ``Y`` rows (about :data:`TILE_BYTES` of source), ``convert`` applied to each tile first;
    the cast to ``out``'s dtype happens on assignment. A whole-array transposing copy (numpy's
    ``ascontiguousarray`` of the transposed volume) is several times slower: each of its writes lands in another
    cache line and page.
    """
    n, m, nx = block.shape
    rows = max(1, TILE_BYTES // max(1, n * nx * block.dtype.itemsize))
    for r0 in range(0, m, rows):
        tile = block[:, r0 : r0 + rows]
        if convert is not None:
            tile = convert(tile)
        out[:, y0 + r0 : y0 + r0 + tile.shape[1], z0 : z0 + n] = tile.transpose(2, 1, 0)


def _zyx_planes_into_xyz(
    out: np.ndarray,
    zyx: np.ndarray,
    y0: int,
    y1: int,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Write the planes ``y0 <= y < y1`` of a whole ``zyx`` ``(Z, Y, X)`` into ``out[:, y, :]``, ``out`` ``(X, Y, Z)``.

    Each ``(Z, X)`` plane is first gathered into a contiguous buffer (a few hundred kB for a CT: it stays in cache),
    ``convert`` applied to it, and then written transposed: every write is a run of ``Z`` contiguous values and
    the strided reads hit the cache. About twice as fast as :func:`_zyx_block_into_xyz` over
    :data:`BLOCK_SLICES`-slice blocks (whose writes are runs of only that many values) when the whole volume is
    in memory; the cast to ``out``'s dtype happens on assignment.
    """
    nz, _, nx = zyx.shape
    plane = np.empty((nz, nx), dtype=zyx.dtype)
    for y in range(y0, y1):
        np.copyto(plane, zyx[:, y, :])
        values = plane if convert is None else convert(plane)
        out[:, y, :] = values.T


class BlockCopier:
    """Copies ``(n, Y, X)`` slice blocks into a C-ordered ``(X, Y, Z)`` array, each block's rows split over threads.

    numpy releases the GIL while it copies, so :data:`COPY_THREADS` threads copy about that many times faster.
    The pool lives for one ``with`` block (a pool kept across calls would not survive a DataLoader's fork).
    """

    def __init__(self, out: np.ndarray, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.out, self.convert = out, convert
        self.threads = max(1, min(COPY_THREADS, os.cpu_count() or 1))
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BlockCopier:
        if self.threads > 1:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="volcnn-copy")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def put(self, block: np.ndarray, z0: int) -> None:
        """Copy ``block`` (slices ``z0 ..``) into place; returns once it is copied (``block`` may then be reused)."""
        ny = block.shape[1]
        if self.pool is None or ny < 2 * self.threads:
            _zyx_block_into_xyz(self.out, block, z0, 0, self.convert)
            return
        bounds = np.linspace(0, ny, self.threads + 1).astype(int)
        jobs = [
            self.pool.submit(_zyx_block_into_xyz, self.out, block[:, a:b], z0, int(a), self.convert)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        for job in jobs:
            job.result()

    def put_all(self, zyx: np.ndarray) -> None:
        """Copy a whole ``(Z, Y, X)`` array, plane by plane of constant ``Y`` (see :func:`_zyx_planes_into_xyz`).

        The planes go to the threads in :data:`PLANE_TASKS_PER_THREAD` tasks per thread, so that the threads stay
        evenly busy around other work in the same pool (the gzip checksum).
        """
        ny = zyx.shape[1]
        step = max(1, -(-ny // (PLANE_TASKS_PER_THREAD * self.threads)))
        bounds = [(y0, min(ny, y0 + step)) for y0 in range(0, ny, step)]
        if self.pool is None:
            for a, b in bounds:
                _zyx_planes_into_xyz(self.out, zyx, a, b, self.convert)
            return
        jobs = [self.pool.submit(_zyx_planes_into_xyz, self.out, zyx, a, b, self.convert) for a, b in bounds]
        for job in jobs:
            job.result()


def empty_float32(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised C-ordered float32 array for a whole volume, in memory from torch's CPU allocator.

    numpy asks the kernel for transparent huge pages (``madvise``) for large arrays. Their first touch is fast
    while the kernel has recently freed huge pages at hand and slow once it has not (in a VM the host backs each
    fresh 2 MB page piece by piece), so filling a new numpy array took anywhere from far less to far more time than
    with plain 4 kB pages (torch's allocator, and SimpleITK's), which took a steady time. Compared by filling new
    arrays on the 2-core development VM, no benchmark command; figures in ``pipelines/PERFORMANCE.md``
    ("Allocating whole-volume arrays"). The array shares the tensor's memory, which it keeps alive.
    """
    return torch.empty(tuple(int(n) for n in shape), dtype=torch.float32).numpy()


def xyz_float32(array: np.ndarray) -> np.ndarray:
    """``array`` ``(X, Y, Z)`` as a C-contiguous float32 ``(X, Y, Z)`` array: itself when it already is one.

    Any other layout (typically the Fortran-ordered transpose of a ``(Z, Y, X)`` array, as SimpleITK and DICOM
    slices give) is copied plane by plane by :data:`COPY_THREADS` threads, several times faster than
    ``np.ascontiguousarray``; values are cast as ``astype(np.float32)`` casts them.
    """
    if array.dtype == np.float32 and array.flags.c_contiguous:
        return array
    if array.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) array, got shape {array.shape}")
    out = empty_float32(array.shape)
    with BlockCopier(out) as copier:
        copier.put_all(array.transpose(2, 1, 0))
    return out


def touch_pages(array: np.ndarray) -> None:
    """Write one element per memory page of the C-contiguous ``array`` (its first write maps the page in)."""
    flat = array.reshape(-1)
    flat[:: max(1, mmap.PAGESIZE // array.itemsize)] = 0
