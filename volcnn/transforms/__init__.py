"""CT transforms (HU window, resampling, world-coordinate patch crop, volume fit), the standard chains, the
preprocessing of a loaded volume, and the batched on-device augmentation."""

from __future__ import annotations

from volcnn.core.geometry import voxel_to_world, world_to_voxel
from volcnn.transforms.batch_augment import AugmentParams, BatchRandAugment
from volcnn.transforms.chains import (
    augmentation_transforms,
    deterministic_transforms,
    evaluation_transforms,
    validation_transforms,
)
from volcnn.transforms.crop import CropOrFitd, FitVolume, WorldPatchCrop
from volcnn.transforms.feature_dropout import FeatureDropout
from volcnn.transforms.intensity import INTENSITY_MODES, HUWindow, HUWindowd, check_intensity, intensity_transform
from volcnn.transforms.placeholder import PlaceholderImaged
from volcnn.transforms.resample import ResampleToSpacing, ResampleToSpacingd, resample_linear, resample_to_grid
from volcnn.transforms.volume_cache import PreprocessVolumed, preprocess_loaded, preprocess_volume, volume_transforms

__all__ = [
    "INTENSITY_MODES",
    "AugmentParams",
    "BatchRandAugment",
    "FeatureDropout",
    "CropOrFitd",
    "FitVolume",
    "HUWindow",
    "HUWindowd",
    "PlaceholderImaged",
    "PreprocessVolumed",
    "ResampleToSpacing",
    "ResampleToSpacingd",
    "WorldPatchCrop",
    "augmentation_transforms",
    "check_intensity",
    "deterministic_transforms",
    "evaluation_transforms",
    "intensity_transform",
    "preprocess_loaded",
    "preprocess_volume",
    "resample_linear",
    "resample_to_grid",
    "validation_transforms",
    "volume_transforms",
    "voxel_to_world",
    "world_to_voxel",
]
