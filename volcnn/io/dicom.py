"""Reading a DICOM CT series into HU with a RAS affine, validated before any volume is returned.

What is read: a series of single-frame CT images, and enhanced or legacy-converted enhanced multi-frame CT (one
file holding every slice, or several; position, orientation, pixel spacing, slice thickness and rescale are taken
per frame from the functional groups, per-frame or shared), in the native transfer syntaxes and, through pydicom's
decoder plugins (pylibjpeg with its libjpeg, openjpeg and rle plugins, and pyjpegls, all dependencies of volcnn),
JPEG-LS (lossless and near-lossless), JPEG lossless (process 14, any predictor), JPEG 2000 and RLE. A compressed
transfer syntax no installed plugin decodes is refused, naming the file and the syntax.

Every slice (a file, or a frame of a multi-frame file) is checked: one series, Modality CT (unless
``allow_non_ct``), the same orientation, Rows/Columns and PixelSpacing on every slice, slice positions (projected
on the slice normal) that are distinct, collinear and evenly spaced (a missing or duplicated slice is refused),
pixel data complete and decodable. RescaleSlope/RescaleIntercept are applied per slice, so a series whose scaling
changes from slice to slice comes out in exact HU.

Grouping (:func:`discover_series`, headers only): files are grouped by SeriesInstanceUID. Files whose
SeriesInstanceUID is blank or missing (as some anonymisers leave them) are grouped by StudyInstanceUID,
FrameOfReferenceUID, SeriesNumber, Modality, SOP class, orientation, Rows/Columns, PixelSpacing and
ConvolutionKernel, and split by AcquisitionNumber where two acquisitions share slice positions; the volume then
carries a warning saying so. Files that still cannot be told apart are refused (duplicate positions, with that
reason), and so is a file without the UID whose grouping attributes match a series that has one. A folder holding
several series is refused by :func:`load_series_folder` from the headers alone, before any pixel data is read
(measured by the bytes the process reads in ``tests/io/test_dicom_variants.py``).

Values and warnings: stored values equal to PixelPaddingValue (or within PixelPaddingRangeLimit) are padding
outside the reconstructed field of view; they become :data:`PADDING_HU` (-1024 HU, air: neither bright nor a tissue
value, and at or below the low end of every HU window) and the count is a warning. A SliceThickness that differs
from the spacing of the slice positions by more than :data:`SLICE_THICKNESS_RTOL` is a warning (the affine uses the
positions); so are lossy compression, missing rescale, gantry tilt, and a missing SeriesInstanceUID.

Reader choice, by measurement: ``python -m pipelines.bench_ingest`` times this pydicom reader, all checks included,
against SimpleITK's ImageSeriesReader on the same synthetic series, float32 HU out of both, and checks that the voxel
values are identical (figures in ``pipelines/PERFORMANCE.md``, "DICOM series reading"). pydicom is used because it is as
fast or faster here and it is the one that can be trusted: SimpleITK silently drops a truncated slice file and averages
over a missing slice, and the checks need every header through pydicom anyway. Uncompressed 16-bit little-endian
pixel data take a ``numpy.frombuffer`` fast path (bit-exact with ``pixel_array``: BitsStored masking / sign
extension); others go through ``pixel_array``.

Conventions: DICOM patient coordinates are LPS; the returned affine is RAS (x and y negated). The array is
``(X, Y, Z)``: X runs along a row (increasing column index, IOP's first vector), Y down a column (increasing
row index, IOP's second vector), Z along the slices sorted by position on the normal ``row x col``.
PixelSpacing is ``[spacing between rows, spacing between columns]``, i.e. ``[Y, X]``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

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
    "SLICE_THICKNESS_RTOL",
    "DUPLICATE_POSITION_MM",
    "GEOMETRY_ATOL",
    "PADDING_HU",
]

logger = logging.getLogger(__name__)

#: relative tolerance on the spacing between consecutive slices, and on the distance of each slice position
#: from the straight, evenly spaced line through the first and last slice (fraction of the slice step)
SLICE_SPACING_RTOL = 0.01
#: SliceThickness differing from the spacing of the slice positions by more than this fraction is a warning
SLICE_THICKNESS_RTOL = 0.05
#: two slices closer than this along the normal (mm) are duplicates
DUPLICATE_POSITION_MM = 0.01
#: absolute tolerance on direction cosines (unitless) and PixelSpacing (mm) agreeing between slices
GEOMETRY_ATOL = 1e-4
#: the value padding voxels (PixelPaddingValue / PixelPaddingRangeLimit) take: air, in HU
PADDING_HU = -1024.0
_NATIVE_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_DICOMDIR = "1.2.840.10008.1.3.10"
#: Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: transfer syntaxes that are always lossy, and those that may be (LossyImageCompression says which)
_ALWAYS_LOSSY = (JPEGBaseline8Bit, JPEGExtended12Bit)
_MAYBE_LOSSY = ("1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203")
#: header elements read to group files into series (no pixel data)
_GROUP_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "Rows",
    "Columns",
    "PixelSpacing",
    "AcquisitionNumber",
    "ConvolutionKernel",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
]
_NO_UID_KEYS = (
    "StudyInstanceUID, FrameOfReferenceUID, SeriesNumber, Modality, SOP class, orientation, Rows/Columns, "
    "PixelSpacing and ConvolutionKernel"
)


def uid_hash(uid: str) -> str:
    """First 12 hex digits of the sha256 of a UID: a stable name for a series that does not expose it."""
    return short_hash(uid)


@dataclass
class SeriesFiles:
    """The files of one DICOM series found in a folder.

    Attributes:
        uid_hash: first 12 hex digits of sha256(SeriesInstanceUID); for files without a SeriesInstanceUID, of the
            attributes they were grouped by. The UID itself is never exposed.
        files: the series' files, sorted by name (slice order is decided at load time from positions).
        description: SeriesDescription of the first file, or ``""``.
        modality: Modality of the first file, or ``""``.
        warnings: how the files were grouped, when that was not by SeriesInstanceUID alone.
    """

    uid_hash: str
    files: list[Path] = field(default_factory=list)
    description: str = ""
    modality: str = ""
    warnings: list[str] = field(default_factory=list)


def discover_series(folder: str | os.PathLike[str]) -> list[SeriesFiles]:
    """Group the DICOM files directly inside ``folder`` into series, from their headers only (no pixel data read).

    Files are grouped by SeriesInstanceUID, or without one as the module docstring says. Files that are not DICOM
    (no "DICM" marker and no ``.dcm`` suffix) and a DICOMDIR are ignored; sub-folders are not searched.

    Args:
        folder: a folder.

    Returns:
        One :class:`SeriesFiles` per series, in order of their first file name.

    Raises:
        VolumeError: the folder does not exist; a DICOM-looking file cannot be parsed, or has neither a
            SeriesInstanceUID nor image attributes (truncated or damaged); a file without a SeriesInstanceUID
            matches a series that has one (naming the file).
    """
    return _group_folder(folder)[0]


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _rounded(value: Any, decimals: int = 3) -> tuple[float, ...] | str:
    """A grouping key for a numeric (multi-)value: rounded floats, or the text when not numeric."""
    if value is None:
        return ""
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        return tuple(round(float(v), decimals) + 0.0 for v in values)
    except (TypeError, ValueError):
        return str(values)


def _shared_item(ds: Any, sequence: str) -> Any:
    """The first item of ``sequence`` in the shared functional groups, or None."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared or sequence not in shared[0] or not shared[0][sequence].value:
        return None
    return shared[0][sequence].value[0]


