"""Reading one CT volume (NIfTI file or DICOM series folder) into HU with a RAS affine, validated.

A reader never returns a volume whose geometry or values differ from what was acquired: when it cannot be
sure it raises :class:`VolumeError` naming the file and the problem. DICOM series are read and validated by
:mod:`volcnn.io.dicom`. Non-fatal observations (sform/qform disagreement, values that do not look like HU,
replaced NaN voxels, ...) are listed in :attr:`Volume.warnings` and logged.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.volumeutils import apply_read_scaling

__all__ = [
    "Volume",
    "VolumeError",
    "load_volume",
    "load_nifti",
    "load_metaimage",
    "load_dicom_series",
    "is_volume_path",
    "xyz_float32",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: MetaImage, the format LUNA16 ships its scans in
METAIMAGE_SUFFIXES = (".mhd", ".mha")
#: two affines "disagree" when they map some corner of the volume more than this apart (mm)
AFFINE_AGREEMENT_MM = 1e-3
#: what :func:`load_volume` does with NaN/Inf voxels
NAN_POLICIES = ("refuse", "replace")
#: fill value for NaN/Inf voxels when a volume has no finite voxel at all
NAN_FILL_HU = -1024.0
#: slices read and converted at a time: bounds the reader's temporaries to a few slices
BLOCK_SLICES = 32
#: source bytes per transposed tile (about a core's L2 cache): the strided writes of a tile stay in cache
TILE_BYTES = 1 << 18
#: bytes per numerical check chunk in :func:`_check_volume`
CHECK_CHUNK_BYTES = 1 << 22
#: compressed bytes read per step from a ``.gz`` file, and the most decompressed bytes produced per step
GZIP_READ_BYTES = 1 << 20
GZIP_MAX_OUT_BYTES = 1 << 22
#: tasks per copy thread when a whole volume in memory is copied into C order (see ``_BlockCopier.put_all``)
PLANE_TASKS_PER_THREAD = 8
#: threads copying a volume into C order (the copy is memory-bound: two get most of what more would)
COPY_THREADS = 2
#: read ``.nii.gz`` voxels through SimpleITK (whose zlib-ng inflates about 3x faster than CPython's zlib) when
#: the file allows it and the bytes check out against the gzip trailer; see :func:`_read_gzip_voxels_sitk`
SITK_GZIP = True


class VolumeError(ValueError):
    """A volume could not be read exactly; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Volume:
    """A CT volume in Hounsfield units.

    Attributes:
        array: float32 ``(X, Y, Z)`` voxel values in HU, in the stored voxel order; C-contiguous when returned
            by :func:`load_volume` (what MONAI and torch take without a copy).
        affine: float64 ``(4, 4)`` voxel index -> world RAS millimetres.
        path: where it was read from.
        kind: ``"nifti"``, ``"metaimage"`` or ``"dicom"``.
        warnings: non-fatal observations about the input.
    """

    array: np.ndarray
    affine: np.ndarray
    path: str
    kind: str
    warnings: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along the three array axes, ``(3,)``."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """True for a NIfTI or MetaImage file name, or a folder (a DICOM series)."""
    p = str(path)
    return p.endswith(NIFTI_SUFFIXES + METAIMAGE_SUFFIXES) or os.path.isdir(p)


def load_volume(path: str | os.PathLike[str], nan_policy: str = "refuse") -> Volume:
    """Read a NIfTI file, a MetaImage file or a DICOM series folder; see :class:`Volume`.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mhd``/``.mha`` file or a folder holding one DICOM series.
        nan_policy: ``"refuse"`` (default): NaN/Inf voxels are an error; ``"replace"``: they are set to the
            minimum finite value of the volume (-1024 if there is none) and the count is recorded in
            ``Volume.warnings``.

    Raises:
        VolumeError: naming the file and the problem.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "does not exist")
    if p.is_dir():
        vol = load_dicom_series(p)
    elif str(p).endswith(NIFTI_SUFFIXES):
        vol = load_nifti(p)
    elif str(p).endswith(METAIMAGE_SUFFIXES):
        vol = load_metaimage(p)
    else:
        raise VolumeError(p, "not a NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) file, or a DICOM series folder")
    if vol.array.ndim == 3:  # a DICOM series comes as a transposed (Z, Y, X) array; the other checks need 3D
        vol.array = xyz_float32(vol.array)
    _check_volume(vol, nan_policy)
    return vol


