"""Patch extraction in world coordinates, and fitting a whole volume into a patch.

``WorldPatchCrop`` cuts ``size`` voxels centred on a world RAS point (candidate mode, as in LUNA16): voxel
``size // 2`` of the patch is the voxel nearest the point, so the point lies within half a voxel of the patch
centre. ``FitVolume`` scales a whole volume, keeping its aspect ratio, into a patch (volume mode). Both return
a new ``MetaTensor`` whose affine is exact, and never keep a view of the (large) input alive.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from volcnn.core.geometry import as_affine, scale_affine, translate, world_to_voxel

__all__ = ["WorldPatchCrop", "FitVolume", "CropOrFitd", "center_tensor"]


def _with_affine(data: torch.Tensor, like: torch.Tensor, affine: np.ndarray) -> MetaTensor:
    meta = dict(like.meta) if isinstance(like, MetaTensor) else {}
    out = MetaTensor(data.contiguous().clone(), meta=meta)
    out.affine = torch.as_tensor(affine, dtype=torch.float64)
    return out


def _pad_spatial(x: torch.Tensor, lo: Sequence[int], hi: Sequence[int], value: float) -> torch.Tensor:
    """Pad the three trailing dims of ``x`` ``(C, X, Y, Z)`` by ``lo`` before and ``hi`` after."""
    if not any(lo) and not any(hi):
        return x
    pads: list[int] = []
    for a in (2, 1, 0):  # F.pad lists the last dimension first
        pads += [int(lo[a]), int(hi[a])]
    return F.pad(x, pads, mode="constant", value=value)


class WorldPatchCrop(Transform):
    """Crop ``size`` voxels of a ``(C, X, Y, Z)`` MetaTensor around a world RAS point, padding outside.

    Args:
        size: output spatial size ``(X, Y, Z)``.
        pad_value: value for voxels outside the input (0 is air after HU windowing).
    """

    def __init__(self, size: Sequence[int] | np.ndarray, pad_value: float = 0.0) -> None:
        self.size = np.asarray([int(s) for s in size])
        self.pad_value = float(pad_value)

    def __call__(self, img: torch.Tensor, center: Sequence[float]) -> MetaTensor:  # type: ignore[override]
        affine = as_affine(img.affine) if isinstance(img, MetaTensor) else np.eye(4)
        shape = np.asarray(img.shape[1:])
        c = np.rint(world_to_voxel(affine, center)).astype(int)
        start = c - self.size // 2
        end = start + self.size
        lo, hi = np.maximum(0, -start), np.maximum(0, end - shape)
        a, b = np.clip(start, 0, shape), np.clip(end, 0, shape)
        x = torch.as_tensor(img)[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]]
        if any(np.minimum(b - a, self.size) <= 0):  # entirely outside: all padding
            x = torch.as_tensor(img).new_full((img.shape[0], *self.size.tolist()), self.pad_value)
            lo = hi = np.zeros(3, dtype=int)
        x = _pad_spatial(x, lo, hi, self.pad_value)
        return _with_affine(x, img, affine @ translate(start))


class FitVolume(Transform):
    """Scale a whole ``(C, X, Y, Z)`` volume, keeping its aspect ratio, to fit ``fit_size``, then centre it in
    ``out_size`` (default ``fit_size``) padded with ``pad_value``. Downsampling averages (area), upsampling is
    trilinear.
    """

    def __init__(
        self,
        fit_size: Sequence[int] | np.ndarray,
        out_size: Sequence[int] | np.ndarray | None = None,
        pad_value: float = 0.0,
    ) -> None:
        self.fit_size = np.asarray([int(s) for s in fit_size])
        self.out_size = self.fit_size if out_size is None else np.asarray([int(s) for s in out_size])
        if np.any(self.out_size < self.fit_size):
            raise ValueError(f"out_size {self.out_size.tolist()} must be >= fit_size {self.fit_size.tolist()}")
        self.pad_value = float(pad_value)

    def __call__(self, img: torch.Tensor) -> MetaTensor:
        affine = as_affine(img.affine) if isinstance(img, MetaTensor) else np.eye(4)
        shape = np.asarray(img.shape[1:])
        scale = float(np.min(self.fit_size / shape))
        new = np.maximum(1, np.minimum(self.fit_size, np.rint(shape * scale))).astype(int)
        x = torch.as_tensor(img, dtype=torch.float32)[None]
        mode = "area" if scale < 1 else "trilinear"
        x = F.interpolate(
            x, size=tuple(new.tolist()), mode=mode, **({} if mode == "area" else {"align_corners": False})
        )[0]
        lo = (self.out_size - new) // 2
        x = _pad_spatial(x, lo, self.out_size - new - lo, self.pad_value)
        return _with_affine(x, img, affine @ scale_affine(shape, new) @ translate(-lo))


class CropOrFitd(MapTransform):
    """Candidate mode when the sample has a ``center`` (world RAS mm), volume mode otherwise.

    Candidate mode crops ``patch_size + 2 * margin`` around the centre; volume mode fits the whole volume into
    ``patch_size`` and pads by ``margin``. Either way the output is ``(C, *(patch_size + 2 * margin))``, so the
    random augmentation that follows can end with a centre crop to ``patch_size``. ``center`` becomes a float32
    tensor ``(3,)`` (NaN in volume mode) so that batches collate.
    """

    def __init__(
        self,
        keys: KeysCollection,
        patch_size: Sequence[int],
        margin: int | Sequence[int] = 0,
        center_key: str = "center",
        pad_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        patch = np.asarray([int(s) for s in patch_size])
        out = patch + 2 * np.broadcast_to(np.asarray(margin, dtype=int), patch.shape)
        self.crop = WorldPatchCrop(out, pad_value)
        self.fit = FitVolume(patch, out, pad_value)
        self.center_key = center_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        center = d.get(self.center_key)
        has_center = center is not None and not bool(torch.isnan(torch.as_tensor(center, dtype=torch.float64)).any())
        for key in self.key_iterator(d):
            d[key] = self.crop(d[key], center) if has_center else self.fit(d[key])  # type: ignore[arg-type]
        d[self.center_key] = center_tensor(center if has_center else None)
        return d


def center_tensor(center: object) -> torch.Tensor:
    """A sample's candidate centre as float32 ``(3,)``, NaN without one (volume mode), so that batches collate."""
    if center is None:
        return torch.full((3,), float("nan"))
    return torch.as_tensor(center, dtype=torch.float32)
