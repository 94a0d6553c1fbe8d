"""Reading one CT volume (NIfTI file or DICOM series folder) into HU with a RAS affine, validated.

A reader never returns a volume whose geometry or values differ from what was acquired: when it cannot be
sure it raises :class:`VolumeError` naming the file and the problem. DICOM series are read and validated by
:mod:`volcnn.io.dicom`. Non-fatal observations (sform/qform disagreement, values that do not look like HU,
replaced NaN voxels, ...) are listed in :attr:`Volume.warnings` and logged.
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
#: two affines "disagree" when they map some corner of the volume more than this apart (mm)
AFFINE_AGREEMENT_MM = 1e-3
#: what :func:`load_volume` does with NaN/Inf voxels
NAN_POLICIES = ("refuse", "replace")
#: fill value for NaN/Inf voxels when a volume has no finite voxel at all
NAN_FILL_HU = -1024.0


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
    _check_volume(vol, nan_policy)
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
        warnings = _sform_qform_warnings(img.header, array.shape[:3])
    except VolumeError:
        raise
    except Exception as e:  # nibabel and gzip raise many types for damaged files
        raise VolumeError(path, f"cannot read NIfTI ({type(e).__name__}: {e})") from e
    return Volume(array=array, affine=affine, path=str(path), kind="nifti", warnings=warnings)


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
    """A SimpleITK image (LPS physical space) as a :class:`Volume` ``(X, Y, Z)`` with a RAS affine."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (Z, Y, X) -> (X, Y, Z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine_lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return Volume(array=array, affine=affine, path=str(path), kind=kind)


def _check_volume(vol: Volume, nan_policy: str = "refuse") -> None:
    """Refuse a non-3D volume or a degenerate affine; refuse or replace NaN/Inf; warn on non-HU values."""
    if vol.array.ndim != 3 or min(vol.array.shape) < 2:
        raise VolumeError(vol.path, f"expected a 3D volume, got shape {vol.array.shape} (a single slice?)")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise VolumeError(vol.path, "degenerate or non-finite affine (voxel-to-world geometry)")
    finite = np.isfinite(vol.array)
    bad = int(np.size(vol.array) - np.count_nonzero(finite))
    if bad:
        if nan_policy != "replace":
            raise VolumeError(vol.path, f"{bad} NaN/Inf voxels (load with nan_policy='replace' to replace them)")
        fill = float(vol.array[finite].min()) if bad < vol.array.size else NAN_FILL_HU
        vol.array[~finite] = fill
        vol.warnings.append(f"replaced {bad} NaN/Inf voxels with {fill:g}")
    vol.warnings.extend(_hu_warnings(vol.array))
    for w in vol.warnings:
        logger.warning("%s: %s", vol.path, w)


def _hu_warnings(array: np.ndarray) -> list[str]:
    """Warnings for values that do not look like CT in Hounsfield units (air is near -1000 HU)."""
    lo, hi = float(array.min()), float(array.max())
    if lo < 0:
        return []
    if hi < 100:
        return [f"values lie in [{lo:g}, {hi:g}]: looks like a mask or probability map, not CT in HU"]
    if hi <= 255 and bool(np.all(np.mod(array, 1) == 0)):
        return [f"integer values in [{lo:g}, {hi:g}]: looks like an 8-bit image or label map, not CT in HU"]
    return [
        f"no negative values (range [{lo:g}, {hi:g}]): CT in HU has air near -1000; MR, or stored values "
        "without RescaleIntercept?"
    ]