def _grouping_key(ds: Any) -> tuple[Any, ...]:
    """What tells series without a SeriesInstanceUID apart (AcquisitionNumber is used only to split, see below)."""
    orientation, spacing = ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
    if orientation is None and (item := _shared_item(ds, "PlaneOrientationSequence")) is not None:
        orientation = item.get("ImageOrientationPatient")
    if spacing is None and (item := _shared_item(ds, "PixelMeasuresSequence")) is not None:
        spacing = item.get("PixelSpacing")
    return (
        _text(ds, "StudyInstanceUID"),
        _text(ds, "FrameOfReferenceUID"),
        _text(ds, "SeriesNumber"),
        _text(ds, "Modality"),
        _text(ds, "SOPClassUID"),
        _rounded(orientation),
        _text(ds, "Rows"),
        _text(ds, "Columns"),
        _rounded(spacing),
        _text(ds, "ConvolutionKernel"),
    )


def _read_header(path: Path, full: bool = False) -> tuple[Any, int | None]:
    """The header of a file, up to its pixel data, and where its pixel data element starts (None when unknown).

    ``full=False`` keeps only the elements grouping needs (:data:`_GROUP_TAGS`).
    """
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(
                fp,
                stop_before_pixels=True,
                force=path.suffix.lower() == ".dcm",
                specific_tags=None if full else _GROUP_TAGS,
            )
            offset = fp.tell()  # pydicom leaves the file at the pixel data element's tag (or at the end)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise VolumeError(path, f"cannot read DICOM file ({type(e).__name__}: {e})") from e
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        offset = None  # the dataset was read from the inflated stream: no offset in the file
    return ds, offset


