"""``VolcnnReader``: the validated :func:`~volcnn.io.volume.load_volume` as a MONAI ``ImageReader``.

Training, evaluation and inference all load through it (``LoadImaged(keys, reader=VolcnnReader())``), so a bad
scan fails at load with the same message everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from volcnn.io.volume import Volume, is_volume_path, load_volume

__all__ = ["VolcnnReader"]


class VolcnnReader(ImageReader):
    """Reads NIfTI files and DICOM series folders as float32 HU ``(X, Y, Z)`` with a RAS affine."""

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(is_volume_path(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Volume | list[Volume]:
        vols = [load_volume(f) for f in ensure_tuple(data)]
        return vols if len(vols) > 1 else vols[0]

    def get_data(self, img: Volume | list[Volume]) -> tuple[np.ndarray, dict]:
        vols = ensure_tuple(img)
        if len(vols) != 1:
            raise ValueError("VolcnnReader loads one volume per key")
        vol = vols[0]
        meta = {
            MetaKeys.AFFINE: vol.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: vol.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(vol.array.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "source_kind": vol.kind,
        }
        return vol.array, meta
