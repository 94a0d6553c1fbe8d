"""Classification metrics in plain torch: ROC/AUC, thresholds, bootstrap intervals, calibration, summaries.

Inputs are tensors (any device), NumPy arrays or sequences; ``scores``/``probs`` are ``(N,)`` (binary) or
``(N, K)`` class probabilities, ``labels`` ``(N,)`` integer class indices. Results are Python numbers, CPU
tensors, or (``classification_report``, ``multiclass_metrics``, ``roc_points``) JSON-serialisable dicts.
Conventions follow scikit-learn, which the tests compare against.
"""

from __future__ import annotations

from .bootstrap import bootstrap_ci, roc_auc_ci
from .calibration import expected_calibration_error, reliability_bins
from .classification import (
    binary_metrics,
    confusion_matrix,
    multiclass_metrics,
    roc_auc,
    roc_curve,
    roc_points,
    threshold_for_sensitivity,
    youden_threshold,
)
from .froc import LUNA16_FP_RATES, froc, sensitivity_at
from .report import classification_report

__all__ = [
    "LUNA16_FP_RATES",
    "froc",
    "sensitivity_at",
    "binary_metrics",
    "bootstrap_ci",
    "classification_report",
    "confusion_matrix",
    "expected_calibration_error",
    "multiclass_metrics",
    "reliability_bins",
    "roc_auc",
    "roc_auc_ci",
    "roc_curve",
    "roc_points",
    "threshold_for_sensitivity",
    "youden_threshold",
]
