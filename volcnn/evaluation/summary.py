"""One-call classification summary for the evaluation report and ``metrics.json``."""

from __future__ import annotations

import math
from typing import Any

import torch

from volcnn.evaluation._checks import TensorLike, as_labels, as_probs, check_same_length
from volcnn.evaluation.bootstrap import roc_auc_ci
from volcnn.evaluation.calibration import expected_calibration_error
from volcnn.evaluation.classification import (
    binary_metrics,
    multiclass_metrics,
    roc_auc,
    threshold_for_sensitivity,
    youden_threshold,
)

__all__ = ["DEFAULT_THRESHOLD", "classification_report"]

DEFAULT_THRESHOLD = 0.5
"""Threshold used when none is given and Youden's is undefined (labels of one class only)."""


def classification_report(
    probs: TensorLike,
    labels: TensorLike,
    threshold: float | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    target_sensitivity: float | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Summary metrics as a JSON-serialisable dict (floats, ints, lists, ``None``; never NaN or inf).

    Binary (``probs`` ``(N,)`` positive-class probabilities, or ``(N, 2)`` of which column 1 is used):

    * ``task`` ("binary"), ``num_samples``, ``num_positive``, ``num_negative``;
    * ``auc`` and ``auc_ci95`` (``[lo, hi]``, label-stratified percentile bootstrap with ``n_boot`` resamples and
      ``seed``; ``n_boot=0`` skips it) - both ``None`` when only one class is present;
    * ``threshold`` and ``threshold_source``: the given threshold ("given"), else Youden's on these data
      ("youden"), else ``DEFAULT_THRESHOLD`` when only one class is present ("default");
    * the ``binary_metrics`` fields at that threshold (``accuracy, sensitivity, specificity, precision, f1, npv,
      tp, fp, tn, fn``; 0/0 ratios are 0), ``confusion_matrix`` ``[[tn, fp], [fn, tp]]``;
    * ``ece``: calibration of P(y = 1) with ``n_bins`` equal-width bins;
    * with ``target_sensitivity``: ``at_target_sensitivity``, the ``binary_metrics`` fields (plus
      ``target_sensitivity``) at the largest threshold reaching it, or ``None`` without positives.

    Multi-class (``(N, K)``, K > 2): ``task`` ("multiclass"), ``num_samples``, ``class_counts`` and the
    ``multiclass_metrics`` fields (macro averages).

    Args:
        probs: ``(N,)``, ``(N, 2)`` or ``(N, K)`` probabilities (rows of a 2-D input sum to 1).
        labels: ``(N,)`` class indices.
        threshold: decision threshold for binary data (finite), or ``None`` for Youden's.
        n_boot: bootstrap resamples for ``auc_ci95`` (0 to skip).
        seed: bootstrap seed.
        target_sensitivity: optional sensitivity in ``(0, 1]`` to report an operating point for (binary only).
        n_bins: calibration bins.

    Raises:
        ValueError: for invalid input, a non-finite threshold, or ``threshold``/``target_sensitivity`` with K > 2.
    """
    p = as_probs(probs)
    if p.ndim == 2 and p.shape[1] > 2:
        if threshold is not None or target_sensitivity is not None:
            raise ValueError("threshold and target_sensitivity apply to binary data only, but probs has K > 2 columns")
        y = as_labels(labels, num_classes=p.shape[1])
        n = check_same_length(probs=p, labels=y)
        counts = torch.bincount(y, minlength=p.shape[1]).tolist()
        return {
            "task": "multiclass",
            "num_samples": n,
            "class_counts": counts,
            **multiclass_metrics(p, y, n_bins=n_bins),
        }

    pos = p[:, 1].contiguous() if p.ndim == 2 else p
    y = as_labels(labels, num_classes=2)
    n = check_same_length(probs=pos, labels=y)
    if int(n_boot) != n_boot or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    n_pos = int(y.sum())
    both = 0 < n_pos < n
    if threshold is not None:
        thr, source = float(threshold), "given"
        if not math.isfinite(thr):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
    elif both:
        thr, source = youden_threshold(pos, y), "youden"
    else:
        thr, source = DEFAULT_THRESHOLD, "default"
    at = binary_metrics(pos, y, thr)
    report: dict[str, Any] = {
        "task": "binary",
        "num_samples": n,
        "num_positive": n_pos,
        "num_negative": n - n_pos,
        "auc": roc_auc(pos, y) if both else None,
        "auc_ci95": list(roc_auc_ci(pos, y, n_boot=n_boot, seed=seed)) if both and n_boot > 0 else None,
        "threshold_source": source,
        **at,
        "confusion_matrix": [[at["tn"], at["fp"]], [at["fn"], at["tp"]]],
        "ece": expected_calibration_error(pos, y, n_bins=n_bins),
    }
    if target_sensitivity is not None:
        if n_pos > 0:
            t = threshold_for_sensitivity(pos, y, target_sensitivity)
            report["at_target_sensitivity"] = {
                "target_sensitivity": float(target_sensitivity),
                **binary_metrics(pos, y, t),
            }
        else:
            report["at_target_sensitivity"] = None
    return report
