"""Reading a NIfTI file completely and exactly, fast: the voxels streamed into a C-ordered float32 array.

:func:`load_nifti` returns nibabel's values (``get_fdata(dtype=np.float32)``, scaling included) bit for bit and
nibabel's affine, but reads the file once, :data:`BLOCK_SLICES` slices at a time, inflating ``.nii.gz`` with
zlib directly (or SimpleITK's faster inflater, checked against the gzip CRC) while other threads transpose the
previous block into the output (:mod:`volcnn.io.layout`). A truncated or corrupted file is an error naming the
file, never zeros. Why each piece exists is measured by ``python -m pipelines.bench_preprocess``
(figures in ``pipelines/PERFORMANCE.md``, "Preprocessing" and "NIfTI reading").
"""

from __future__ import annotations

import math
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener
from nibabel.volumeutils import apply_read_scaling

from volcnn.io.layout import BlockCopier, empty_float32, touch_pages, xyz_float32
from volcnn.io.types import Volume, VolumeError

__all__ = ["BLOCK_SLICES", "GZIP_MAX_OUT_BYTES", "GZIP_READ_BYTES", "SITK_GZIP", "load_nifti"]

#: slices read and converted at a time: bounds the reader's temporaries to a few slices
BLOCK_SLICES = 32
#: compressed bytes read per step from a ``.gz`` file, and the most decompressed bytes produced per step
GZIP_READ_BYTES = 1 << 20
GZIP_MAX_OUT_BYTES = 1 << 22
#: read ``.nii.gz`` voxels through SimpleITK (whose zlib-ng inflates faster than CPython's zlib; figures in
#: ``pipelines/PERFORMANCE.md``, "NIfTI reading") when the file allows it and the bytes check out against the gzip
#: trailer; see :func:`_read_gzip_voxels_sitk`
SITK_GZIP = True
#: two affines "disagree" when they map some corner of the volume more than this apart (mm)
AFFINE_AGREEMENT_MM = 1e-3


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
    with _PrefetchedBlocks(proxy.file_like, offset, sizes) as blocks, BlockCopier(out, convert) as copier:
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

    SimpleITK's zlib-ng inflates a CT faster than CPython's zlib (``pipelines/PERFORMANCE.md``, "NIfTI reading"), but
    SimpleITK is only trusted with the bytes: the voxel buffer it returns must have nibabel's dtype and size, and the
    header bytes followed by that buffer must have the CRC32 and length that the gzip trailer records for the whole
    (single-member) file, i.e. they are the file's bytes. Geometry and everything else come from nibabel. ``convert``
    (see :func:`_nifti_read_scaling`) still applies: int32/int64/float64 go through float64 as in nibabel. Memory:
    SimpleITK's buffer (half of ``out`` for int16) lives until the copy is done; SimpleITK's reader itself peaks at
    about twice that.

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
        prefault = threading.Thread(target=touch_pages, args=(out,), name="volcnn-prefault", daemon=True)
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
    with BlockCopier(out, convert) as copier:
        crc = copier.pool.submit(zlib.crc32, data, zlib.crc32(head)) if copier.pool is not None else None
        copier.put_all(zyx.reshape(nz, ny, nx))
        crc_found = crc.result() if crc is not None else zlib.crc32(data, zlib.crc32(head))
    return bool(crc_found == crc_expected)


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

    Faster than :mod:`gzip`'s buffered reader on a CT (``pipelines/PERFORMANCE.md``, "NIfTI reading"). Concatenated gzip
    members are read as one stream, as :mod:`gzip` does. :meth:`finish` reads the current member to its end, so that
    zlib checks its CRC32 and length: a corrupted or cut file is an error instead of wrong voxel values.
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