def _read_pixel_element(ds: Any, path: Path, offset: int | None) -> Any:
    """Complete a header read by :func:`_read_header` with the file's pixel data element (the file is read again
    from ``offset`` only), or read the whole file when the offset is unknown."""
    if offset is None:
        try:
            return pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
            raise VolumeError(path, f"cannot read DICOM file ({type(e).__name__}: {e})") from e
    implicit, little = ds.original_encoding
    try:
        with open(path, "rb") as fp:
            fp.seek(offset)
            raw = next(data_element_generator(fp, bool(implicit), bool(little)), None)
    except (OSError, ValueError, EOFError, KeyError, TypeError, struct.error) as e:
        raise VolumeError(path, f"cannot read pixel data ({type(e).__name__}: {e})") from e
    if raw is not None and raw.tag in _PIXEL_TAGS:
        ds[raw.tag] = raw
    return ds


def _group_folder(
    folder: str | os.PathLike[str], full_headers: bool = False
) -> tuple[list[SeriesFiles], dict[Path, tuple[Any, int | None]]]:
    """Series of ``folder`` from headers only, in file-name order, and the headers read (see :func:`_read_header`);
    see :func:`discover_series`."""
    root = Path(folder)
    if not root.is_dir():
        raise VolumeError(root, "not a folder")
    headers: dict[Path, tuple[Any, int | None]] = {}
    groups: dict[tuple[str, Any], SeriesFiles] = {}
    no_uid: dict[tuple[str, Any], list[tuple[Path, Any]]] = defaultdict(list)
    with_uid_keys: dict[tuple[Any, ...], Path] = {}
    for path in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not looks_like_dicom(path):
            continue
        ds, offset = _read_header(path, full_headers)
        uid = _text(ds, "SeriesInstanceUID")
        if not uid:
            if getattr(ds, "file_meta", None) is not None and ds.file_meta.get("MediaStorageSOPClassUID") == _DICOMDIR:
                logger.debug("ignoring DICOMDIR %s", path)
                continue
            if "Rows" not in ds or "Columns" not in ds:
                raise VolumeError(
                    path,
                    "no SeriesInstanceUID and no image attributes (Rows/Columns): truncated or damaged DICOM file, "
                    "or not an image",
                )
        headers[path] = (ds, offset)
        key: tuple[str, Any] = ("uid", uid) if uid else ("attrs", _grouping_key(ds))
        if not uid:
            no_uid[key].append((path, ds))
        if key not in groups:
            if uid:  # the attributes of a series with a UID, for files without one to be compared with
                with_uid_keys.setdefault(_grouping_key(ds)[1:], path)
            name = uid if uid else "no SeriesInstanceUID|" + repr(key[1])
            groups[key] = SeriesFiles(
                uid_hash=uid_hash(name), description=_text(ds, "SeriesDescription"), modality=_text(ds, "Modality")
            )
        groups[key].files.append(path)
    result: list[SeriesFiles] = []
    for key, info in groups.items():
        if key[0] == "uid":
            result.append(info)
            continue
        twin = with_uid_keys.get(key[1][1:])
        if twin is not None:
            raise VolumeError(
                no_uid[key][0][0],
                f"no SeriesInstanceUID, while {twin.name}, with the same frame of reference, series number, "
                "orientation, size and pixel spacing, has one: cannot tell which series this file belongs to",
            )
        result.extend(_split_by_acquisition(key[1], info, no_uid[key]))
    result.sort(key=lambda s: s.files[0].name)
    return result, headers


