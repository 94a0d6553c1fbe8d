"""Results returned as DICOM (``volcnn infer --dicom-out``): a structured report and parametric maps per case.

For an input that is a DICOM series folder, after the runner has written the case, this module reads the case's
``findings.json`` (and ``heatmap.nii.gz``, and the explanations' NIfTI files) with the series' headers and writes,
atomically, in the case folder::

    findings_sr.dcm   Comprehensive 3D SR, TID 1500 Measurement Report (highdicom): per finding a TID 1410 group
                      (tracking id ``findingKK``, the rank in findings.json) whose region is a SCOORD3D POINT at the
                      finding's centre (patient LPS mm, the input's FrameOfReferenceUID), finding type "Focal
                      abnormality", geometric purpose "Center", its calibrated probability as a NUM "Probability"
                      (DCM 122157) in UCUM ``{probability}`` and, when known, its diameter in mm; plus one TID 1501
                      group with the case's score (volume mode: the volume's probability, and no points). The model
                      is the algorithm identification (name, version, sha256); the input instances are the image
                      library and the evidence (Current Requested Procedure Evidence Sequence).
    heatmap_pm.dcm    Parametric Map (candidate mode): the heat map on the input's grid, one frame per input
                      slice, positions and orientation copied from the slices it derives from (each frame
                      references its source instance), real-world value mapping "probability" (UCUM
                      ``{probability}``, 0..1). Stored as 16-bit integers (value x 65535, the mapping's slope
                      1/65535: at most 7.7e-6 off) in RLE Lossless, which the mostly-zero maps shrink under.
    explain_pm.dcm    with ``--explain``: the explanations (one channel per explained finding, LUT label
                      ``findingKK`` or ``volume``, saliency in [0, 1]) as a second Parametric Map.

Every run makes new series and instance UIDs (``highdicom.UID()``); the patient and study modules are copied from
the input as the IODs require, so the outputs carry no identifier the input did not already carry. Nothing here
logs or records a header value: an error raised inside pydicom or highdicom is reported with the input's patient
and study identifiers blanked out of its message. RAS (NIfTI, findings.json) becomes LPS (DICOM) by negating x
and y.

The heat map is placed by geometry, not by convention: each input slice's ImagePositionPatient is mapped through
the heat map's affine and must fall on a voxel plane ``(0, 0, k)`` with the slice's row and column directions equal
to the affine's first two axes; otherwise the case fails with the mismatch named. A failure writing one case's DICOM
outputs removes that case's DICOM files, is returned (and recorded in ``failures.json`` by
:func:`write_batch_dicom`) and never stops the batch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import volcnn
from volcnn.core.atomic import atomic_path, atomic_write_json, atomic_write_text
from volcnn.inference.cases import case_names
from volcnn.inference.sharding import Shard
from volcnn.io.dicom import discover_series

__all__ = [
    "DICOM_OUTPUT_NAMES",
    "EXPLAIN_PM_NAME",
    "HEATMAP_PM_NAME",
    "PROBABILITY_UNIT",
    "SR_NAME",
    "DicomOutputError",
    "SeriesGeometry",
    "frames_from_volume",
    "read_series_geometry",
    "remove_dicom_outputs",
    "write_batch_dicom",
    "write_case_dicom",
    "write_findings_sr",
    "write_parametric_map",
]

logger = logging.getLogger(__name__)

SR_NAME = "findings_sr.dcm"
HEATMAP_PM_NAME = "heatmap_pm.dcm"
EXPLAIN_PM_NAME = "explain_pm.dcm"
#: every file this module may write in a case folder
DICOM_OUTPUT_NAMES = (SR_NAME, HEATMAP_PM_NAME, EXPLAIN_PM_NAME)

#: UCUM unit of a probability (an annotation of the unity unit "1")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
_NO_UNITS = Code("1", "UCUM", "no units")
_MILLIMETRE = Code("mm", "UCUM", "millimeter")
#: series numbers of the outputs (each output is its own series, with a new UID every run)
_SERIES_NUMBER = {SR_NAME: 9001, HEATMAP_PM_NAME: 9002, EXPLAIN_PM_NAME: 9003}
#: type 2 attributes of the patient and study modules highdicom reads from the source; set empty when absent
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
#: General Series attributes a derived map takes from its input: what it shows, not whom
_ANATOMY = ("BodyPartExamined", "Laterality")
#: header values that identify the patient or the visit: blanked out of any error message
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
)
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: the stored value of 1.0 in the parametric maps (unsigned 16-bit: real-world value = stored / LEVELS)
LEVELS = 65535
#: a slice position may miss its voxel plane by this fraction of a voxel (the NIfTI affine is float32)
_PLANE_TOL_VOX = 0.01
#: relative tolerance on a slice's row / column step against the heat map's axes
_AXIS_RTOL = 1e-3


class DicomOutputError(ValueError):
    """The DICOM outputs of a case cannot be written; the message names the file or series and the reason."""


@dataclass
class SeriesGeometry:
    """Headers (no pixel data) and slice geometry of one input series.

    Attributes:
        folder: the series folder.
        datasets: the series' instances, single-frame slices sorted along the slice normal (or the one
            multi-frame instance).
        frames: per frame of the series, in the order a Parametric Map derived from ``datasets`` numbers them
            (the order of ``datasets``, or a multi-frame instance's frame order): ``(dataset index, LPS position
            (3,), row step (3,), column step (3,))``; a step is the direction cosine times the pixel spacing along
            it, in LPS mm.
        frame_of_reference_uid: the series' FrameOfReferenceUID.
    """

    folder: Path
    datasets: list[Dataset]
    frames: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
    frame_of_reference_uid: str

    @property
    def rows(self) -> int:
        return int(self.datasets[0].Rows)

    @property
    def columns(self) -> int:
        return int(self.datasets[0].Columns)


def _floats(value: Any, n: int, what: str, where: Path) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DicomOutputError(f"{where}: unreadable {what} {value!r}") from e
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise DicomOutputError(f"{where}: {what} must be {n} finite numbers")
    return arr


def _steps(orientation: Any, spacing: Any, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Row step (along a row: increasing column index) and column step (down a column), LPS mm."""
    iop = _floats(orientation, 6, "ImageOrientationPatient", where)
    sp = _floats(spacing, 2, "PixelSpacing", where)  # [between rows, between columns]
    return iop[:3] * sp[1], iop[3:] * sp[0]


