"""The volume every reader returns, and the error every reader raises: the types the rest of volcnn builds on."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from volcnn.core.errors import VolcnnError

__all__ = ["Volume", "VolumeError"]


class VolumeError(VolcnnError, ValueError):
    """A volume could not be read exactly; the message names the file and the problem (exit code 1)."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Volume:
    """A CT volume in Hounsfield units.

    Attributes:
        array: float32 ``(X, Y, Z)`` voxel values in HU, in the stored voxel order; C-contiguous when returned
            by :func:`load_volume` (what MONAI and torch take without a copy).
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
