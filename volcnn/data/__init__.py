"""Synthetic chest-CT cohort generator (LUNA16-like), used by the demo, the benchmarks and the tests.

``synthesize_cohort(out_dir, cases, seed, size)`` writes NIfTI volumes (optionally DICOM series),
LUNA16-format ``annotations.csv`` / ``candidates.csv`` and MONAI datalists; ``SIZES`` holds the
``"tiny"`` / ``"small"`` / ``"full"`` presets. ``make_dataset`` builds the training / validation datasets with the
deterministic preprocessing cached in RAM, on disk (named by ``transform_fingerprint``) or not at all.
"""

from __future__ import annotations

from volcnn.data.caching import (
    CACHE_FORMAT,
    CACHE_MODES,
    SafePersistentDataset,
    make_dataset,
    shard,
    transform_fingerprint,
)
from volcnn.data.cohort import ORIENTATIONS, SyntheticCase, synthesize_case, synthesize_cohort
from volcnn.data.dicom_series import write_dicom_series
from volcnn.data.loader import ThreadDataLoader
from volcnn.data.nodules import Nodule
from volcnn.data.phantom import SIZES, CaseGeometry, SizeSpec

__all__ = [
    "CACHE_FORMAT",
    "CACHE_MODES",
    "ORIENTATIONS",
    "SIZES",
    "CaseGeometry",
    "Nodule",
    "SafePersistentDataset",
    "SizeSpec",
    "SyntheticCase",
    "ThreadDataLoader",
    "make_dataset",
    "shard",
    "synthesize_case",
    "synthesize_cohort",
    "transform_fingerprint",
    "write_dicom_series",
]
