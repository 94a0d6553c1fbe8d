"""``VolcnnReader``: the validated :func:`~volcnn.io.volume.load_volume` as a MONAI ``ImageReader``.

Training, evaluation and inference all load through it (:class:`LoadVolumed`, which uses this reader alone), so a
bad scan fails at load with the same message everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.config import KeysCollection, PathLike
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from volcnn.io.layout import xyz_float32
from volcnn.io.types import Volume
from volcnn.io.volume import is_volume_path, load_volume

__all__ = ["LoadVolumed", "PreloadedReader", "VolcnnReader"]


class VolcnnReader(ImageReader):
    """Reads NIfTI files and DICOM series folders as float32 HU ``(X, Y, Z)`` with a RAS affine.

    :meth:`get_data` hands MONAI a C-contiguous float32 array, which ``LoadImage`` wraps as a tensor without
    copying it. ``expect_hu=False`` leaves out the warnings on values that do not look like HU
    (:func:`~volcnn.io.checks.check_volume`).
    """

    def __init__(self, expect_hu: bool = True) -> None:
        super().__init__()
        self.expect_hu = expect_hu

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(is_volume_path(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Volume | list[Volume]:
        vols = [load_volume(f, expect_hu=self.expect_hu) for f in ensure_tuple(data)]
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
        # C-ordered float32 already when read by load_volume; MONAI would otherwise make it contiguous with
        # np.ascontiguousarray, a whole-volume strided copy several times slower than xyz_float32's blocks
        return xyz_float32(vol.array), meta


class PreloadedReader(VolcnnReader):
    """A :class:`VolcnnReader` that hands out a volume already in memory instead of reading the file again.

    Pass it to :meth:`LoadVolumed.__call__` (``load(data, reader=PreloadedReader(volume))``) to run a chain on a
    volume the caller has loaded (and checked) already.
    """

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self.volume = volume

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Volume:
        return self.volume


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that reads through :class:`VolcnnReader` only.

    Given a reader instance, MONAI's ``LoadImage`` registers it *in front of* its default readers and, when it
    raises, silently falls back to them — so a scan our reader refuses (truncated, NaN, two series) would be
    loaded anyway by ``NibabelReader`` or ``ITKReader``. Passing the reader at call time makes MONAI use it alone,
    and its error (naming the file and the problem) reaches the user unchanged.

    Output per key: a MetaTensor ``(X, Y, Z)`` float32 in HU with ``affine`` (voxel -> RAS mm). ``expect_hu``:
    as :class:`VolcnnReader`'s.
    """

    def __init__(
        self, keys: KeysCollection, allow_missing_keys: bool = False, expect_hu: bool = True, **kwargs: Any
    ) -> None:
        self.volume_reader = VolcnnReader(expect_hu)
        reader: Any = self.volume_reader  # MONAI's annotation says a class; an instance is what it registers
        super().__init__(keys, reader=reader, image_only=True, allow_missing_keys=allow_missing_keys, **kwargs)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> dict:
        return super().__call__(data, reader or self.volume_reader)
