"""Hounsfield-unit windowing: ``HUWindow`` (array) and ``HUWindowd`` (dictionary)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = ["HUWindow", "HUWindowd"]


class HUWindow(Transform):
    """Map HU ``[lower, upper]`` linearly to ``[0, 1]`` and clip outside, in float32.

    Args:
        window: ``(lower, upper)`` in HU, e.g. ``(-1000, 400)`` for lung nodules.

    Shapes:
        any ``(C, *spatial)`` tensor or array -> same shape, float32, values in [0, 1]. Metadata is kept.
    """

    def __init__(self, window: Sequence[float] = (-1000.0, 400.0)) -> None:
        lower, upper = (float(w) for w in window)
        if not upper > lower:
            raise ValueError(f"HU window needs lower < upper, got {tuple(window)}")
        self.lower, self.upper = lower, upper

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(img, dtype=torch.float32)
        out = ((x - self.lower) / (self.upper - self.lower)).clamp_(0.0, 1.0)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class HUWindowd(MapTransform):
    """Dictionary form of :class:`HUWindow`."""

    def __init__(
        self, keys: KeysCollection, window: Sequence[float] = (-1000.0, 400.0), allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(window)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d