def _multiframe_frames(ds: Dataset, where: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(position, row step, column step)`` of each frame of an enhanced (multi-frame) image."""
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if per_frame is None or len(per_frame) != n:
        raise DicomOutputError(
            f"{where}: a multi-frame image needs one PerFrameFunctionalGroupsSequence item per frame"
        )

    def item(group: Dataset, keyword: str) -> Dataset | None:
        seq = group.get(keyword) or shared.get(keyword)
        return seq[0] if seq else None

    out = []
    for k, group in enumerate(per_frame):
        position, orientation, measures = (
            item(group, kw) for kw in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
        )
        if position is None or orientation is None or measures is None:
            raise DicomOutputError(f"{where}: frame {k + 1} has no plane position, orientation or pixel measures")
        row, col = _steps(orientation.ImageOrientationPatient, measures.PixelSpacing, where)
        out.append((_floats(position.ImagePositionPatient, 3, "ImagePositionPatient", where), row, col))
    return out


def read_series_geometry(folder: str | os.PathLike[str]) -> SeriesGeometry:
    """Read the headers of the one series in ``folder`` (the files the reader groups, :func:`discover_series`).

    Raises:
        DicomOutputError: no or several series, instances without Study/Series/SOP Instance UIDs or
            FrameOfReferenceUID (DICOM results could not reference them), instances of several frames of reference
            or sizes, several multi-frame instances, unreadable geometry.
    """
    root = Path(folder)
    try:
        series = discover_series(root)
    except ValueError as e:  # VolumeError names the file
        raise DicomOutputError(str(e)) from e
    if len(series) != 1:
        raise DicomOutputError(f"{root}: {len(series)} DICOM series in the folder; DICOM output needs exactly one")
    datasets: list[Dataset] = []
    for path in series[0].files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=path.suffix.lower() == ".dcm")
        except Exception as e:
            raise DicomOutputError(f"{path}: cannot read DICOM header ({type(e).__name__}: {e})") from e
        blank = [kw for kw in (*_REQUIRED_UIDS, "FrameOfReferenceUID") if not str(ds.get(kw, "") or "").strip()]
        if blank:
            raise DicomOutputError(
                f"{path}: no {', '.join(blank)}: DICOM results could not reference this instance or its frame of "
                "reference"
            )
        for keyword in _TYPE2:  # type 2: present, maybe empty; adds nothing the input did not carry
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.append(ds)
    first = datasets[0]
    frame_uid = str(first.FrameOfReferenceUID)
    for other, path in zip(datasets, series[0].files, strict=True):
        if str(other.FrameOfReferenceUID) != frame_uid:
            raise DicomOutputError(f"{path}: FrameOfReferenceUID differs from the series' first instance")
        if (int(other.Rows), int(other.Columns)) != (int(first.Rows), int(first.Columns)):
            raise DicomOutputError(f"{path}: Rows/Columns differ from the series' first instance")
    multi = [int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets]
    if any(multi):
        if len(datasets) != 1:
            raise DicomOutputError(f"{root}: {len(datasets)} instances, multi-frame among them; expected one")
        frames = [(0, *f) for f in _multiframe_frames(first, series[0].files[0])]
        return SeriesGeometry(root, datasets, frames, frame_uid)
    placed = []
    for one, path in zip(datasets, series[0].files, strict=True):
        row, col = _steps(one.get("ImageOrientationPatient"), one.get("PixelSpacing"), path)
        placed.append((one, _floats(one.get("ImagePositionPatient"), 3, "ImagePositionPatient", path), row, col))
    normal = np.cross(placed[0][2], placed[0][3])
    placed.sort(key=lambda p: float(p[1] @ normal))
    return SeriesGeometry(
        root, [p[0] for p in placed], [(i, p[1], p[2], p[3]) for i, p in enumerate(placed)], frame_uid
    )


def _ras_to_lps(point: Sequence[float]) -> list[float]:
    x, y, z = (float(v) for v in point)
    return [-x, -y, z]


def frames_from_volume(geometry: SeriesGeometry, array: np.ndarray, affine: np.ndarray, what: str) -> np.ndarray:
    """The values of ``array`` ``(X, Y, Z)`` (voxel -> RAS ``affine``: the input's grid) at the series' frames:
    ``(n_frames, rows, columns)`` float32, frame ``i`` being ``geometry.frames[i]``.

    Raises:
        DicomOutputError: ``array`` is not on the series' grid (a frame off its voxel plane, another row or column
            direction or spacing, another size); the message names the first mismatch.
    """
    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[:2] != (geometry.columns, geometry.rows):
        raise DicomOutputError(
            f"{what}: shape {arr.shape} is not the series' grid ({geometry.columns} columns x {geometry.rows} rows "
            f"x {len(geometry.frames)} slices)"
        )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    inverse = np.linalg.inv(lps)
    out = np.empty((len(geometry.frames), geometry.rows, geometry.columns), dtype=np.float32)
    for i, (_, position, row, col) in enumerate(geometry.frames):
        for name, step, axis in (("row", row, lps[:3, 0]), ("column", col, lps[:3, 1])):
            if np.linalg.norm(step - axis) > _AXIS_RTOL * np.linalg.norm(step):
                raise DicomOutputError(
                    f"{what}: frame {i + 1}'s {name} step {np.round(step, 4).tolist()} mm differs from the map's "
                    f"axis {np.round(axis, 4).tolist()} mm: not on the input's grid"
                )
        index = inverse[:3, :3] @ position + inverse[:3, 3]
        k = int(np.rint(index[2]))
        if np.max(np.abs(index - [0.0, 0.0, k])) > _PLANE_TOL_VOX or not 0 <= k < arr.shape[2]:
            raise DicomOutputError(
                f"{what}: frame {i + 1} at {np.round(position, 3).tolist()} mm (LPS) falls at voxel "
                f"{np.round(index, 3).tolist()} of the map, not on a slice of it: not on the input's grid"
            )
        out[i] = arr[:, :, k].T
    return out


def _algorithm(model: Mapping[str, Any] | None) -> hd.sr.AlgorithmIdentification:
    model = dict(model or {})
    parameters = [f"sha256={model['sha256']}"] if model.get("sha256") else None
    return hd.sr.AlgorithmIdentification(
        name=str(model.get("name") or "volcnn model"),
        version=str(model.get("version") or "unknown"),
        parameters=parameters,
        manufacturer="volcnn",
    )


def _device_uid(model: Mapping[str, Any] | None) -> str:
    """A stable UID for the device (volcnn with this model): the same for every run of the same model."""
    model = dict(model or {})
    return str(generate_uid(entropy_srcs=["volcnn", str(model.get("name")), str(model.get("sha256"))]))


@contextlib.contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """highdicom logs each module it copies at INFO, naming instance UIDs: keep a batch's log to its own lines."""
    log = logging.getLogger("highdicom")
    level = log.level
    if log.getEffectiveLevel() < logging.WARNING:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _save(dataset: Dataset, dest: Path) -> Path:
    with atomic_path(dest) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return dest


def _library_ready(ds: Dataset) -> bool:
    """Whether highdicom can describe ``ds`` in the SR's image library (TID 1604 needs a single-frame image's
    PixelSpacing, orientation, position and SliceThickness); otherwise the library stays empty and the evidence
    still references every instance."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return False
    if any(ds.get(kw) in (None, "") for kw in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")):
        return False
    try:
        return float(ds.get("SliceThickness")) > 0
    except (TypeError, ValueError):
        return False


def write_findings_sr(dest: str | os.PathLike[str], geometry: SeriesGeometry, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` (a case's ``findings.json``) as a TID 1500 Comprehensive 3D SR at ``dest`` (see the module
    docstring); new series and instance UIDs."""
    model: Mapping[str, Any] = doc["model"] if isinstance(doc.get("model"), Mapping) else {}
    algorithm = _algorithm(model)
    groups: list[Any] = []
    for rank, finding in enumerate(doc.get("findings") or [], start=1):
        region = hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([_ras_to_lps(finding["center_ras_mm"])], dtype=np.float64),
            frame_of_reference_uid=geometry.frame_of_reference_uid,
        )
        measurements = [
            hd.sr.Measurement(
                name=codes.DCM.Probability, value=float(finding["probability"]), unit=PROBABILITY_UNIT,
                algorithm_id=algorithm,
            )
        ]  # fmt: skip
        if finding.get("diameter_mm") is not None:
            measurements.append(
                hd.sr.Measurement(name=codes.SCT.Diameter, value=float(finding["diameter_mm"]), unit=_MILLIMETRE)
            )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"finding{rank:02d}"),
                referenced_region=region,
                finding_type=codes.DCM.FocalAbnormality,
                algorithm_id=algorithm,
                measurements=measurements,
                geometric_purpose=codes.DCM.Center,
            )
        )
    volume_mode = doc.get("mode") == "volume"
    label = "volume probability" if volume_mode else f"volume score ({doc.get('score_method', 'score')})"
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
            finding_type=codes.DCM.Finding,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=float(doc["score"]), unit=PROBABILITY_UNIT, algorithm_id=algorithm
                )
            ],
        )
    )
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_device_uid(model),
                name="volcnn",
                manufacturer_name="volcnn",
                model_name=str(model.get("name") or "volcnn model"),
            ),  # fmt: skip
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        referenced_images=geometry.datasets if all(_library_ready(ds) for ds in geometry.datasets) else None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=geometry.datasets,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER[SR_NAME],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="volcnn",
        is_complete=True,
        series_description="volcnn findings",
        manufacturer_model_name=str(model.get("name") or "volcnn model"),
        software_versions=f"volcnn {volcnn.__version__}",
    )
    return _save(sr, Path(dest))