def _split_by_acquisition(
    key: tuple[Any, ...], info: SeriesFiles, records: list[tuple[Path, Any]]
) -> list[SeriesFiles]:
    """A group of files without SeriesInstanceUID, split by AcquisitionNumber when acquisitions share positions.

    Several acquisitions in one series are normal (one per table position in a sequential scan) as long as
    they do not overlap; acquisitions at the same slice positions are separate volumes (e.g. two phases).
    """
    acquisitions = [_text(ds, "AcquisitionNumber") for _, ds in records]
    if len(set(acquisitions)) < 2:
        return [info]
    seen: dict[Any, str] = {}
    overlap = False
    for (_, ds), acq in zip(records, acquisitions, strict=True):
        position = _rounded(ds.get("ImagePositionPatient"), 2)
        if not position or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return [info]  # positions unknown from the headers: leave the split to the reader's checks
        if position in seen and seen[position] != acq:
            overlap = True
        seen.setdefault(position, acq)
    if not overlap:
        return [info]
    parts = []
    for acq in sorted(set(acquisitions), key=lambda a: (len(a), a)):
        files = [p for (p, _), a in zip(records, acquisitions, strict=True) if a == acq]
        part = SeriesFiles(
            uid_hash=uid_hash("no SeriesInstanceUID|" + repr(key) + "|AcquisitionNumber " + acq),
            files=files,
            description=info.description,
            modality=info.modality,
        )
        part.warnings.append(
            f"no SeriesInstanceUID: {len(files)} of {len(records)} files with the same {_NO_UID_KEYS} taken apart "
            f"by AcquisitionNumber ({acq or 'blank'}), as acquisitions that share slice positions"
        )
        parts.append(part)
    return parts


def load_series_folder(folder: str | os.PathLike[str], *, allow_non_ct: bool = False) -> Volume:
    """Read the single series in ``folder``; see :func:`load_dicom_files`.

    The files are grouped from their headers first (:func:`discover_series`), so a folder of several series is
    refused before any pixel data is read; the headers are parsed once, the pixel data element of each file of the
    series is then read from where the header ends.

    Raises:
        VolumeError: no series ("no DICOM series found"), several series ("N DICOM series in one folder"
            with their uid hashes), or any problem of :func:`discover_series` or :func:`load_dicom_files`.
    """
    series, headers = _group_folder(folder, full_headers=True)
    if not series:
        raise VolumeError(folder, "no DICOM series found in this folder")
    if len(series) > 1:
        listing = ", ".join(f"{info.uid_hash} ({len(info.files)} files)" for info in series)
        raise VolumeError(
            folder, f"{len(series)} DICOM series in one folder ({listing}); give one series folder at a time"
        )
    paths = series[0].files
    datasets = [_read_pixel_element(headers[p][0], p, headers[p][1]) for p in paths]
    vol = _build_volume(paths, datasets, folder, allow_non_ct)
    for w in series[0].warnings:
        logger.warning("%s: %s", folder, w)
    vol.warnings = [*series[0].warnings, *vol.warnings]
    return vol


def _floats(ds: Any, keyword: str, n: int, path: Path, where: str = "") -> np.ndarray:
    value = None if ds is None else ds.get(keyword)
    if value is None:
        raise VolumeError(path, f"{where}missing {keyword}; cannot place the slice in space")
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise VolumeError(path, f"{where}unreadable {keyword} {values!r}") from e
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(path, f"{where}{keyword} must be {n} finite numbers, got {values!r}")
    return arr


