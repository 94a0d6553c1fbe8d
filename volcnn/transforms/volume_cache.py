"""``PreprocessVolumed``: load + RAS + resample + intensity setting of one volume, reusing the result across samples.

In candidate mode many samples (candidates) share one volume; without reuse every candidate would load and
resample its whole CT again. A small LRU keyed by the image path keeps the last few preprocessed volumes
(sort the datalist by image to make it effective). The cached tensors are never modified downstream: the crop
and fit transforms return new tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    MapTransform,
    Orientationd,
)

from volcnn.io.reader import LoadVolumed, PreloadedReader
from volcnn.io.types import Volume
from volcnn.transforms.intensity import intensity_transform
from volcnn.transforms.resample import ResampleToSpacingd

__all__ = ["PreprocessVolumed", "preprocess_loaded", "preprocess_volume", "volume_transforms"]


def volume_transforms(
    keys: KeysCollection = "image",
    pixdim: Sequence[float] = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] = (-1000, 400),
    intensity: str = "hu",
) -> Compose:
    """Load (validated reader) -> channel first -> RAS -> resample to ``pixdim`` in float32 -> the intensity setting
    (:func:`~volcnn.transforms.intensity.intensity_transform`: by default the HU window to [0, 1]).

    The resampling (:class:`~volcnn.transforms.resample.ResampleToSpacingd`) lands on exactly the grid (shape and
    affine) of MONAI's ``Spacingd(keys, pixdim, mode="bilinear", dtype=np.float32)``, with the same trilinear
    values and border padding, but slab by slab in float32 (a small fraction of ``Spacingd``'s memory and time).

    The reader warns on values that do not look like HU only for ``intensity="hu"``.

    Output per key: a MetaTensor ``(1, X, Y, Z)`` in RAS order with its affine (voxel -> world RAS mm).
    """
    return Compose(
        [
            LoadVolumed(keys, expect_hu=intensity == "hu"),
            EnsureChannelFirstd(keys, channel_dim="no_channel"),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            ResampleToSpacingd(keys, pixdim=tuple(float(p) for p in pixdim)),
            intensity_transform(keys, intensity, hu_window),
        ]
    )


def preprocess_loaded(chain: Compose, volume: Volume | list[Volume]) -> MetaTensor:
    """Run a chain (key ``"image"``) on a volume already loaded, without reading it again.

    ``chain`` is a :func:`volume_transforms` chain, or a dataset chain that starts with :class:`PreprocessVolumed`
    (e.g. :func:`~volcnn.transforms.evaluation_transforms`): then the volume goes through the
    ``PreprocessVolumed``'s own chain (its LRU is bypassed: nothing is kept) and the result through the rest of
    ``chain``, as a sample without a ``center`` (the whole volume).

    ``volume`` may be handed over in a one-item list, which is emptied once the chain's loader has the volume, so
    that the caller's reference does not keep the full-resolution array alive while it is resampled.

    Returns:
        MetaTensor with its affine: ``(1, X, Y, Z)`` in RAS at the chain's ``pixdim``, windowed to [0, 1], for a
        :func:`volume_transforms` chain; whatever the rest of a dataset chain makes of it otherwise (``(1,
        *patch_size)`` for the evaluation chain).

    Raises:
        TypeError: ``chain`` starts with neither :class:`~volcnn.io.reader.LoadVolumed` nor
            :class:`PreprocessVolumed`.
    """
    head = chain.transforms[0] if chain.transforms else None
    volume_chain, rest = (head.chain, True) if isinstance(head, PreprocessVolumed) else (chain, False)
    load = volume_chain.transforms[0] if volume_chain.transforms else None
    if not isinstance(load, LoadVolumed):
        found = type(head if rest else load).__name__
        raise TypeError(f"expected a chain starting with LoadVolumed or PreprocessVolumed, got {found}")
    vol = volume.pop() if isinstance(volume, list) else volume
    data = load({"image": vol.path}, reader=PreloadedReader(vol))
    del vol
    data = volume_chain(data, start=1)
    if rest:
        data = chain(data, start=1)
    image = data["image"]
    if not isinstance(image, MetaTensor):
        raise TypeError(f"preprocessing gave {type(image).__name__}, expected a MetaTensor")
    return image


def preprocess_volume(
    volume: Volume, pixdim: Sequence[float], hu_window: Sequence[float], intensity: str = "hu"
) -> MetaTensor:
    """The training / inference chain (:func:`volume_transforms`) on a loaded volume; see :func:`preprocess_loaded`."""
    return preprocess_loaded(volume_transforms("image", pixdim, hu_window, intensity), volume)


class PreprocessVolumed(MapTransform):
    """:func:`volume_transforms` with an LRU of the last ``cache_size`` volumes, keyed by the image path.

    Args:
        keys: the image key(s).
        pixdim: target voxel size in mm.
        hu_window: ``(lower, upper)`` HU mapped to [0, 1] (``intensity="hu"``).
        cache_size: volumes kept; 0 disables reuse.
        intensity: the intensity setting (:data:`~volcnn.transforms.intensity.INTENSITY_MODES`).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        pixdim: Sequence[float] = (1.0, 1.0, 1.0),
        hu_window: Sequence[float] = (-1000, 400),
        cache_size: int = 2,
        allow_missing_keys: bool = False,
        intensity: str = "hu",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.chain = volume_transforms(keys, pixdim, hu_window, intensity)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = [k for k in self.key_iterator(d)]
        cache_key = tuple(str(d[k]) for k in keys)
        with self._lock:
            hit = self._cache.get(cache_key)
            if hit is not None:
                self._cache.move_to_end(cache_key)
        if hit is None:
            out = self.chain({k: d[k] for k in keys})
            hit = {k: out[k] for k in keys}
            if self.cache_size > 0:
                with self._lock:
                    self._cache[cache_key] = hit
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        d.update(hit)
        return d

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: drop the lock and the cache
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
