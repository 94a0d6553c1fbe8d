"""Reading a MetaImage file (``.mhd`` + data file, or ``.mha``), the format LUNA16 ships its scans in."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from volcnn.io.layout import xyz_float32
from volcnn.io.types import Volume, VolumeError

__all__ = ["load_metaimage"]


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