def _optional_float(item: Any, keyword: str) -> float | None:
    value = None if item is None else item.get(keyword)
    try:
        return float(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _rescale(item: Any, path: Path, where: str) -> tuple[float, float] | None:
    """(slope, intercept) of ``item``, None when it has neither; errors name the file."""
    if item is None:
        return None
    slope_v, icpt_v = item.get("RescaleSlope"), item.get("RescaleIntercept")
    if slope_v is None and icpt_v is None:
        return None
    try:
        slope = float(slope_v) if slope_v is not None and str(slope_v) != "" else 1.0
        icpt = float(icpt_v) if icpt_v is not None and str(icpt_v) != "" else 0.0
    except (TypeError, ValueError) as e:
        raise VolumeError(path, f"{where}unreadable RescaleSlope/RescaleIntercept ({slope_v!r}, {icpt_v!r})") from e
    if not (np.isfinite(slope) and np.isfinite(icpt)) or slope == 0:
        raise VolumeError(path, f"{where}invalid RescaleSlope/RescaleIntercept ({slope}, {icpt})")
    return slope, icpt


@dataclass
class _Slice:
    """One 2D slice: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    label: str  # "IM0003.dcm", or "ct.dcm frame 5"
    where: str  # "" or "frame 5: ", prefixed to problems about this slice
    file_index: int
    frame_index: int
    iop: np.ndarray
    ipp: np.ndarray
    spacing: np.ndarray  # [row spacing (Y), column spacing (X)]
    thickness: float | None
    rescale: tuple[float, float] | None
    acquisition: str
    stack: tuple[str, str]  # (StackID, TemporalPositionIndex) of a frame


def _slices_of(ds: Any, path: Path, file_index: int) -> list[_Slice]:
    """The slices a file holds: itself, or the frames of a multi-frame file placed by its functional groups."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    acquisition = _text(ds, "AcquisitionNumber")
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames > 1:
            raise VolumeError(
                path,
                f"multi-frame file ({n_frames} frames) without PerFrameFunctionalGroupsSequence: the frames cannot "
                "be placed in space",
            )
        return [
            _Slice(
                path=path,
                label=path.name,
                where="",
                file_index=file_index,
                frame_index=0,
                iop=_floats(ds, "ImageOrientationPatient", 6, path),
                ipp=_floats(ds, "ImagePositionPatient", 3, path),
                spacing=_floats(ds, "PixelSpacing", 2, path),
                thickness=_optional_float(ds, "SliceThickness"),
                rescale=_rescale(ds, path, ""),
                acquisition=acquisition,
                stack=("", ""),
            )
        ]
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        raise VolumeError(
            path, f"PerFrameFunctionalGroupsSequence has {len(per_frame)} item(s) for NumberOfFrames {n_frames}"
        )
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else None

    def group(frame_item: Any, sequence: str) -> Any:
        for item in (frame_item, shared_item):
            if item is not None and sequence in item and item[sequence].value:
                return item[sequence].value[0]
        return None

    slices = []
    for i, item in enumerate(per_frame):
        where = f"frame {i + 1}: "
        position = group(item, "PlanePositionSequence")
        orientation = group(item, "PlaneOrientationSequence")
        measures = group(item, "PixelMeasuresSequence")
        for what, value in (
            ("PlanePositionSequence", position),
            ("PlaneOrientationSequence", orientation),
            ("PixelMeasuresSequence", measures),
        ):
            if value is None:
                raise VolumeError(path, f"{where}no {what} in the per-frame or shared functional groups")
        content = group(item, "FrameContentSequence")
        rescale = _rescale(group(item, "PixelValueTransformationSequence"), path, where) or _rescale(ds, path, where)
        slices.append(
            _Slice(
                path=path,
                label=f"{path.name} frame {i + 1}",
                where=where,
                file_index=file_index,
                frame_index=i,
                iop=_floats(orientation, "ImageOrientationPatient", 6, path, where),
                ipp=_floats(position, "ImagePositionPatient", 3, path, where),
                spacing=_floats(measures, "PixelSpacing", 2, path, where),
                thickness=_optional_float(measures, "SliceThickness"),
                rescale=rescale,
                acquisition=acquisition,
                stack=(_text(content, "StackID"), _text(content, "TemporalPositionIndex"))
                if content is not None
                else ("", ""),
            )
        )
    return slices


def _transfer_syntax(ds: Any, path: Path) -> tuple[UID | None, bool]:
    """(transfer syntax, compressed?) of a parsed file; an unknown syntax is refused, naming the file."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if tsyntax is None:
        return None, False
    tsyntax = UID(str(tsyntax))
    try:
        return tsyntax, bool(tsyntax.is_compressed)
    except ValueError as e:
        raise VolumeError(path, f"unknown transfer syntax {tsyntax}: cannot decode its pixel data") from e


def _decode(
    ds: Any, path: Path, n_frames: int, padding: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored pixel values of a file, ``(frames, rows, columns)``, and its padding mask; errors name the file.

    ``padding`` is the inclusive range of stored values that are padding (see :func:`_padding_range`).
    """
    tsyntax, compressed = _transfer_syntax(ds, path)
    if "PixelData" not in ds:
        raise VolumeError(path, "no pixel data")
    if compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except (NotImplementedError, ValueError):
            decoder = None
        if decoder is None or not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) if decoder is not None else ""
            hint = (
                f"pydicom's plugins for it need: {missing}; pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, "
                "pylibjpeg-rle and pyjpegls are volcnn dependencies, reinstall volcnn"
                if decoder is not None
                else "pydicom has no decoder for this syntax; decompress the series first (gdcmconv --raw, dcmdjpeg)"
            )
            raise VolumeError(
                path, f"compressed transfer syntax {tsyntax.name} ({tsyntax}) and no decoder installed for it ({hint})"
            )
    rows, cols = int(ds.Rows), int(ds.Columns)
    if tsyntax is not None and tsyntax in _NATIVE_LE and int(ds.get("BitsAllocated", 0)) == 16:
        return _decode_native16(ds, path, n_frames, padding)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises ValueError, RuntimeError, NotImplementedError... for bad data
        what = f" in transfer syntax {tsyntax.name} ({tsyntax})" if compressed and tsyntax is not None else ""
        raise VolumeError(path, f"cannot decode pixel data{what} ({type(e).__name__}: {e})") from e
    if arr.ndim == 2 and n_frames == 1:
        arr = arr[None]
    if arr.shape != (n_frames, rows, cols):
        raise VolumeError(
            path,
            f"pixel array of shape {arr.shape}; expected {n_frames} grayscale frame(s) of Rows x Columns "
            f"{rows} x {cols}",
        )
    mask = None if padding is None else (arr >= padding[0]) & (arr <= padding[1])
    return arr, mask


