"""Writing a synthetic volume to disk: a DICOM CT series (pydicom), deterministic NIfTI-gzip, atomic files.

DICOM is LPS: positions and direction cosines are the RAS affine's with x and y negated. The series is
always axial: its slices run along the stored array axis closest to superior/inferior, whatever the
storage order of the NIfTI array (flipped and/or permuted axes). Pixel data are unsigned 12-bit values
``HU + 1024`` with RescaleIntercept -1024 and RescaleSlope 1.
"""

from __future__ import annotations

import gzip
import logging
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from volcnn.core.atomic import atomic_write_bytes

__all__ = ["nifti_gz_bytes", "slice_layout", "write_dicom_series"]

logger = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_gz_bytes(image: np.ndarray, affine: np.ndarray, description: str = "volcnn synthetic CT (HU)") -> bytes:
    """Encode an int16 volume as NIfTI-1 gzip bytes that depend only on the data (gzip mtime 0, no name).

    Args:
        image: int16 array ``(I, J, K)`` in storage order (any strides).
        affine: ``(4, 4)`` voxel-to-RAS affine, stored as sform and qform with code 1 (scanner).
        description: header ``descrip`` text (80 bytes at most).

    Returns:
        The ``.nii.gz`` file content.
    """
    img = nib.Nifti1Image(np.asarray(image, dtype=np.int16), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _ds(value: float) -> str:
    """Format a number as a DICOM decimal string (16 characters at most)."""
    for decimals in (8, 6, 4, 2):
        text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
        text = "0" if text in ("-0", "") else text
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DICOM DS")


def slice_layout(affine: np.ndarray) -> tuple[int, int, int]:
    """Storage axes ``(slice, column, row)`` of a volume for an axial series.

    The slice axis is the one closest to superior/inferior; of the two others, the first one runs
    along a DICOM row (column index), the second one down the columns (row index).
    """
    dirs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    slice_axis = int(np.argmax(np.abs(dirs[2])))
    col_axis, row_axis = (a for a in range(3) if a != slice_axis)
    return slice_axis, col_axis, row_axis


def write_dicom_series(
    image: np.ndarray,
    affine: np.ndarray,
    out_dir: str | Path,
    *,
    uid_entropy: list[str],
    patient_id: str,
    series_description: str = "volcnn synthetic chest CT",
) -> list[Path]:
    """Write a volume as an axial CT series, one ``IM0001.dcm``... file per slice.

    Args:
        image: int16 HU array ``(I, J, K)`` in storage order, values in [-1024, 3071].
        affine: ``(4, 4)`` voxel-to-RAS affine of ``image`` (axis-aligned; flips and permutations allowed).
        out_dir: series folder (created; stale ``IM*.dcm`` files from an earlier run are removed).
        uid_entropy: strings that make the UIDs deterministic and unique (e.g. seed and case id).
        patient_id: synthetic, non-identifying patient id (``"SYNTH-p000"``).
        series_description: SeriesDescription text.

    Returns:
        The written file paths, in InstanceNumber order.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {image.shape}")
    out_dir = Path(out_dir)
    slice_axis, col_axis, row_axis = slice_layout(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cos = _LPS @ affine[:3, col_axis] / spacing[col_axis]  # direction of increasing column index
    col_cos = _LPS @ affine[:3, row_axis] / spacing[row_axis]  # direction of increasing row index
    study_uid, series_uid, frame_uid = (generate_uid(entropy_srcs=[*uid_entropy, k]) for k in ("st", "se", "for"))
    pixels = np.transpose(image, (slice_axis, row_axis, col_axis))  # (slices, rows, columns) view
    written = []
    for s in range(image.shape[slice_axis]):
        index = np.zeros(4)
        index[slice_axis], index[3] = s, 1.0
        pos = _LPS @ (affine @ index)[:3]
        sop_uid = generate_uid(entropy_srcs=[*uid_entropy, "sop", str(s)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Phantom", patient_id, "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDescription, ds.SeriesDescription = "volcnn synthetic", series_description
        ds.Manufacturer, ds.BodyPartExamined, ds.KVP = "volcnn", "CHEST", "120"
        ds.SeriesNumber, ds.InstanceNumber, ds.PatientPosition = 1, s + 1, "HFS"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [_ds(spacing[row_axis]), _ds(spacing[col_axis])]  # (row spacing, column spacing)
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[slice_axis])
        ds.SliceLocation = _ds(pos[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = image.shape[row_axis], image.shape[col_axis]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        plane = np.clip(pixels[s].astype(np.int32) + 1024, 0, 4095).astype("<u2")
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        buf = BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        written.append(atomic_write_bytes(out_dir / f"IM{s + 1:04d}.dcm", buf.getvalue()))
    keep = {p.name for p in written}
    for stale in out_dir.glob("IM*.dcm"):
        if stale.name not in keep:
            stale.unlink()
    logger.debug("wrote %d DICOM slices to %s", len(written), out_dir)
    return written
