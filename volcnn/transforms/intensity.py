"""Hounsfield-unit windowing: ``HUWindow`` (array) and ``HUWindowd`` (dictionary)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform

__all__ = ["HUWindow", "HUWindowd"]

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
