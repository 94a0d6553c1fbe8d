"""Reading a DICOM CT series into HU with a RAS affine, validated before any volume is returned.

Every slice is read with pydicom and checked: one SeriesInstanceUID, Modality CT (unless ``allow_non_ct``),
the same ImageOrientationPatient, Rows/Columns and PixelSpacing on every slice, slice positions (projected on
the slice normal) that are distinct, collinear and evenly spaced (a missing or duplicated slice is refused),
pixel data complete and decodable. RescaleSlope/RescaleIntercept are applied per slice, so a series whose
scaling changes from slice to slice comes out in exact HU.

Reader choice, by measurement: ``python -m pipelines.bench_ingest`` times this pydicom reader, all checks included,
against SimpleITK's ImageSeriesReader on the same synthetic series, float32 HU out of both, and checks that the voxel
values are identical (figures in ``pipelines/PERFORMANCE.md``, "DICOM series reading"). pydicom is used because it is as
fast or faster here and it is the one that can be trusted: SimpleITK silently drops a truncated slice file and averages
over a missing slice, and the checks need every header through pydicom anyway, so reading each file once with pydicom
gets the checks and the pixels from the same parsed dataset. Uncompressed 16-bit little-endian slices take a
``numpy.frombuffer`` fast path (bit-exact with ``pixel_array``: BitsStored masking / sign extension); others go through
``pixel_array``. Its price: compressed transfer syntaxes need a pydicom decoder plugin (here JPEG 2000 and RLE decode;
JPEG-LS needs ``pylibjpeg-libjpeg`` or ``python-gdcm``); without one the error names the file and the transfer syntax.

Conventions: DICOM patient coordinates are LPS; the returned affine is RAS (x and y negated). The array is
``(X, Y, Z)``: X runs along a row (increasing column index, IOP's first vector), Y down a column (increasing
row index, IOP's second vector), Z along the slices sorted by position on the normal ``row x col``.
PixelSpacing is ``[spacing between rows, spacing between columns]``, i.e. ``[Y, X]``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from volcnn.core.hashing import short_hash
from volcnn.io.sources import looks_like_dicom
from volcnn.io.types import Volume, VolumeError

__all__ = [
    "SeriesFiles",
    "discover_series",
    "load_dicom_files",
    "load_series_folder",
    "uid_hash",
    "SLICE_SPACING_RTOL",
    "DUPLICATE_POSITION_MM",
    "GEOMETRY_ATOL",
]

logger = logging.getLogger(__name__)

#: relative tolerance on the spacing between consecutive slices, and on the distance of each slice position
#: from the straight, evenly spaced line through the first and last slice (fraction of the slice step)
SLICE_SPACING_RTOL = 0.01
#: two slices closer than this along the normal (mm) are duplicates
DUPLICATE_POSITION_MM = 0.01
#: absolute tolerance on direction cosines (unitless) and PixelSpacing (mm) agreeing between slices
GEOMETRY_ATOL = 1e-4
_NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_DICOMDIR = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def uid_hash(uid: str) -> str:
    """First 12 hex digits of the sha256 of a UID: a stable name for a series that does not expose it."""
    return short_hash(uid)


@dataclass
class SeriesFiles:
    """The files of one DICOM series found in a folder.

    Attributes:
        uid_hash: first 12 hex digits of sha256(SeriesInstanceUID); the UID itself is never exposed.
        files: the series' files, sorted by name (slice order is decided at load time from positions).
        description: SeriesDescription of the first file, or ``""``.
        modality: Modality of the first file, or ``""``.
    """

    uid_hash: str
    files: list[Path] = field(default_factory=list)
    description: str = ""
    modality: str = ""


def discover_series(folder: str | os.PathLike[str]) -> list[SeriesFiles]:
    """Group the DICOM files directly inside ``folder`` by SeriesInstanceUID (headers only).

    Files that are not DICOM (no "DICM" marker and no ``.dcm`` suffix) and a DICOMDIR are ignored; a
    DICOM-looking file without a SeriesInstanceUID (truncated, damaged) is an error; sub-folders are not searched.

    Args:
        folder: a folder.

    Returns:
        One :class:`SeriesFiles` per series, in order of their first file name.

    Raises:
        VolumeError: the folder does not exist, or a DICOM-looking file cannot be parsed (naming the file).
    """
    return [info for info, _ in _group_folder(folder, headers_only=True)]


def _group_folder(folder: str | os.PathLike[str], headers_only: bool) -> list[tuple[SeriesFiles, list[Any]]]:
    """Series of ``folder`` with their parsed datasets (headers only, or whole files), in file-name order."""
    root = Path(folder)
    if not root.is_dir():
        raise VolumeError(root, "not a folder")
    groups: dict[str, tuple[SeriesFiles, list[Any]]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not looks_like_dicom(path):
            continue
        try:
            if headers_only:
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    force=path.suffix.lower() == ".dcm",
                    specific_tags=["SeriesInstanceUID", "SeriesDescription", "Modality"],
                )
            else:
                ds = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise VolumeError(path, f"cannot read DICOM file ({type(e).__name__}: {e})") from e
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            if getattr(ds, "file_meta", None) is not None and ds.file_meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
                logger.debug("ignoring DICOMDIR %s", path)
                continue
            raise VolumeError(path, "no SeriesInstanceUID: truncated or damaged DICOM file, or not an image")
        key = str(uid)
        if key not in groups:
            info = SeriesFiles(
                uid_hash=uid_hash(key),
                description=str(ds.get("SeriesDescription", "")),
                modality=str(ds.get("Modality", "")),
            )
            groups[key] = (info, [])
        groups[key][0].files.append(path)
        groups[key][1].append(ds)
    return list(groups.values())


def load_series_folder(folder: str | os.PathLike[str], *, allow_non_ct: bool = False) -> Volume:
    """Read the single series in ``folder``, parsing each file once; see :func:`load_dicom_files`.

    Raises:
        VolumeError: no series ("no DICOM series found"), several series ("N DICOM series in one folder"
            with their uid hashes), or any problem of :func:`load_dicom_files`.
    """
    series = _group_folder(folder, headers_only=False)
    if not series:
        raise VolumeError(folder, "no DICOM series found in this folder")
    if len(series) > 1:
        listing = ", ".join(f"{info.uid_hash} ({len(info.files)} files)" for info, _ in series)
        raise VolumeError(
            folder, f"{len(series)} DICOM series in one folder ({listing}); give one series folder at a time"
        )
    info, datasets = series[0]
    return _build_volume(info.files, datasets, folder, allow_non_ct)


def _floats(ds: Any, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeError(path, f"missing {keyword}; cannot place the slice in space")
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise VolumeError(path, f"unreadable {keyword} {values!r}") from e
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(path, f"{keyword} must be {n} finite numbers, got {values!r}")
    return arr


def _decode(ds: Any, path: Path) -> np.ndarray:
    """Stored pixel values of one slice, ``(rows, columns)``; errors name the file."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if "PixelData" not in ds:
        raise VolumeError(path, "no pixel data")
    if tsyntax is not None and tsyntax.is_compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            available = get_decoder(tsyntax).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise VolumeError(
                path,
                f"compressed transfer syntax {tsyntax.name} ({tsyntax}) and no decoder installed for it "
                "(install pylibjpeg with the matching plugin, or python-gdcm)",
            )
    if tsyntax is not None and tsyntax in _NATIVE_LE and int(ds.get("BitsAllocated", 0)) == 16:
        return _decode_native16(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises ValueError, RuntimeError, NotImplementedError... for bad data
        what = (
            f" in transfer syntax {tsyntax.name} ({tsyntax})" if tsyntax is not None and tsyntax.is_compressed else ""
        )
        raise VolumeError(path, f"cannot decode pixel data{what} ({type(e).__name__}: {e})") from e
    if arr.ndim != 2:
        raise VolumeError(path, f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    return arr


def _decode_native16(ds: Any, path: Path) -> np.ndarray:
    """Fast path for uncompressed little-endian 16-bit slices, bit-exact with pydicom's ``pixel_array``.

    Values above BitsStored are masked off (unsigned) or sign-extended from HighBit (signed), as pydicom does.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    expected = rows * cols * 2
    if len(data) < expected:
        raise VolumeError(
            path, f"the number of bytes of pixel data is less than expected ({len(data)} vs {expected} bytes)"
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    bits = int(ds.get("BitsStored", 16))
    if bits < 16:
        if signed:
            shift = 16 - bits
            arr = (arr << shift) >> shift
        else:
            arr = arr & np.uint16((1 << bits) - 1)
    return arr


def load_dicom_files(
    files: list[Path] | list[str] | tuple[str | Path, ...],
    source: str | os.PathLike[str],
    *,
    allow_non_ct: bool = False,
) -> Volume:
    """Read the slices of one series as a validated float32 HU volume ``(X, Y, Z)`` with a RAS affine.

    Args:
        files: the series' slice files, in any order (e.g. ``SeriesFiles.files``).
        source: what to name in errors about the whole series and as ``Volume.path`` (usually the folder).
        allow_non_ct: accept a Modality other than CT (values are then the rescaled stored values, not HU;
            a warning says so).

    Returns:
        The :class:`Volume` (``kind="dicom"``); ``array[x, y, z]`` is column ``x``, row ``y`` of the
        ``z``-th slice in position order.

    Raises:
        VolumeError: naming the file (or ``source``) and the problem, for any inconsistency listed in the
            module docstring.
    """
    paths = [Path(f) for f in files]
    if len(paths) < 2:
        raise VolumeError(source, f"series has {len(paths)} slice file(s); a 3D volume needs at least 2")
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p, force=p.suffix.lower() == ".dcm"))
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise VolumeError(p, f"cannot read DICOM file ({type(e).__name__}: {e})") from e
    return _build_volume(paths, datasets, source, allow_non_ct)


def _build_volume(paths: list[Path], datasets: list[Any], source: str | os.PathLike[str], allow_non_ct: bool) -> Volume:
    """Validate parsed slices and assemble the volume; see :func:`load_dicom_files`."""
    if len(paths) < 2:
        raise VolumeError(source, f"series has {len(paths)} slice file(s); a 3D volume needs at least 2")
    warnings: list[str] = []

    first, p0 = datasets[0], paths[0]
    series_uid = first.get("SeriesInstanceUID")
    modality = str(first.get("Modality", ""))
    if modality != "CT":
        if not allow_non_ct:
            raise VolumeError(
                p0, f"Modality is {modality or 'missing'!r}, not CT; refusing to read it as HU (allow_non_ct=True)"
            )
        warnings.append(f"Modality {modality or 'missing'!r}: values are rescaled stored values, not HU")
    iop0 = _floats(first, "ImageOrientationPatient", 6, p0)
    row_cos, col_cos = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise VolumeError(p0, f"ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors")
    normal = np.cross(row_cos, col_cos)
    spacing0 = _floats(first, "PixelSpacing", 2, p0)  # [row spacing (Y), column spacing (X)]
    if np.any(spacing0 <= 0):
        raise VolumeError(p0, f"PixelSpacing {spacing0.tolist()} is not positive")
    shape0 = (int(first.get("Rows", 0)), int(first.get("Columns", 0)))
    if min(shape0) < 1:
        raise VolumeError(p0, f"Rows/Columns {shape0} missing or zero")

    positions = np.empty((len(paths), 3))
    for i, (ds, p) in enumerate(zip(datasets, paths, strict=True)):
        if ds.get("SeriesInstanceUID") != series_uid:
            raise VolumeError(p, f"belongs to another series than {p0.name} (SeriesInstanceUID differs)")
        if str(ds.get("Modality", "")) != modality:
            raise VolumeError(p, f"Modality {ds.get('Modality')!r} differs from {modality!r} in {p0.name}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(p, "multi-frame (enhanced) DICOM is not supported; give one frame per file")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(p, f"SamplesPerPixel {ds.get('SamplesPerPixel')}: not a grayscale CT slice")
        if i:
            iop = _floats(ds, "ImageOrientationPatient", 6, p)
            if np.max(np.abs(iop - iop0)) > GEOMETRY_ATOL:
                raise VolumeError(
                    p, f"ImageOrientationPatient {iop.tolist()} differs from {iop0.tolist()} in {p0.name}"
                )
            shape = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
            if shape != shape0:
                raise VolumeError(p, f"Rows/Columns {shape} differ from {shape0} in {p0.name}")
            spacing = _floats(ds, "PixelSpacing", 2, p)
            if np.max(np.abs(spacing - spacing0)) > GEOMETRY_ATOL:
                raise VolumeError(p, f"PixelSpacing {spacing.tolist()} differs from {spacing0.tolist()} in {p0.name}")
        positions[i] = _floats(ds, "ImagePositionPatient", 3, p)

    # order along the normal, then check distinct, evenly spaced and collinear positions
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist, positions = dist[order], positions[order]
    paths = [paths[i] for i in order]
    datasets = [datasets[i] for i in order]
    steps = np.diff(dist)
    dup = np.flatnonzero(steps < DUPLICATE_POSITION_MM)
    if dup.size:
        k = int(dup[0])
        raise VolumeError(
            source,
            f"duplicate slice position: {paths[k].name} and {paths[k + 1].name} are both at {dist[k]:.3f} mm "
            f"along the normal ({dup.size} duplicate(s))",
        )
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > SLICE_SPACING_RTOL * median)
    if bad.size:
        k = int(bad[0])
        hint = "missing slice(s)?" if steps[k] > median else "extra or misplaced slice?"
        raise VolumeError(
            source,
            f"uneven slice spacing: {steps[k]:.3f} mm between {paths[k].name} and {paths[k + 1].name}, "
            f"median {median:.3f} mm (tolerance {SLICE_SPACING_RTOL:.0%}); {hint}",
        )
    n = len(paths)
    step_vec = (positions[-1] - positions[0]) / (n - 1)
    off_line = np.linalg.norm(positions - (positions[0] + np.arange(n)[:, None] * step_vec), axis=1)
    if off_line.max() > SLICE_SPACING_RTOL * median:
        k = int(np.argmax(off_line))
        raise VolumeError(
            source,
            f"slice positions are not on one line: {paths[k].name} is {off_line[k]:.3f} mm off the line "
            "through the first and last slice",
        )
    tilt = float(np.degrees(np.arccos(np.clip(abs(step_vec @ normal) / np.linalg.norm(step_vec), -1.0, 1.0))))
    if tilt > 0.01:
        warnings.append(f"slices are offset in-plane (gantry tilt {tilt:.2f} deg): the affine is sheared")

    rows, cols = shape0
    out = np.empty((n, rows, cols), dtype=np.float32)  # (Z, Y, X)
    no_rescale = 0
    for k, (ds, p) in enumerate(zip(datasets, paths, strict=True)):
        raw = _decode(ds, p)
        if raw.shape != shape0:
            raise VolumeError(p, f"pixel array shape {raw.shape} differs from Rows/Columns {shape0}")
        slope_v, icpt_v = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope_v is None and icpt_v is None:
            no_rescale += 1
        try:
            slope = float(slope_v) if slope_v is not None and str(slope_v) != "" else 1.0
            icpt = float(icpt_v) if icpt_v is not None and str(icpt_v) != "" else 0.0
        except (TypeError, ValueError) as e:
            raise VolumeError(p, f"unreadable RescaleSlope/RescaleIntercept ({slope_v!r}, {icpt_v!r})") from e
        if not (np.isfinite(slope) and np.isfinite(icpt)) or slope == 0:
            raise VolumeError(p, f"invalid RescaleSlope/RescaleIntercept ({slope}, {icpt})")
        if slope == 1.0:
            np.add(raw, np.float32(icpt), out=out[k], casting="unsafe")
        else:  # float64 so that integer HU stay exact, then float32
            out[k] = raw * slope + icpt
    if no_rescale:
        warnings.append(f"{no_rescale} slice(s) have no RescaleSlope/RescaleIntercept: stored values taken as is")

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * spacing0[1]  # X: along a row, column spacing
    affine_lps[:3, 1] = col_cos * spacing0[0]  # Y: down a column, row spacing
    affine_lps[:3, 2] = step_vec
    affine_lps[:3, 3] = positions[0]
    for w in warnings:
        logger.warning("%s: %s", source, w)
    return Volume(
        array=out.transpose(2, 1, 0), affine=_LPS_TO_RAS @ affine_lps, path=str(source), kind="dicom", warnings=warnings
    )