def load_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file completely (a truncated file is an error, not zeros) as float32 ``(X, Y, Z)``.

    Returns a C-ordered float32 ``(X, Y, Z)`` array with the values of nibabel's ``get_fdata(dtype=np.float32)``
    bit for bit (``scl_slope``/``scl_inter`` applied as nibabel does), and nibabel's affine. The voxels are
    streamed from the file (inflated on the fly by zlib for ``.nii.gz``) :data:`BLOCK_SLICES` slices at a time,
    converted and transposed into the output by :data:`COPY_THREADS` threads: peak memory is the output plus a
    few slices. An unscaled single-member ``.nii.gz`` is instead inflated by SimpleITK (faster, and checked
    against the gzip CRC32; see :func:`_read_gzip_voxels_sitk`), which holds the stored voxels in memory until
    they are copied. An ``(X, Y, Z, 1)`` file is read as ``(X, Y, Z)``.
    """
    try:
        img: Any = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        elif len(shape) != 3:
            raise VolumeError(path, f"expected a 3D volume, got shape {tuple(img.shape)}")
        proxy = img.dataobj
        if isinstance(proxy, ArrayProxy) and proxy.order == "F":
            array = _read_nifti_voxels(proxy, shape, path)
        else:  # not a file-backed proxy (never for nib.load of a NIfTI file): nibabel's own reader
            data = img.get_fdata(dtype=np.float32).reshape(shape, order="A")
            array = xyz_float32(np.asarray(data))
        affine = np.asarray(img.affine, dtype=np.float64)
        warnings = _sform_qform_warnings(img.header, shape)
    except VolumeError:
        raise
    except Exception as e:  # nibabel, gzip and zlib raise many types for damaged files
        raise VolumeError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    return Volume(array=array, affine=affine, path=str(path), kind="nifti", warnings=warnings)


def _read_nifti_voxels(proxy: Any, shape: tuple[int, ...], path: str | os.PathLike[str]) -> np.ndarray:
    """The voxels of a NIfTI ``ArrayProxy`` as a C-ordered float32 ``(X, Y, Z)`` array, read slice block by block.

    NIfTI stores voxels in Fortran order, so ``BLOCK_SLICES`` consecutive z slices are one contiguous run of
    bytes: a ``(n, Y, X)`` C array, transposed tile by tile into ``out[:, :, z0:z0 + n]``.
    """
    nx, ny, nz = shape
    dtype = np.dtype(proxy.dtype)
    if dtype.kind not in "iuf":
        raise VolumeError(path, f"unsupported NIfTI voxel type {dtype} (expected integer or real values)")
    convert = _nifti_read_scaling(proxy)
    out = empty_float32((nx, ny, nz))
    if SITK_GZIP and str(proxy.file_like).endswith(".gz") and _read_gzip_voxels_sitk(proxy, shape, convert, out):
        return out
    slice_bytes = nx * ny * dtype.itemsize
    starts = range(0, nz, BLOCK_SLICES)
    offset = int(proxy.offset)
    sizes = [min(BLOCK_SLICES, nz - z0) * slice_bytes for z0 in starts]
    with _PrefetchedBlocks(proxy.file_like, offset, sizes) as blocks, _BlockCopier(out, convert) as copier:
        for z0, (view, got) in zip(starts, blocks, strict=True):
            if got < len(view):
                raise VolumeError(
                    path,
                    f"cannot read NIfTI (truncated: {nz * slice_bytes} bytes of voxel data expected from byte "
                    f"{offset}, the file holds {z0 * slice_bytes + got})",
                )
            copier.put(np.frombuffer(view, dtype=dtype).reshape(min(BLOCK_SLICES, nz - z0), ny, nx), z0)
    return out


def _read_gzip_voxels_sitk(
    proxy: Any, shape: tuple[int, ...], convert: Callable[[np.ndarray], np.ndarray], out: np.ndarray
) -> bool:
    """Fill ``out`` (C-ordered float32 ``(X, Y, Z)``) with an unscaled ``.nii.gz``'s voxels inflated by SimpleITK.

    SimpleITK's zlib-ng inflates a CT about three times faster than CPython's zlib, but SimpleITK is only trusted
    with the bytes: the voxel buffer it returns must have nibabel's dtype and size, and the header bytes followed
    by that buffer must have the CRC32 and length that the gzip trailer records for the whole (single-member)
    file, i.e. they are the file's bytes. Geometry and everything else come from nibabel. ``convert`` (see
    :func:`_nifti_read_scaling`) still applies: int32/int64/float64 go through float64 as in nibabel. Memory:
    SimpleITK's buffer (half of ``out`` for int16) lives until the copy is done; SimpleITK's reader itself peaks
    at about twice that.

    Returns:
        False, ``out`` unspecified (the caller then streams the file with zlib, which also gives the clear error
        for a damaged file), when the file is scaled, not native-endian, not one gzip member, refused by
        SimpleITK, or any check fails.
    """
    dtype = np.dtype(proxy.dtype)
    if not dtype.isnative or float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0:
        return False
    path, offset = str(proxy.file_like), int(proxy.offset)
    n_voxels = math.prod(shape)
    try:
        with open(path, "rb") as f:
            f.seek(-8, os.SEEK_END)
            crc_expected, size_mod = np.frombuffer(f.read(8), dtype="<u4").tolist()
        if size_mod != (offset + n_voxels * dtype.itemsize) % 2**32:
            return False
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        # SimpleITK releases the GIL while it reads: meanwhile another thread maps ``out``'s pages in (the kernel
        # zero-fills each page on its first write), work the copy below would otherwise do on the critical path
        prefault = threading.Thread(target=_touch_pages, args=(out,), name="volcnn-prefault", daemon=True)
        prefault.start()
        try:
            image = sitk.ReadImage(path)
        finally:
            prefault.join()
        zyx = sitk.GetArrayViewFromImage(image)  # a view of SimpleITK's buffer, alive while ``image`` is
        if zyx.dtype != dtype or zyx.size != n_voxels or not zyx.flags.c_contiguous:
            return False
        with _GzipStream(path, 0) as stream:
            head = memoryview(bytearray(offset))
            if stream.readinto(head) != offset:
                return False
    except Exception:  # SimpleITK refuses what nibabel reads, ...: stream it instead
        return False
    nx, ny, nz = shape
    data = zyx.data  # the bytes SimpleITK read, checksummed alongside the copy (zlib.crc32 releases the GIL)
    with _BlockCopier(out, convert) as copier:
        crc = copier.pool.submit(zlib.crc32, data, zlib.crc32(head)) if copier.pool is not None else None
        copier.put_all(zyx.reshape(nz, ny, nx))
        crc_found = crc.result() if crc is not None else zlib.crc32(data, zlib.crc32(head))
    return bool(crc_found == crc_expected)


def _touch_pages(array: np.ndarray) -> None:
    """Write one element per memory page of the C-contiguous ``array`` (its first write maps the page in)."""
    flat = array.reshape(-1)
    flat[:: max(1, mmap.PAGESIZE // array.itemsize)] = 0


def _nifti_read_scaling(proxy: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Stored values -> what ``np.asanyarray(proxy, dtype=np.float32)`` holds, before its final cast to float32.

    The same steps as nibabel's ``ArrayProxy._get_scaled(dtype=np.float32)`` (slope/intercept types,
    :func:`nibabel.volumeutils.apply_read_scaling`, promotion), applied to one tile at a time: each voxel goes
    through the same float operations, so after the cast to float32 the values are bit-identical.
    """
    slope = np.asanyarray(proxy.slope)
    inter = np.asanyarray(proxy.inter)
    if np.can_cast(slope, np.float32):
        slope = slope.astype(np.float32)
    if np.can_cast(inter, np.float32):
        inter = inter.astype(np.float32)

    def convert(raw: np.ndarray) -> np.ndarray:
        scaled = apply_read_scaling(raw, slope, inter)
        wide = np.promote_types(scaled.dtype, np.float32)
        # nibabel goes through ``wide`` (float64 for int32/int64 and scaled values) before float32; for float32
        # the cast on assignment into the output is that same cast, so no temporary is made
        return scaled if wide == np.float32 else scaled.astype(wide, copy=False)

    return convert


