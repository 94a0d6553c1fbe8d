"""Whole-volume inference: classifier heat maps, findings in world mm, volume scores, batch runner."""

from __future__ import annotations

from volcnn.inference.findings import SCORE_METHODS, find_peaks, local_maxima, volume_score
from volcnn.inference.heatmap import (
    AIR_THRESHOLD,
    classifier_heatmap,
    heatmap_grid,
    iter_window_batches,
    resample_to_grid,
    select_windows,
    stride_from_mm,
)
from volcnn.inference.runner import (
    InferenceRunner,
    case_name,
    file_sha256,
    infer_main,
    input_sha256,
    load_bundle_runner,
    load_checkpoint,
    model_info,
)

__all__ = [
    "AIR_THRESHOLD",
    "SCORE_METHODS",
    "InferenceRunner",
    "case_name",
    "classifier_heatmap",
    "file_sha256",
    "find_peaks",
    "heatmap_grid",
    "infer_main",
    "input_sha256",
    "iter_window_batches",
    "load_bundle_runner",
    "load_checkpoint",
    "local_maxima",
    "model_info",
    "resample_to_grid",
    "select_windows",
    "stride_from_mm",
    "volume_score",
]
