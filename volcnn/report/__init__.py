"""Rendering of evaluation outputs: ROC / confusion / calibration plots, a predictions CSV, an HTML report, and
orthogonal-slice views of 3-D patches.

Inputs are plain numbers, sequences and numpy arrays (torch tensors for patch views). Plots use matplotlib's Agg
canvas directly, so the caller's global backend is never touched; every file is written atomically.
"""

from __future__ import annotations

from volcnn.report.froc_plot import plot_froc
from volcnn.report.html import write_report_html
from volcnn.report.patches import PatchView, patch_view, render_patch_grid
from volcnn.report.plots import plot_calibration, plot_confusion, plot_roc
from volcnn.report.predictions import write_predictions_csv

__all__ = [
    "PatchView",
    "patch_view",
    "plot_froc",
    "plot_calibration",
    "plot_confusion",
    "plot_roc",
    "render_patch_grid",
    "write_predictions_csv",
    "write_report_html",
]
