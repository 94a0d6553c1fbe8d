"""CT transforms (HU window, world-coordinate patch crop, volume fit), the standard chains and the batched on-device
augmentation."""

from __future__ import annotations

from volcnn.transforms.batch_augment import AugmentParams, BatchRandAugment
from volcnn.transforms.chains import augmentation_transforms, deterministic_transforms, validation_transforms
from volcnn.transforms.crop import CropOrFitd, FitVolume, WorldPatchCrop
from volcnn.transforms.geometry import voxel_to_world, world_to_voxel
from volcnn.transforms.intensity import HUWindow, HUWindowd
from volcnn.transforms.resample import ResampleToSpacing, ResampleToSpacingd
from volcnn.transforms.volume_cache import PreprocessVolumed, volume_transforms

__all__ = [
    "AugmentParams",
    "BatchRandAugment",
    "augmentation_transforms",
    "deterministic_transforms",
    "validation_transforms",
    "CropOrFitd",
    "FitVolume",
    "WorldPatchCrop",
    "voxel_to_world",
    "world_to_voxel",
    "HUWindow",
    "HUWindowd",
    "PreprocessVolumed",
    "ResampleToSpacing",
    "ResampleToSpacingd",
    "volume_transforms",
]
