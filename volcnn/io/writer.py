"""Writing volumes: NIfTI with a given affine, atomically."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from volcnn.core.atomic import atomic_path

__all__ = ["write_nifti"]


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` ``(X, Y, Z)`` with ``affine`` (voxel -> RAS mm, sform and qform, code 1) atomically."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
