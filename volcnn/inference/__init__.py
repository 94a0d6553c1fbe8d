"""Whole-volume inference: classifier heat maps (window by window or dense), body masks, findings in world mm,
volume scores, and the batch runner that writes them per case (candidate mode); one prediction per volume for models
trained on whole volumes (volume mode, :mod:`volcnn.inference.volume_mode`).

Imports no training code (:mod:`volcnn.engines`) and no evaluation code (:mod:`volcnn.evaluation`); the model comes
from :mod:`volcnn.models`."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from volcnn.inference.body_mask import BODY_THRESHOLD_HU, body_mask
from volcnn.inference.dense import DEFAULT_TILE_MB, dense_heatmap, dense_window_difference
from volcnn.inference.dense_plan import DensePlan, plan_dense
from volcnn.inference.dense_split import SplitClassifier, split_classifier
from volcnn.inference.findings import SCORE_METHODS, find_peaks, local_maxima, volume_score
from volcnn.inference.heatmap import (
    AIR_THRESHOLD,
    classifier_heatmap,
    heatmap_grid,
    iter_window_batches,
    select_windows,
    stride_from_mm,
    window_probabilities,
)
from volcnn.inference.heatmap_strategy import HEATMAP_METHODS, HeatmapStrategy
from volcnn.inference.loading import exported_runner, load_bundle_runner
from volcnn.inference.runner import INFERENCE_MODES, InferenceRunner
from volcnn.inference.volume_mode import VolumeModeProcessor

__all__ = [
    "AIR_THRESHOLD",
    "BODY_THRESHOLD_HU",
    "DEFAULT_TILE_MB",
    "HEATMAP_METHODS",
    "INFERENCE_MODES",
    "SCORE_METHODS",
    "DensePlan",
    "HeatmapStrategy",
    "InferenceRunner",
    "SplitClassifier",
    "VolumeModeProcessor",
    "body_mask",
    "classifier_heatmap",
    "dense_heatmap",
    "dense_window_difference",
    "exported_runner",
    "find_peaks",
    "heatmap_grid",
    "iter_window_batches",
    "load_bundle_runner",
    "local_maxima",
    "plan_dense",
    "select_windows",
    "split_classifier",
    "stride_from_mm",
    "volume_score",
    "window_probabilities",
]

#: names bundles packaged with volcnn 0.2 call in their inference.json, now in :mod:`volcnn.models`
_MOVED = {"load_checkpoint": "load_weights", "model_info": "model_info"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"volcnn.inference.{name} is now volcnn.models.{_MOVED[name]}; update the bundle's inference.json",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("volcnn.models"), _MOVED[name])
    raise AttributeError(f"module 'volcnn.inference' has no attribute {name!r}")
