"""Whole-volume inference: classifier heat maps (window by window or dense), body masks, findings in world mm,
volume scores, batch runner."""

from __future__ import annotations

from volcnn.inference.body_mask import BODY_THRESHOLD_HU, body_mask
from volcnn.inference.dense import (
    DEFAULT_TILE_MB,
    DensePlan,
    SplitClassifier,
    dense_heatmap,
    dense_window_difference,
    plan_dense,
    split_classifier,
)
from volcnn.inference.findings import SCORE_METHODS, find_peaks, local_maxima, volume_score
from volcnn.inference.heatmap import (
    AIR_THRESHOLD,
    classifier_heatmap,
    heatmap_grid,
    iter_window_batches,
    resample_to_grid,
    select_windows,
    stride_from_mm,
    window_probabilities,
)
from volcnn.inference.runner import (
    HEATMAP_METHODS,
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
    "BODY_THRESHOLD_HU",
    "DEFAULT_TILE_MB",
    "HEATMAP_METHODS",
    "SCORE_METHODS",
    "DensePlan",
    "InferenceRunner",
    "SplitClassifier",
    "body_mask",
    "case_name",
    "classifier_heatmap",
    "dense_heatmap",
    "dense_window_difference",
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
    "plan_dense",
    "resample_to_grid",
    "select_windows",
    "split_classifier",
    "stride_from_mm",
    "volume_score",
    "window_probabilities",
]
