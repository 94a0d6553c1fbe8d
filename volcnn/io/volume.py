"""Reading one CT volume (NIfTI file, MetaImage file or DICOM series folder) into HU with a RAS affine, validated.

A reader never returns a volume whose geometry or values differ from what was acquired: when it cannot be
sure it raises :class:`~volcnn.io.types.VolumeError` naming the file and the problem. :func:`load_volume` picks
the reader by the input's kind (:mod:`volcnn.io.nifti`, :mod:`volcnn.io.metaimage`, :mod:`volcnn.io.dicom`),
brings the voxels into a C-ordered float32 ``(X, Y, Z)`` array (:mod:`volcnn.io.layout`) and runs the checks
every volume passes (:mod:`volcnn.io.checks`). Non-fatal observations (sform/qform disagreement, values that do
not look like HU, replaced NaN voxels, ...) are listed in ``Volume.warnings`` and logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from volcnn.io.checks import NAN_POLICIES, check_volume
from volcnn.io.dicom import load_series_folder
from volcnn.io.layout import xyz_float32
from volcnn.io.metaimage import load_metaimage
from volcnn.io.nifti import load_nifti
from volcnn.io.sources import METAIMAGE_SUFFIXES, NIFTI_SUFFIXES, is_volume_file
from volcnn.io.types import Volume, VolumeError

__all__ = ["is_volume_path", "load_volume"]


def is_volume_path(path: str | os.PathLike[str]) -> bool:
    """True for a NIfTI or MetaImage file name, or a folder (a DICOM series)."""
    return is_volume_file(path) or os.path.isdir(path)


def load_volume(path: str | os.PathLike[str], nan_policy: str = "refuse", expect_hu: bool = True) -> Volume:
    """Read a NIfTI file, a MetaImage file or a DICOM series folder; see :class:`~volcnn.io.types.Volume`.

    Args:
        path: a ``.nii``/``.nii.gz``/``.mhd``/``.mha`` file or a folder holding one DICOM series.
        nan_policy: ``"refuse"`` (default): NaN/Inf voxels are an error; ``"replace"``: they are set to the
            minimum finite value of the volume (-1024 if there is none) and the count is recorded in
            ``Volume.warnings``.
        expect_hu: warn (and record in ``Volume.warnings``) when the values do not look like CT in HU; False for a
            model whose intensity setting is not ``hu`` (:func:`~volcnn.io.checks.check_volume`).

    Returns:
        The volume: float32 C-ordered ``(X, Y, Z)`` HU values with a float64 ``(4, 4)`` RAS affine.

    Raises:
        VolumeError: naming the file and the problem.
    """
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    p = Path(path)
    if not p.exists():
        raise VolumeError(p, "does not exist")
    if p.is_dir():
        vol = load_series_folder(p)
    elif str(p).endswith(NIFTI_SUFFIXES):
        vol = load_nifti(p)
    elif str(p).endswith(METAIMAGE_SUFFIXES):
        vol = load_metaimage(p)
    else:
        raise VolumeError(p, "not a NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) file, or a DICOM series folder")
    if vol.array.ndim == 3:  # a DICOM series comes as a transposed (Z, Y, X) array; the other checks need 3D
        vol.array = xyz_float32(vol.array)
    check_volume(vol, nan_policy, expect_hu)
    return vol