def _decode_native16(
    ds: Any, path: Path, n_frames: int, padding: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fast path for uncompressed little-endian 16-bit pixel data, bit-exact with pydicom's ``pixel_array``.

    Values above BitsStored are masked off (unsigned) or sign-extended from HighBit (signed), as pydicom does. The
    padding mask is taken on the 16-bit values before that, so a padding value written over all 16 bits (e.g.
    63536 in 12-bit data) is recognised rather than masked into a tissue value.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    expected = n_frames * rows * cols * 2
    if len(data) < expected:
        raise VolumeError(
            path, f"the number of bytes of pixel data is less than expected ({len(data)} vs {expected} bytes)"
        )
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=n_frames * rows * cols)
    arr = arr.reshape(n_frames, rows, cols)
    mask = None if padding is None else (arr >= padding[0]) & (arr <= padding[1])
    bits = int(ds.get("BitsStored", 16))
    if bits < 16:
        if signed:
            shift = 16 - bits
            arr = (arr << shift) >> shift
        else:
            arr = arr & np.uint16((1 << bits) - 1)
    return arr, mask


def _padding_range(ds: Any, path: Path) -> tuple[int, int] | None:
    """Inclusive range of stored values that are padding (PixelPaddingValue, PixelPaddingRangeLimit), or None.

    The values are read in the pixel representation: a value stored as US in signed data (or as SS in unsigned
    data) is taken as the same 16 bits.
    """
    values = []
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        value = ds.get(keyword)
        if value is None or str(value).strip() == "":
            continue
        try:
            v = int(value)
        except (TypeError, ValueError) as e:
            raise VolumeError(path, f"unreadable {keyword} {value!r}") from e
        bits = int(ds.get("BitsAllocated", 16) or 16)
        if int(ds.get("PixelRepresentation", 0)) == 1 and v >= 1 << (bits - 1):
            v -= 1 << bits
        elif int(ds.get("PixelRepresentation", 0)) == 0 and v < 0:
            v += 1 << bits
        values.append(v)
    if not values or "PixelPaddingValue" not in ds:
        return None
    return min(values), max(values)


