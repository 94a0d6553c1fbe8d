"""The standard transform chains: deterministic preprocessing (cached) and random augmentation (after the cache).

Deterministic: :class:`~volcnn.transforms.volume_cache.PreprocessVolumed` (load, RAS, ``pixdim``, intensity)
then :class:`~volcnn.transforms.crop.CropOrFitd` (candidate patch around ``center`` or the whole volume) giving
``(1, *(patch_size + 2 * margin))``. Random: affine, flips, 90-degree rotations, final crop to ``patch_size``,
noise, intensity shift. Validation ends with the same centre crop and no randomness
(:func:`evaluation_transforms` is the whole validation chain, which volume-mode inference reuses).

The bundle trains with the batched equivalent of the random chain,
:class:`~volcnn.transforms.batch_augment.BatchRandAugment`, run on the training device by the trainer's
``prepare_batch`` (:class:`volcnn.engines.AugmentOnDevice`). :func:`augmentation_transforms` stays the per-sample
MONAI reference: the definition of the augmentation distribution, the baseline of the benchmark and of the
tests that check the batched version's geometry against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandShiftIntensityd,
)

from volcnn.transforms.crop import CropOrFitd
from volcnn.transforms.placeholder import PlaceholderImaged
from volcnn.transforms.volume_cache import PreprocessVolumed

__all__ = ["deterministic_transforms", "augmentation_transforms", "evaluation_transforms", "validation_transforms"]


def deterministic_transforms(
    pixdim: Sequence[float] = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] = (-1000, 400),
    patch_size: Sequence[int] = (48, 48, 48),
    margin: int = 8,
    cache_size: int = 2,
    image_key: str = "image",
    intensity: str = "hu",
    read_image: bool = True,
) -> Compose:
    """Everything before the first random transform; the output is what CacheDataset keeps.

    ``intensity`` is the intensity setting (:func:`~volcnn.transforms.intensity.intensity_transform`; ``hu``: the
    ``hu_window`` to [0, 1]). ``read_image=False`` (a clinical-only model, which does not look at the image) puts a
    zero placeholder of the same shape in its place (:class:`~volcnn.transforms.placeholder.PlaceholderImaged`)
    and opens no image file.

    Returns:
        A Compose mapping ``{"image": path, "label": int, ["center": [x, y, z]]}`` to ``image``
        ``(1, *(patch_size + 2 * margin))`` float32 (in [0, 1] for ``hu`` and ``percentile``) with an exact RAS
        affine, ``center`` ``(3,)``.
    """
    if not read_image:
        shape = [int(p) + 2 * int(margin) for p in patch_size]
        return Compose([PlaceholderImaged(image_key, shape)])
    return Compose(
        [
            PreprocessVolumed(
                image_key, pixdim=pixdim, hu_window=hu_window, cache_size=cache_size, intensity=intensity
            ),
            CropOrFitd(image_key, patch_size=patch_size, margin=margin),
        ]
    )


def augmentation_transforms(
    patch_size: Sequence[int] = (48, 48, 48),
    prob: float = 0.5,
    rotate_deg: float = 15.0,
    scale: float = 0.1,
    translate_vox: float = 4.0,
    noise_std: float = 0.02,
    intensity_shift: float = 0.05,
    image_key: str = "image",
) -> Compose:
    """The per-sample MONAI random chain: ``(1, *(patch + 2 margin))`` -> ``(1, *patch_size)``.

    ``RandAffined`` (with ``prob``, bilinear, border padding) -> ``RandFlipd`` per axis (0.5) -> ``RandRotate90d``
    in the (0, 1) plane (``prob``) -> ``CenterSpatialCropd`` -> ``RandGaussianNoised`` (0.2) ->
    ``RandShiftIntensityd`` (0.3). It runs on the CPU in the data loader, one sample at a time; training uses
    :class:`~volcnn.transforms.batch_augment.BatchRandAugment`, which draws the same distribution for a whole
    batch on its device.
    """
    k = image_key
    rad = float(np.deg2rad(rotate_deg))
    return Compose(
        [
            RandAffined(
                k,
                prob=prob,
                rotate_range=(rad, rad, rad),
                scale_range=(scale, scale, scale),
                translate_range=(translate_vox, translate_vox, translate_vox),
                mode="bilinear",
                padding_mode="border",
            ),
            RandFlipd(k, prob=0.5, spatial_axis=0),
            RandFlipd(k, prob=0.5, spatial_axis=1),
            RandFlipd(k, prob=0.5, spatial_axis=2),
            RandRotate90d(k, prob=prob, max_k=3, spatial_axes=(0, 1)),
            CenterSpatialCropd(k, roi_size=tuple(int(s) for s in patch_size)),
            RandGaussianNoised(k, prob=0.2, std=noise_std),
            RandShiftIntensityd(k, offsets=intensity_shift, prob=0.3),
        ]
    )


def validation_transforms(patch_size: Sequence[int] = (48, 48, 48), image_key: str = "image") -> Compose:
    """The deterministic counterpart of :func:`augmentation_transforms`: the centre crop to ``patch_size``."""
    return Compose([CenterSpatialCropd(image_key, roi_size=tuple(int(s) for s in patch_size))])


def evaluation_transforms(
    pixdim: Sequence[float] = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] = (-1000, 400),
    patch_size: Sequence[int] = (48, 48, 48),
    margin: int = 8,
    cache_size: int = 2,
    image_key: str = "image",
    intensity: str = "hu",
) -> Compose:
    """What validation and evaluation feed the network: :func:`deterministic_transforms` then
    :func:`validation_transforms`, flattened, as ``train.json`` builds its ``validate#preprocessing`` (which the
    ``evaluate.json`` overlay also uses for the threshold section).

    Volume-mode inference (:mod:`volcnn.inference.volume_mode`) runs this very chain on each input, so that a model
    trained on whole volumes sees at inference exactly what its evaluation saw. ``margin`` does not change a fitted
    volume (the margin added around the fit is cropped off again), but it is kept so that the chain is the
    evaluation's, setting for setting.

    Returns:
        A flat Compose ``[PreprocessVolumed, CropOrFitd, CenterSpatialCropd]`` mapping ``{"image": path,
        ["center": [x, y, z]]}`` to ``image`` ``(1, *patch_size)`` float32 in [0, 1] with its exact affine (patch
        index -> world RAS mm) and ``center`` ``(3,)`` (NaN without a centre: the whole volume fitted).
    """
    return Compose(
        [
            deterministic_transforms(pixdim, hu_window, patch_size, margin, cache_size, image_key, intensity),
            validation_transforms(patch_size, image_key),
        ]
    ).flatten()