class _PlainStream:
    """Sequential reads of a file (through nibabel's ``ImageOpener``) from byte ``offset``."""

    def __init__(self, file_like: Any, offset: int) -> None:
        self._opener = ImageOpener(file_like)
        self._opener.seek(offset)

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` as far as the file allows; the number of bytes read."""
        done = 0
        while done < len(view):
            n = self._opener.readinto(view[done:])
            if not n:
                break
            done += n
        return done

    def finish(self) -> None:
        """Nothing to verify for an uncompressed file."""

    def close(self) -> None:
        self._opener.close()

    def __enter__(self) -> _PlainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _GzipStream:
    """Sequential reads of a gzip file's decompressed bytes from byte ``offset``, by :mod:`zlib` directly.

    About a third faster than :mod:`gzip`'s buffered reader on a CT. Concatenated gzip members are read as one
    stream, as :mod:`gzip` does. :meth:`finish` reads the current member to its end, so that zlib checks its
    CRC32 and length: a corrupted or cut file is an error instead of wrong voxel values.
    """

    def __init__(self, file_like: str | os.PathLike[str], offset: int) -> None:
        self._file = open(file_like, "rb", buffering=0)  # noqa: SIM115  (closed by close())
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._out = memoryview(b"")
        skip = memoryview(bytearray(min(offset, GZIP_READ_BYTES)))
        while offset > 0:  # the header and extensions
            n = self.readinto(skip[: min(offset, len(skip))])
            if not n:
                break
            offset -= n

    def _more(self) -> bool:
        """Decompress the next piece into ``self._out``; False at the end of the input."""
        while True:
            if self._d.eof:  # end of a member: go on with the next one, if any
                data = self._d.unused_data or self._file.read(GZIP_READ_BYTES)
                if not data:
                    return False
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                data = self._d.unconsumed_tail or self._file.read(GZIP_READ_BYTES)
                if not data:  # the input ends inside a member: what zlib still holds, then the end
                    rest = self._d.flush()
                    self._out = memoryview(rest)
                    return bool(rest)
            piece = self._d.decompress(data, GZIP_MAX_OUT_BYTES)
            if piece:
                self._out = memoryview(piece)
                return True

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with decompressed bytes as far as the file allows; the number of bytes read."""
        done = 0
        while done < len(view):
            if not len(self._out) and not self._more():
                break
            n = min(len(view) - done, len(self._out))
            view[done : done + n] = self._out[:n]
            self._out = self._out[n:]
            done += n
        return done

    def finish(self) -> None:
        """Decompress (and drop) the rest of the current member, so that zlib verifies its checksum and length.

        Raises:
            zlib.error: the checksum or length does not match (a corrupted file).
            EOFError: the file ends before the member does.
        """
        while not self._d.eof:
            data = self._d.unconsumed_tail or self._file.read(GZIP_READ_BYTES)
            if not data:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            self._d.decompress(data, GZIP_MAX_OUT_BYTES)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _GzipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _voxel_stream(file_like: Any, offset: int) -> _PlainStream | _GzipStream:
    """A reader of the file's bytes from ``offset``: zlib for a ``.gz`` path, nibabel's opener otherwise."""
    if isinstance(file_like, (str, os.PathLike)) and str(file_like).endswith(".gz"):
        return _GzipStream(file_like, offset)
    return _PlainStream(file_like, offset)


class _PrefetchedBlocks:
    """Blocks of a file's bytes from ``offset``, read by a background thread ``ahead`` blocks ahead.

    Iterating gives ``(view, n_read)`` per size in ``sizes``; ``n_read < len(view)`` (the file ends early) is the
    last item. A view is valid until the next one is asked for (its buffer is then reused). Decompression (zlib
    releases the GIL) thus overlaps the caller's work on the previous block. After the last block the thread
    calls the stream's ``finish`` (the gzip checksum); any error of the thread is raised in the caller. Leaving
    the ``with`` block stops the thread and closes the file.
    """

    def __init__(self, file_like: Any, offset: int, sizes: list[int], ahead: int = 1) -> None:
        self._file_like, self._offset, self._sizes = file_like, offset, sizes
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(ahead + 1 if sizes else 0):
            self._free.put(bytearray(max(sizes)))
        self._filled: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="volcnn-nifti-read", daemon=True)

    def _work(self) -> None:
        try:
            with _voxel_stream(self._file_like, self._offset) as stream:
                for size in self._sizes:
                    buf = self._free.get()
                    if self._stop.is_set():
                        return
                    view = memoryview(buf)[:size]
                    got = stream.readinto(view)
                    self._filled.put((view, got))
                    if got < size:
                        return
                stream.finish()
            self._filled.put(None)
        except BaseException as e:  # handed to the caller, raised there
            self._filled.put(e)

    def __enter__(self) -> _PrefetchedBlocks:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[tuple[memoryview, int]]:
        for _ in self._sizes:
            item = self._filled.get()
            if isinstance(item, BaseException):
                raise item
            assert item is not None
            view, got = item
            yield view, got
            self._free.put(cast(bytearray, view.obj))  # the view's buffer, free for the next read
            if got < len(view):
                return
        item = self._filled.get()  # None once the stream is finished (checksum verified)
        if isinstance(item, BaseException):
            raise item

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._free.put(bytearray())  # wakes the thread if it waits for a buffer
        self._thread.join()


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


class _BlockCopier:
    """Copies ``(n, Y, X)`` slice blocks into a C-ordered ``(X, Y, Z)`` array, each block's rows split over threads.

    numpy releases the GIL while it copies, so :data:`COPY_THREADS` threads copy about that many times faster.
    The pool lives for one ``with`` block (a pool kept across calls would not survive a DataLoader's fork).
    """

    def __init__(self, out: np.ndarray, convert: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.out, self.convert = out, convert
        self.threads = max(1, min(COPY_THREADS, os.cpu_count() or 1))
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _BlockCopier:
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
    fresh 2 MB page piece by piece): on the 2-core development VM filling a new 196 MB array took 0.02 to 0.66 s,
    and the first few hundred MB of a process were the fast ones. Plain 4 kB pages (torch's allocator, and
    SimpleITK's) took a steady 0.09 to 0.15 s. The array shares the tensor's memory, which it keeps alive.
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
    with _BlockCopier(out) as copier:
        copier.put_all(array.transpose(2, 1, 0))
    return out


def _sform_qform_warnings(header: Any, shape: tuple[int, ...]) -> list[str]:
    """A warning when both sform and qform are set (code > 0) and place the volume differently."""
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if sform is None or qform is None or not scode or not qcode:
        return []
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    diff = float(np.max(np.linalg.norm((corners @ (sform - qform).T)[:, :3], axis=1)))
    if diff <= AFFINE_AGREEMENT_MM:
        return []
    return [
        f"sform (code {int(scode)}) and qform (code {int(qcode)}) disagree by up to {diff:.3f} mm at the volume's "
        "corners; using the sform (as nibabel does)"
    ]


def load_dicom_series(folder: str | os.PathLike[str]) -> Volume:
    """Read the single CT series in ``folder`` (see :func:`volcnn.io.dicom.load_dicom_files`), in HU, RAS affine.

    Refuses a folder with no series or several series (naming their uid hashes), and any series that fails
    the checks of :mod:`volcnn.io.dicom` (missing or duplicate slices, truncated files, ...).
    """
    from volcnn.io.dicom import load_series_folder

    return load_series_folder(folder)


def load_metaimage(path: str | os.PathLike[str]) -> Volume:
    """Read a MetaImage (``.mhd`` + ``.raw``, or ``.mha``) completely through SimpleITK, with a RAS affine.

    A data file shorter than the header says is an error (SimpleITK: "data not read completely").
    """
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise VolumeError(path, f"cannot read MetaImage ({' '.join(lines[-2:])})") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        size = tuple(image.GetSize())
        raise VolumeError(path, f"expected a 3D single-channel volume, got size {size}")
    return _from_sitk(image, path, "metaimage")


def _from_sitk(image: Any, path: str | os.PathLike[str], kind: str) -> Volume:
    """A SimpleITK image (LPS physical space) as a :class:`Volume` ``(X, Y, Z)`` (C-ordered float32), RAS affine."""
    import SimpleITK as sitk

    # a view of SimpleITK's (Z, Y, X) buffer (valid while ``image`` is), copied once into (X, Y, Z) float32
    array = xyz_float32(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine_lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return Volume(array=array, affine=affine, path=str(path), kind=kind)


def _check_volume(vol: Volume, nan_policy: str = "refuse") -> None:
    """Refuse a non-3D volume or a degenerate affine; refuse or replace NaN/Inf; warn on non-HU values.

    The value checks read ``vol.array`` ``(X, Y, Z)`` in chunks of :data:`CHECK_CHUNK_BYTES` along ``X``, with no
    full-size temporary: the minimum and maximum (NaN propagates into both, and +-Inf shows in one) decide
    whether any voxel is non-finite, and only then are the non-finite voxels counted.
    """
    if vol.array.ndim != 3 or min(vol.array.shape) < 2:
        raise VolumeError(vol.path, f"expected a 3D volume, got shape {vol.array.shape} (a single slice?)")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise VolumeError(vol.path, "degenerate or non-finite affine (voxel-to-world geometry)")
    lo, hi = _min_max(vol.array)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = sum(int(c.size - np.count_nonzero(np.isfinite(c))) for c in _chunks(vol.array))
        if nan_policy != "replace":
            raise VolumeError(vol.path, f"{bad} NaN/Inf voxels (load with nan_policy='replace' to replace them)")
        finite_mins = [float(c[f].min()) for c in _chunks(vol.array) if (f := np.isfinite(c)).any()]
        fill = min(finite_mins) if finite_mins else NAN_FILL_HU
        for c in _chunks(vol.array):
            c[~np.isfinite(c)] = fill
        vol.warnings.append(f"replaced {bad} NaN/Inf voxels with {fill:g}")
        lo, hi = _min_max(vol.array)
    vol.warnings.extend(_hu_warnings(vol.array, lo, hi))
    for w in vol.warnings:
        logger.warning("%s: %s", vol.path, w)


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``array`` along its first axis, about :data:`CHECK_CHUNK_BYTES` each (contiguous for C order)."""
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, CHECK_CHUNK_BYTES // row_bytes)
    for i in range(0, array.shape[0], step):
        yield array[i : i + step]


def _min_max(array: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a non-empty array in one pass over memory (each chunk is reduced twice while in cache).

    NaN anywhere makes both NaN, as ``np.min``/``np.max`` do.
    """
    lows, highs = zip(*((c.min(), c.max()) for c in _chunks(array)), strict=True)
    return float(np.min(lows)), float(np.max(highs))


def _hu_warnings(array: np.ndarray, lo: float, hi: float) -> list[str]:
    """Warnings for values that do not look like CT in Hounsfield units (air is near -1000 HU).

    Args:
        array: the finite voxel values ``(X, Y, Z)``.
        lo, hi: their minimum and maximum.
    """
    if lo < 0:
        return []
    if hi < 100:
        return [f"values lie in [{lo:g}, {hi:g}]: looks like a mask or probability map, not CT in HU"]
    if hi <= 255 and all(bool(np.all(np.mod(c, 1) == 0)) for c in _chunks(array)):
        return [f"integer values in [{lo:g}, {hi:g}]: looks like an 8-bit image or label map, not CT in HU"]
    return [
        f"no negative values (range [{lo:g}, {hi:g}]): CT in HU has air near -1000; MR, or stored values "
        "without RescaleIntercept?"
    ]