def _identity(ds: Any) -> tuple[str, ...]:
    """What must agree between the files of one series: its UID, or without one the grouping attributes."""
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return (uid,)
    return ("", *(_text(ds, k) for k in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SOPClassUID")))


_IDENTITY_NAMES = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SOPClassUID")


def load_dicom_files(
    files: list[Path] | list[str] | tuple[str | Path, ...],
    source: str | os.PathLike[str],
    *,
    allow_non_ct: bool = False,
) -> Volume:
    """Read the slices of one series as a validated float32 HU volume ``(X, Y, Z)`` with a RAS affine.

    Args:
        files: the series' files, in any order (e.g. ``SeriesFiles.files``): single-frame slices, or one or
            more multi-frame files.
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
    if not paths:
        raise VolumeError(source, "series has 0 slice(s); a 3D volume needs at least 2")
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p, force=p.suffix.lower() == ".dcm"))
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
            raise VolumeError(p, f"cannot read DICOM file ({type(e).__name__}: {e})") from e
    return _build_volume(paths, datasets, source, allow_non_ct)


def _build_volume(paths: list[Path], datasets: list[Any], source: str | os.PathLike[str], allow_non_ct: bool) -> Volume:
    """Validate parsed files and assemble the volume; see :func:`load_dicom_files`."""
    warnings: list[str] = []
    first, p0 = datasets[0], paths[0]
    modality = _text(first, "Modality")
    if modality != "CT":
        if not allow_non_ct:
            raise VolumeError(
                p0, f"Modality is {modality or 'missing'!r}, not CT; refusing to read it as HU (allow_non_ct=True)"
            )
        warnings.append(f"Modality {modality or 'missing'!r}: values are rescaled stored values, not HU")
    identity0 = _identity(first)
    if not identity0[0]:
        warnings.append(
            "no SeriesInstanceUID (blank or missing, as anonymisers leave it): the files were taken as one series "
            f"by {_NO_UID_KEYS}"
        )
    lossy: set[str] = set()
    for ds, p in zip(datasets, paths, strict=True):
        identity = _identity(ds)
        if identity != identity0:
            if identity[0] and identity0[0]:
                why = "SeriesInstanceUID differs"
            elif identity[0] or identity0[0]:
                why = "one has a SeriesInstanceUID, the other none"
            else:
                k = next(i for i in range(1, len(identity)) if identity[i] != identity0[i])
                why = f"no SeriesInstanceUID, and {_IDENTITY_NAMES[k]} differs"
            raise VolumeError(p, f"belongs to another series than {p0.name} ({why})")
        if _text(ds, "Modality") != modality:
            raise VolumeError(p, f"Modality {ds.get('Modality')!r} differs from {modality!r} in {p0.name}")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(p, f"SamplesPerPixel {ds.get('SamplesPerPixel')}: not a grayscale CT slice")
        shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if min(shape) < 1:
            raise VolumeError(p, f"Rows/Columns {shape} missing or zero")
        tsyntax, _ = _transfer_syntax(ds, p)
        if tsyntax in _ALWAYS_LOSSY or _text(ds, "LossyImageCompression") == "01":
            lossy.add(f"{tsyntax.name if tsyntax else 'uncompressed'}, lossy")
        elif tsyntax in _MAYBE_LOSSY and _text(ds, "LossyImageCompression") != "00":
            lossy.add(f"{tsyntax.name}, which allows lossy compression")

    slices = [s for i, (ds, p) in enumerate(zip(datasets, paths, strict=True)) for s in _slices_of(ds, p, i)]
    if len(slices) < 2:
        raise VolumeError(
            source, f"series has {len(slices)} slice(s) in {len(paths)} file(s); a 3D volume needs at least 2"
        )
    s0 = slices[0]
    iop0 = s0.iop
    row_cos, col_cos = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise VolumeError(
            s0.path, f"{s0.where}ImageOrientationPatient {iop0.tolist()} is not two orthogonal unit vectors"
        )
    normal = np.cross(row_cos, col_cos)
    spacing0 = s0.spacing
    if np.any(spacing0 <= 0):
        raise VolumeError(s0.path, f"{s0.where}PixelSpacing {spacing0.tolist()} is not positive")
    shape0 = (int(first.Rows), int(first.Columns))
    for s in slices[1:]:
        if np.max(np.abs(s.iop - iop0)) > GEOMETRY_ATOL:
            raise VolumeError(
                s.path, f"{s.where}ImageOrientationPatient {s.iop.tolist()} differs from {iop0.tolist()} in {s0.label}"
            )
        ds = datasets[s.file_index]
        shape = (int(ds.Rows), int(ds.Columns))
        if shape != shape0:
            raise VolumeError(s.path, f"Rows/Columns {shape} differ from {shape0} in {p0.name}")
        if np.max(np.abs(s.spacing - spacing0)) > GEOMETRY_ATOL:
            raise VolumeError(
                s.path, f"{s.where}PixelSpacing {s.spacing.tolist()} differs from {spacing0.tolist()} in {s0.label}"
            )

    # order along the normal, then check distinct, evenly spaced and collinear positions
    positions = np.stack([s.ipp for s in slices])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    dist, positions = dist[order], positions[order]
    slices = [slices[i] for i in order]
    steps = np.diff(dist)
    dup = np.flatnonzero(steps < DUPLICATE_POSITION_MM)
    if dup.size:
        k = int(dup[0])
        a, b = slices[k], slices[k + 1]
        problem = (
            f"duplicate slice position: {a.label} and {b.label} are both at {dist[k]:.3f} mm "
            f"along the normal ({dup.size} duplicate(s))"
        )
        if a.stack != b.stack:
            problem += (
                f"; the frames belong to different stacks or temporal positions (StackID, TemporalPositionIndex "
                f"{a.stack} and {b.stack}): one volume per stack is not read"
            )
        elif a.acquisition != b.acquisition:
            problem += (
                f"; AcquisitionNumber {a.acquisition or 'blank'} and {b.acquisition or 'blank'}: several "
                "acquisitions at the same positions"
            )
        elif not identity0[0] and a.path != b.path:
            problem += (
                "; the files have no SeriesInstanceUID and the same frame of reference, series number, "
                "orientation, size, pixel spacing, convolution kernel and acquisition number, so the series they "
                "come from cannot be told apart"
            )
        raise VolumeError(source, problem)
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > SLICE_SPACING_RTOL * median)
    if bad.size:
        k = int(bad[0])
        hint = "missing slice(s)?" if steps[k] > median else "extra or misplaced slice?"
        raise VolumeError(
            source,
            f"uneven slice spacing: {steps[k]:.3f} mm between {slices[k].label} and {slices[k + 1].label}, "
            f"median {median:.3f} mm (tolerance {SLICE_SPACING_RTOL:.0%}); {hint}",
        )
    n = len(slices)
    step_vec = (positions[-1] - positions[0]) / (n - 1)
    off_line = np.linalg.norm(positions - (positions[0] + np.arange(n)[:, None] * step_vec), axis=1)
    if off_line.max() > SLICE_SPACING_RTOL * median:
        k = int(np.argmax(off_line))
        raise VolumeError(
            source,
            f"slice positions are not on one line: {slices[k].label} is {off_line[k]:.3f} mm off the line "
            "through the first and last slice",
        )
    tilt = float(np.degrees(np.arccos(np.clip(abs(step_vec @ normal) / np.linalg.norm(step_vec), -1.0, 1.0))))
    if tilt > 0.01:
        warnings.append(f"slices are offset in-plane (gantry tilt {tilt:.2f} deg): the affine is sheared")
    thick = sorted({round(s.thickness, 4) for s in slices if s.thickness is not None})
    off = [t for t in thick if abs(t - median) > SLICE_THICKNESS_RTOL * median]
    if off:
        warnings.append(
            f"SliceThickness {', '.join(f'{t:g}' for t in off)} mm differs from the {median:.4g} mm spacing of the "
            f"slice positions by more than {SLICE_THICKNESS_RTOL:.0%} (overlapping or gapped reconstruction, or a "
            "wrong header); the volume is placed by the positions"
        )
    for what in sorted(lossy):
        warnings.append(f"lossy compressed pixel data ({what}): voxel values may differ from the acquired ones")

    rows, cols = shape0
    out = np.empty((n, rows, cols), dtype=np.float32)  # (Z, Y, X)
    where_in_file: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for k, s in enumerate(slices):
        where_in_file[s.file_index].append((s.frame_index, k))
    no_rescale = padded = 0
    padding_values: set[tuple[int, int]] = set()
    for file_index, placed in where_in_file.items():
        ds, p = datasets[file_index], paths[file_index]
        padding = _padding_range(ds, p)
        raw, pad = _decode(ds, p, int(ds.get("NumberOfFrames", 1) or 1), padding)
        for frame_index, k in placed:
            rescale = slices[k].rescale
            if rescale is None:
                no_rescale += 1
                slope, icpt = 1.0, 0.0
            else:
                slope, icpt = rescale
            if slope == 1.0:
                np.add(raw[frame_index], np.float32(icpt), out=out[k], casting="unsafe")
            else:  # float64 so that integer HU stay exact, then float32
                out[k] = raw[frame_index] * slope + icpt
            if pad is not None and padding is not None and pad[frame_index].any():
                out[k][pad[frame_index]] = PADDING_HU
                padded += int(np.count_nonzero(pad[frame_index]))
                padding_values.add(padding)
        del raw, pad
    if no_rescale:
        warnings.append(f"{no_rescale} slice(s) have no RescaleSlope/RescaleIntercept: stored values taken as is")
    if padded:
        ranges = ", ".join(str(lo) if lo == hi else f"{lo} to {hi}" for lo, hi in sorted(padding_values))
        warnings.append(
            f"{padded} padding voxel(s) (stored value {ranges}, PixelPaddingValue) set to {PADDING_HU:g} "
            f"({'HU, air' if modality == 'CT' else 'the value air has in CT'})"
        )

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
