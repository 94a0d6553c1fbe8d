"""Evaluation, in one place: classification metrics (ROC/AUC, thresholds, bootstrap intervals, calibration), the
detection metrics of whole-CT findings (FROC / CPM against annotations), the reports that show them (plots,
a predictions CSV, a self-contained HTML report), and the side-by-side comparison of runs on the same samples
(paired bootstrap of AUC differences, :mod:`volcnn.evaluation.compare`).

Metrics take tensors (any device), NumPy arrays or sequences: ``scores``/``probs`` are ``(N,)`` (binary) or
``(N, K)`` class probabilities, ``labels`` ``(N,)`` integer class indices; results are Python numbers, CPU tensors
or JSON-serialisable dicts. The classification metrics are scikit-learn's (:mod:`sklearn.metrics`) behind one set
of input checks; what scikit-learn lacks (bootstrap intervals, calibration error, FROC) is written here. Plots use
matplotlib's Agg canvas directly (the caller's backend is never touched) and every file is written atomically.
The Ignite handlers that feed them during training and evaluation live in :mod:`volcnn.engines`.
"""

from __future__ import annotations

from volcnn.evaluation.bootstrap import bootstrap_ci, roc_auc_ci
from volcnn.evaluation.calibration import expected_calibration_error, reliability_bins
from volcnn.evaluation.classification import (
    binary_metrics,
    confusion_matrix,
    mean_ovr_auc,
    multiclass_metrics,
    roc_auc,
    roc_curve,
    roc_points,
    threshold_for_sensitivity,
    youden_threshold,
)
from volcnn.evaluation.compare import compare_runs, plot_roc_comparison, read_predictions, write_comparison
from volcnn.evaluation.findings import evaluate_findings, format_table, read_annotations, read_findings
from volcnn.evaluation.froc import LUNA16_FP_RATES, froc, sensitivity_at
from volcnn.evaluation.froc_plot import plot_froc
from volcnn.evaluation.html import write_report_html
from volcnn.evaluation.patches import PatchView, patch_view, render_patch_grid
from volcnn.evaluation.plots import plot_calibration, plot_confusion, plot_roc
from volcnn.evaluation.predictions import write_predictions_csv
from volcnn.evaluation.report import write_classification_report
from volcnn.evaluation.summary import classification_report

__all__ = [
    "LUNA16_FP_RATES",
    "PatchView",
    "binary_metrics",
    "bootstrap_ci",
    "classification_report",
    "compare_runs",
    "confusion_matrix",
    "evaluate_findings",
    "expected_calibration_error",
    "format_table",
    "froc",
    "mean_ovr_auc",
    "multiclass_metrics",
    "patch_view",
    "plot_calibration",
    "plot_confusion",
    "plot_froc",
    "plot_roc",
    "plot_roc_comparison",
    "read_annotations",
    "read_findings",
    "read_predictions",
    "reliability_bins",
    "render_patch_grid",
    "roc_auc",
    "roc_auc_ci",
    "roc_curve",
    "roc_points",
    "sensitivity_at",
    "threshold_for_sensitivity",
    "write_classification_report",
    "write_comparison",
    "write_predictions_csv",
    "write_report_html",
    "youden_threshold",
]