def write_parametric_map(
    dest: str | os.PathLike[str],
    geometry: SeriesGeometry,
    channels: Sequence[tuple[np.ndarray, np.ndarray, hd.pm.RealWorldValueMapping]],
    *,
    series_description: str,
    model: Mapping[str, Any] | None = None,
    window: tuple[float, float] = (0.5, 1.0),
) -> Path:
    """Write maps on the input's grid as one Parametric Map at ``dest``: one frame per input slice (per channel),
    positions copied from the source slices, new series and instance UIDs.

    The values, in [0, 1], are stored as unsigned 16-bit integers ``round(v * 65535)`` and compressed with RLE
    Lossless; each channel's real-world value mapping (its ``value_range`` in stored values, its slope
    ``1 / 65535``) gives them back. Float32 frames, the standard's float option, have no codec: on the demo's
    unseen CT ``case_007`` (140 x 256 x 256, 39% of the heat map above 1e-4) they take 36.7 MB, 16-bit frames
    18.4 MB and their RLE 3.9 MB (0.2 s with pylibjpeg-rle).

    Args:
        dest: the file.
        geometry: the input series (:func:`read_series_geometry`).
        channels: per channel ``(array (X, Y, Z), its voxel -> RAS affine, its real-world value mapping)``.
        series_description: SeriesDescription.
        model: ``findings.json``'s model (name and version become ManufacturerModelName / SoftwareVersions).
        window: the VOI window ``(centre, width)`` a viewer opens it with, in real-world values.
    """
    if not channels:
        raise ValueError("no channel to write")
    frames = [
        _quantized(frames_from_volume(geometry, array, affine, f"{Path(dest).name}")) for array, affine, _ in channels
    ]
    pixels = frames[0] if len(frames) == 1 else np.stack(frames, axis=-1)
    mappings: Any = [channels[0][2]] if len(channels) == 1 else [[c[2]] for c in channels]
    model = dict(model or {})
    pm = hd.pm.ParametricMap(
        source_images=geometry.datasets,
        pixel_array=pixels,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER.get(Path(dest).name, 9009),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="volcnn",
        manufacturer_model_name=str(model.get("name") or "volcnn model"),
        software_versions=_software_versions(model),
        device_serial_number=str(model.get("sha256") or "unknown")[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings,
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=window[0] * LEVELS, window_width=window[1] * LEVELS)
        ],
        series_description=series_description,
        content_description=series_description[:64],
        transfer_syntax_uid=pydicom.uid.RLELossless,
    )
    for keyword in _ANATOMY:  # the map shows the input's anatomy (a paired body part needs its Laterality)
        value = geometry.datasets[0].get(keyword)
        if value not in (None, ""):
            setattr(pm, keyword, value)
    return _save(pm, Path(dest))


