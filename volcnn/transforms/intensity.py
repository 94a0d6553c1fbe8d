"""Intensity settings: Hounsfield-unit windowing (``HUWindow``, ``HUWindowd``) for CT, and the settings for
volumes that are not in HU (:func:`intensity_transform`, ``intensity`` in the bundle).

``intensity`` is one of :data:`INTENSITY_MODES`:

* ``hu`` (the default): CT in Hounsfield units, ``hu_window`` mapped linearly to [0, 1], clipped;
* ``percentile``: any scalar image; the volume's own 0.5th..99.5th percentiles mapped to [0, 1], clipped
  (MONAI's ``ScaleIntensityRangePercentilesd``), for 8-bit exports, MR, images of unknown scale;
* ``zscore``: any scalar image; the volume's own mean 0 and standard deviation 1 (MONAI's ``NormalizeIntensityd``;
  a constant volume is only shifted), for images already normalised or of stable contrast;
* ``none``: values as stored, in float32, for masks and images prepared elsewhere.

Every setting is per volume and needs no statistics from a dataset, so training, evaluation, inference and an
exported model apply the identical transform from the bundle's settings alone.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import CastToTyped, MapTransform, NormalizeIntensityd, ScaleIntensityRangePercentilesd, Transform

__all__ = ["INTENSITY_MODES", "PERCENTILES", "HUWindow", "HUWindowd", "check_intensity", "intensity_transform"]

#: the intensity settings (``intensity`` in the bundle); ``hu`` is the default
INTENSITY_MODES = ("hu", "percentile", "zscore", "none")
#: the percentiles that ``percentile`` maps to 0 and 1
PERCENTILES = (0.5, 99.5)

#: tensors with at least this many voxels take the chunked CPU path of :class:`HUWindow`
WINDOW_MIN_VOXELS = 1 << 20
#: voxels per chunk of that path (1 MiB of float32: the three passes over a chunk stay in cache)
WINDOW_CHUNK_VOXELS = 1 << 18


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
        plain = x.as_tensor() if isinstance(x, MetaTensor) else x
        batch = isinstance(x, MetaTensor) and x.is_batch
        if plain.numel() >= WINDOW_MIN_VOXELS and not batch and _chunkable(plain):
            out = self._window_chunked(plain)
            if isinstance(x, MetaTensor) and get_track_meta():  # the metadata a torch op on ``x`` would carry
                return MetaTensor(out).copy_meta_from(x)
        else:
            out = ((x - self.lower) / (self.upper - self.lower)).clamp_(0.0, 1.0)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out

    def _window_chunked(self, x: torch.Tensor) -> torch.Tensor:
        """The same float32 operations as the torch expression (subtract, divide, clamp: bit-identical results),
        chunk by chunk so that each chunk is read from memory once, spread over ``torch.get_num_threads()``
        threads (numpy releases the GIL)."""
        out = torch.empty(x.shape, dtype=torch.float32)
        src, dst = x.detach().numpy().reshape(-1), out.numpy().reshape(-1)
        lower, width = self.lower, self.upper - self.lower

        def run(bounds: tuple[int, int]) -> None:
            for a in range(bounds[0], bounds[1], WINDOW_CHUNK_VOXELS):
                b = min(bounds[1], a + WINDOW_CHUNK_VOXELS)
                d = dst[a:b]
                np.subtract(src[a:b], lower, out=d)
                np.divide(d, width, out=d)
                np.clip(d, 0.0, 1.0, out=d)

        workers = max(1, min(8, torch.get_num_threads(), src.size // WINDOW_CHUNK_VOXELS))
        edges = np.linspace(0, src.size, workers + 1).astype(np.int64).tolist()
        parts = list(zip(edges[:-1], edges[1:], strict=True))
        if workers == 1:
            run(parts[0])
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="volcnn-window") as pool:
                for _ in pool.map(run, parts):
                    pass
        return out


def _chunkable(x: torch.Tensor) -> bool:
    """A C-contiguous float32 CPU tensor that needs no autograd (numpy can work on its memory directly)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad


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


def check_intensity(intensity: str) -> str:
    """``intensity`` if it is one of :data:`INTENSITY_MODES`.

    Raises:
        ValueError: any other value, naming the valid ones.
    """
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")
    return intensity


def intensity_transform(
    keys: KeysCollection, intensity: str = "hu", hu_window: Sequence[float] = (-1000.0, 400.0)
) -> MapTransform:
    """The dictionary transform of an intensity setting (see the module docstring).

    Args:
        keys: the image key(s).
        intensity: one of :data:`INTENSITY_MODES`.
        hu_window: ``(lower, upper)`` HU; used by ``hu`` only.

    Shapes:
        ``(C, *spatial)`` -> same shape, float32; values in [0, 1] for ``hu`` and ``percentile``.

    Raises:
        ValueError: an unknown ``intensity`` or a bad ``hu_window``.
    """
    mode = check_intensity(intensity)
    if mode == "hu":
        return HUWindowd(keys, hu_window)
    if mode == "percentile":
        lower, upper = PERCENTILES
        return ScaleIntensityRangePercentilesd(
            keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
        )
    if mode == "zscore":
        return NormalizeIntensityd(keys, dtype=np.float32)
    return CastToTyped(keys, dtype=torch.float32)
