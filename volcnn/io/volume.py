"""Reading one CT volume (NIfTI file or DICOM series folder) into HU with a RAS affine, validated.

A reader never returns a volume whose geometry or values differ from what was acquired: when it cannot be
sure it raises :class:`VolumeError` naming the file and the problem. The DICOM checks here are the first
layer (series grouping, slice spacing); the ingest work deepens them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "Volume",
    "VolumeError",
    "load_volume",
    "load_nifti",
    "load_metaimage",
    "load_dicom_series",
    "is_volume_path",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: MetaImage, the format LUNA16 ships its scans in
METAIMAGE_SUFFIXES = (".mhd", ".mha")
#: relative tolerance on the spacing between consecutive slices of a DICOM series
SLICE_SPACING_RTOL = 0.01


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
        array: float32 ``(X, Y, Z)`` voxel values in HU, in the stored voxel order.
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


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file, a MetaImage file or a DICOM series folder; see :class:`Volume`.

    Raises:
        VolumeError: naming the file and the problem.
    """
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
    _check_volume(vol)
    return vol


def load_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file completely (a truncated file is an error, not zeros) as float32 ``(X, Y, Z)``."""
    try:
        img: Any = nib.load(str(path))
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            img = img.slicer[..., 0]
        elif len(shape) != 3:
            raise VolumeError(path, f"expected a 3D volume, got shape {tuple(shape)}")
        array = np.asarray(img.get_fdata(dtype=np.float32))
        affine = np.asarray(img.affine, dtype=np.float64)
    except VolumeError:
        raise
    except Exception as e:  # nibabel and gzip raise many types for damaged files
        raise VolumeError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    return Volume(array=array, affine=affine, path=str(path), kind="nifti")


def load_dicom_series(folder: str | os.PathLike[str]) -> Volume:
    """Read the single CT series in ``folder`` through SimpleITK, in HU, with a RAS affine.

    Refuses folders with no series or several series, and series whose slice positions are not evenly
    spaced (a missing or duplicated slice).
    """
    import SimpleITK as sitk

    folder = str(folder)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise VolumeError(folder, "no DICOM series found in this folder")
    if len(series) > 1:
        raise VolumeError(folder, f"{len(series)} DICOM series in one folder; give one series folder at a time")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])
    if len(files) < 2:
        raise VolumeError(folder, f"series has {len(files)} slice; a 3D volume needs at least 2")
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(folder, f"cannot read DICOM series ({str(e).strip().splitlines()[-1]})") from e
    return _from_sitk(image, folder, "dicom")


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
    """A SimpleITK image (LPS physical space) as a :class:`Volume` ``(X, Y, Z)`` with a RAS affine."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine_lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return Volume(array=array, affine=affine, path=str(path), kind=kind)


def _check_slice_positions(folder: str, files: tuple[str, ...] | list[str]) -> None:
    import pydicom

    positions, normal = [], None
    for f in files:
        try:
            ds = pydicom.dcmread(
                f, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
            )
            pos = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            if normal is None:
                iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
                normal = np.cross(iop[:3], iop[3:])
        except Exception as e:
            raise VolumeError(f, f"cannot read slice geometry ({type(e).__name__}: {e})") from e
        positions.append(float(pos @ normal))
    steps = np.diff(np.sort(np.asarray(positions)))
    if np.any(steps < 1e-3):
        raise VolumeError(folder, "duplicate slice positions in the series")
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > SLICE_SPACING_RTOL * median):
        raise VolumeError(
            folder,
            f"uneven slice spacing (median {median:.3f} mm, range {steps.min():.3f}-{steps.max():.3f} mm): "
            "missing slices?",
        )


def _check_volume(vol: Volume) -> None:
    if min(vol.array.shape) < 2:
        raise VolumeError(vol.path, f"expected a 3D volume, got shape {vol.array.shape} (a single slice?)")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise VolumeError(vol.path, "degenerate or non-finite affine (voxel-to-world geometry)")
    bad = int(np.size(vol.array) - np.count_nonzero(np.isfinite(vol.array)))
    if bad:
        raise VolumeError(vol.path, f"{bad} NaN/Inf voxels")