def _software_versions(model: Mapping[str, Any]) -> Any:
    """SoftwareVersions (LO, multi-valued): volcnn's version and the model's (a list: pydicom refuses a tuple)."""
    return [f"volcnn {volcnn.__version__}", f"model {model.get('version') or 'unknown'}"]


def _quantized(frames: np.ndarray) -> np.ndarray:
    """``frames`` in [0, 1] as the stored uint16 values ``round(v * LEVELS)`` (NaN as 0, clipped to the range)."""
    return np.rint(np.clip(np.nan_to_num(frames, nan=0.0), 0.0, 1.0) * LEVELS).astype(np.uint16)


def _probability_mapping() -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label="probability",
        lut_explanation="probability of the model's class (calibrated when the model is)",
        unit=PROBABILITY_UNIT,
        value_range=(0, LEVELS),
        slope=1.0 / LEVELS,
        intercept=0.0,
        quantity_definition=codes.DCM.Probability,
    )


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DicomOutputError(f"{path}: not found")
    img: Any = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def remove_dicom_outputs(case_dir: str | os.PathLike[str]) -> None:
    """Delete the DICOM outputs of a case folder (a stale set from an earlier run, or a partial one)."""
    for name in DICOM_OUTPUT_NAMES:
        (Path(case_dir) / name).unlink(missing_ok=True)


