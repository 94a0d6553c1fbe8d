"""Synthetic chest-CT cohort generator (LUNA16-like), used by the demo, the benchmarks and the tests.

``synthesize_cohort(out_dir, cases, seed, size)`` writes NIfTI volumes (optionally DICOM series),
LUNA16-format ``annotations.csv`` / ``candidates.csv`` and MONAI datalists; ``SIZES`` holds the
``"tiny"`` / ``"small"`` / ``"full"`` presets.
"""

from __future__ import annotations

from volcnn.data.cohort import ORIENTATIONS, SyntheticCase, synthesize_case, synthesize_cohort
from volcnn.data.dicom_series import write_dicom_series
from volcnn.data.nodules import Nodule
from volcnn.data.phantom import SIZES, CaseGeometry, SizeSpec

__all__ = [
    "ORIENTATIONS",
    "SIZES",
    "CaseGeometry",
    "Nodule",
    "SizeSpec",
    "SyntheticCase",
    "synthesize_case",
    "synthesize_cohort",
    "write_dicom_series",
]