def write_case_dicom(series_folder: str | os.PathLike[str], case_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the DICOM outputs of one finished case (``case_dir/findings.json`` from the DICOM series
    ``series_folder``): the SR always, the heat map's Parametric Map in candidate mode, the explanations' Parametric
    Map when ``findings.json`` lists explanations. Earlier DICOM outputs of the case are removed first; on an error
    none is left.

    Returns:
        The files written.

    Raises:
        DicomOutputError: the reason, naming the file or series; an error inside pydicom or highdicom becomes one
            too, with the input's identifying values (:data:`_IDENTIFYING`) blanked out of its message.
    """
    case_dir = Path(case_dir)
    remove_dicom_outputs(case_dir)
    try:
        try:
            doc = json.loads((case_dir / "findings.json").read_text())
        except (OSError, ValueError) as e:
            raise DicomOutputError(f"{case_dir / 'findings.json'}: cannot read ({type(e).__name__}: {e})") from e
        geometry = read_series_geometry(series_folder)
        try:
            written = _write_all(case_dir, geometry, doc)
        except DicomOutputError:
            raise
        except Exception as e:  # pydicom / highdicom: their message may quote a header value
            message = _scrub(f"{series_folder}: {type(e).__name__}: {e}", geometry.datasets[0])
            raise DicomOutputError(message) from None
    except BaseException:
        remove_dicom_outputs(case_dir)
        raise
    return written


def _scrub(message: str, header: Dataset) -> str:
    """``message`` with every identifying value of ``header`` (:data:`_IDENTIFYING`) replaced by ``<redacted>``."""
    values: set[str] = set()
    for keyword in _IDENTIFYING:
        value = header.get(keyword)
        for item in value if isinstance(value, (list, tuple, MultiValue)) else [value]:
            text = str(item or "").strip()
            values |= {text, text.replace("^", " ").strip()}
    for text in sorted(values, key=len, reverse=True):
        if len(text) > 2:  # shorter values would blank out unrelated numbers
            message = message.replace(text, "<redacted>")
    return message


def _write_all(case_dir: Path, geometry: SeriesGeometry, doc: Mapping[str, Any]) -> list[Path]:
    """The SR, the heat map's and the explanations' maps of :func:`write_case_dicom`."""
    written = [write_findings_sr(case_dir / SR_NAME, geometry, doc)]
    model = doc["model"] if isinstance(doc.get("model"), Mapping) else None
    if doc.get("mode") != "volume":
        heat, affine = _load_nifti(case_dir / "heatmap.nii.gz")
        written.append(
            write_parametric_map(
                case_dir / HEATMAP_PM_NAME, geometry, [(heat, affine, _probability_mapping())],
                series_description="volcnn heat map", model=model,
            )
        )  # fmt: skip
        del heat
    explanations = [x for x in doc.get("explanations") or [] if isinstance(x, Mapping) and x.get("nifti")]
    if explanations:
        channels = []
        for entry in explanations:
            array, affine = _load_nifti(case_dir / str(entry["nifti"]))
            label = str(entry.get("name") or Path(str(entry["nifti"])).name.split("_")[0])[:16]
            mapping = hd.pm.RealWorldValueMapping(
                lut_label=label,
                lut_explanation=f"{entry.get('method', 'saliency')} saliency of {label}"[:64],
                unit=_NO_UNITS,
                value_range=(0, LEVELS),
                slope=1.0 / LEVELS,
                intercept=0.0,
            )
            channels.append((array, affine, mapping))
        written.append(
            write_parametric_map(
                case_dir / EXPLAIN_PM_NAME, geometry, channels, series_description="volcnn explanation", model=model
            )
        )
    return written


def write_batch_dicom(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    result: Mapping[str, Any],
    *,
    shard: Shard | None = None,
) -> list[dict[str, str]]:
    """The post-step of ``volcnn infer --dicom-out``: :func:`write_case_dicom` for every processed case whose
    input is a DICOM series folder (a file input gets a logged note and no DICOM); inputs that failed lose any
    DICOM outputs left from an earlier run.

    A case whose DICOM outputs cannot be written is logged and returned as ``{"input", "case", "stage":
    "dicom_out", "error"}`` (its findings.json and heat map stay); the other cases go on. The failures are appended
    to ``OUT/failures.json`` and their ``summary.csv`` rows get the status ``dicom_out failed`` (by rank 0 under
    torchrun, each rank having written its own cases).

    Args:
        inputs: the batch, as given to :meth:`~volcnn.inference.InferenceRunner.run`.
        out_dir: its output folder.
        result: what :meth:`~volcnn.inference.InferenceRunner.run` returned.
        shard: this process's part of the batch under torchrun (a collective then: every rank must call it).

    Returns:
        The DICOM failures of the whole batch (every rank gets all of them).
    """
    out = Path(out_dir)
    cases = case_names(inputs)
    done = {str(p["case"]) for p in result.get("processed", [])}
    mine = range(len(inputs)) if shard is None else shard.indices(len(inputs))
    failures: list[dict[str, str]] = []
    for i in mine:
        path, case = Path(inputs[i]), cases[i]
        if case not in done:
            remove_dicom_outputs(out / case)
            continue
        if not path.is_dir():
            logger.warning(
                "%s: --dicom-out needs a DICOM series folder as input; %s is a file, no DICOM written", case, path.name
            )
            remove_dicom_outputs(out / case)
            continue
        try:
            with _quiet_highdicom():
                written = write_case_dicom(path, out / case)
        except Exception as e:  # one case's DICOM must not stop the batch
            message = str(e) if isinstance(e, DicomOutputError) else f"{path}: {type(e).__name__}: {e}"
            logger.error("%s: DICOM output failed: %s", case, message)
            logger.debug("traceback", exc_info=True)
            failures.append({"input": str(inputs[i]), "case": case, "stage": "dicom_out", "error": message})
            continue
        logger.info("%s: DICOM %s", case, ", ".join(p.name for p in written))
    if shard is not None:
        failures = [f for part in shard.gather(failures) for f in part]
    if failures and (shard is None or shard.rank == 0):
        _record_failures(out, failures)
    return failures


def _record_failures(out: Path, failures: list[dict[str, str]]) -> None:
    """Append ``failures`` to ``out/failures.json`` (the runner's list) and mark their cases' ``summary.csv`` rows
    ``dicom_out failed`` (their scores stay: the findings are valid), each file replaced atomically."""
    _mark_summary(out / "summary.csv", {f["case"] for f in failures}, "dicom_out failed")
    try:
        earlier = json.loads((out / "failures.json").read_text())
    except (OSError, ValueError):
        earlier = []
    if not isinstance(earlier, list):
        earlier = []
    atomic_write_json(out / "failures.json", [*earlier, *failures])


def _mark_summary(path: Path, cases: set[str], status: str) -> None:
    """Set the ``status`` of ``cases``' rows of the runner's ``summary.csv`` (left alone when it is missing)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return
    reader = csv.DictReader(io.StringIO(text))
    fields = list(reader.fieldnames or [])
    rows = [dict(row, status=status) if row.get("case") in cases else row for row in reader]
    if "status" not in fields:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
