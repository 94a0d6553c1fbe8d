"""Binary and multi-class classification metrics in plain torch.

Conventions (those of scikit-learn, which the tests compare against):

* ``scores`` are ``(N,)`` real numbers, higher meaning "more positive" (probabilities or logits), converted to
  float64; ``labels`` are ``(N,)`` integer class indices (int64 after conversion; bool and whole-valued floats
  are accepted). Binary labels must be 0 or 1.
* A case is predicted positive when ``score >= threshold``.
* Inputs may be tensors on any device, NumPy arrays or sequences; results are Python numbers or CPU tensors.
* Invalid input (wrong shape, mismatched lengths, NaN, labels out of range, a metric that is undefined because
  only one class is present) raises ``ValueError`` with a message naming the problem.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from volcnn.evaluation._checks import (
    TensorLike,
    as_labels,
    as_probs,
    binary_inputs,
    check_same_length,
    require_both_classes,
)
from volcnn.evaluation.calibration import expected_calibration_error

__all__ = [
    "binary_metrics",
    "confusion_matrix",
    "finite_threshold_above",
    "multiclass_metrics",
    "roc_auc",
    "roc_curve",
    "roc_points",
    "threshold_for_sensitivity",
    "youden_threshold",
]

logger = logging.getLogger(__name__)


def _binary_clf_curve(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative (fps, tps, thresholds), float64 ``(T,)``, at each distinct score in decreasing order."""
    s_sorted, order = torch.sort(s, descending=True, stable=True)
    distinct = torch.nonzero(s_sorted[1:] != s_sorted[:-1]).flatten()
    idx = torch.cat([distinct, torch.tensor([s.numel() - 1])])
    tps = torch.cumsum(y[order], dim=0)[idx]
    fps = idx + 1 - tps
    return fps.to(torch.float64), tps.to(torch.float64), s_sorted[idx]


def roc_curve(
    scores: TensorLike, labels: TensorLike, *, drop_intermediate: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROC curve ``(fpr, tpr, thresholds)``, each float64 of shape ``(T + 1,)``.

    Same output as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``: one point per distinct
    score, thresholds decreasing, preceded by the point ``(0, 0)`` at threshold ``+inf``. Tied scores form one
    point. ``drop_intermediate=True`` drops collinear points as scikit-learn does (for lighter plots).

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels.

    Raises:
        ValueError: for invalid input or when only one class is present (one of the rates is then undefined).
    """
    s, y = binary_inputs(scores, labels)
    require_both_classes(y, "the ROC curve")
    fps, tps, thr = _binary_clf_curve(s, y)
    if drop_intermediate and fps.numel() > 2:
        second_diff = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        keep = torch.cat([torch.tensor([True]), second_diff, torch.tensor([True])])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    zero = torch.zeros(1, dtype=torch.float64)
    fps, tps = torch.cat([zero, fps]), torch.cat([zero, tps])
    thr = torch.cat([torch.tensor([float("inf")], dtype=torch.float64), thr])
    return fps / fps[-1], tps / tps[-1], thr


def roc_points(scores: TensorLike, labels: TensorLike, *, drop_intermediate: bool = True) -> dict[str, list[Any]]:
    """The ROC curve as JSON-serialisable lists ``{"fpr", "tpr", "thresholds"}`` for plots and reports.

    The first threshold (``+inf`` in ``roc_curve``) is ``None``. Collinear points are dropped by default.
    """
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    thresholds: list[float | None] = [None, *thr[1:].tolist()]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds}


def _midranks(s: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``s`` (float64 ``(N,)``), tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, dim=0)
    return ((2 * ends - counts + 1).to(torch.float64) / 2).index_select(0, inverse)


def roc_auc(scores: TensorLike, labels: TensorLike) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative) + ½ P(tie).

    Computed exactly with the Mann-Whitney U statistic on midranks, so ties count one half (equal to
    ``sklearn.metrics.roc_auc_score`` for binary labels).

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels.

    Raises:
        ValueError: for invalid input or when only one class is present.
    """
    s, y = binary_inputs(scores, labels)
    require_both_classes(y, "ROC AUC")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    rank_sum = float((_midranks(s) * y).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def finite_threshold_above(value: float) -> float:
    """The smallest float32 number strictly above ``value`` (as a Python float), or the float64 one if none.

    Used where the best operating point is "predict nothing positive": ``score >= threshold`` is then false for
    every score ``<= value``, whether the scores are compared in float64 or float32 (a Python float compared
    with a float32 tensor is rounded to float32 first, so a float64 step alone would not do).
    """
    f32 = torch.tensor(value, dtype=torch.float32)
    up = float(torch.nextafter(f32, torch.tensor(float("inf"), dtype=torch.float32)))
    if up > value and up != float("inf"):
        return up
    f64 = torch.tensor(value, dtype=torch.float64)
    return float(torch.nextafter(f64, torch.tensor(float("inf"), dtype=torch.float64)))


def youden_threshold(scores: TensorLike, labels: TensorLike) -> float:
    """Threshold maximising Youden's J = TPR - FPR over the ROC thresholds (the distinct scores).

    Among equally good thresholds the largest is returned (the first argmax along ``roc_curve``). When no
    threshold beats chance the best point is the ``(0, 0)`` point at ``+inf``; the threshold returned is then a
    finite number just above the largest score (see ``finite_threshold_above``), which predicts every case
    negative - the same operating point, but finite so that it can be stored in JSON and compared with.

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels with both classes present.

    Raises:
        ValueError: for invalid input or when only one class is present.
    """
    fpr, tpr, thr = roc_curve(scores, labels)
    best = int(torch.argmax(tpr - fpr))
    if best == 0:
        return finite_threshold_above(float(thr[1]))
    return float(thr[best])


def threshold_for_sensitivity(scores: TensorLike, labels: TensorLike, target: float) -> float:
    """The largest threshold whose sensitivity (TPR = TP / P, float64) is at least ``target``.

    The threshold is always one of the scores; any larger threshold has sensitivity below ``target``.

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels with at least one positive (negatives are not needed).
        target: wanted sensitivity in ``(0, 1]``.

    Raises:
        ValueError: for invalid input, a target outside ``(0, 1]`` or no positive labels.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    s, y = binary_inputs(scores, labels)
    if int(y.sum()) == 0:
        raise ValueError("sensitivity is undefined without positive labels: labels are all 0")
    _, tps, thr = _binary_clf_curve(s, y)
    first = int(torch.nonzero(tps / tps[-1] >= target)[0, 0])
    return float(thr[first])


def confusion_matrix(preds: TensorLike, labels: TensorLike, num_classes: int) -> torch.Tensor:
    """Confusion matrix, int64 ``(K, K)``: entry ``[i, j]`` counts cases of true class ``i`` predicted ``j``.

    Rows are the true class and columns the prediction (scikit-learn's convention); for K = 2 this is
    ``[[tn, fp], [fn, tp]]``.

    Args:
        preds: ``(N,)`` predicted class indices in ``[0, K)``.
        labels: ``(N,)`` true class indices in ``[0, K)``.
        num_classes: K >= 1.

    Raises:
        ValueError: for invalid input, mismatched lengths or indices outside ``[0, K)``.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    k = int(num_classes)
    p = as_labels(preds, "preds", num_classes=k)
    y = as_labels(labels, "labels", num_classes=k)
    check_same_length(preds=p, labels=y)
    return torch.bincount(y * k + p, minlength=k * k).reshape(k, k)


def _ratio(num: int, den: int) -> float:
    """``num / den``, or 0.0 when ``den == 0`` (scikit-learn's ``zero_division=0``)."""
    return num / den if den else 0.0


def binary_metrics(scores: TensorLike, labels: TensorLike, threshold: float) -> dict[str, float]:
    """Threshold metrics of binary predictions ``score >= threshold``.

    Returns a dict with float ``accuracy, sensitivity, specificity, precision, f1, npv, threshold`` and int
    ``tp, fp, tn, fn``. A ratio whose denominator is 0 (e.g. precision when nothing is predicted positive,
    sensitivity without positives) is 0.0, as with scikit-learn's ``zero_division=0``; it is never NaN.
    ``f1 = 2 tp / (2 tp + fp + fn)``.

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels (one class only is allowed).
        threshold: decision threshold (not NaN).

    Raises:
        ValueError: for invalid input or a NaN threshold.
    """
    threshold = float(threshold)
    if threshold != threshold:
        raise ValueError("threshold is NaN")
    s, y = binary_inputs(scores, labels)
    pred = s >= threshold
    pos = y == 1
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    tn = int((~pred & ~pos).sum())
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": threshold,
    }


def _average(values: torch.Tensor, weights: torch.Tensor) -> float:
    total = float(weights.sum())
    return float((values * weights).sum()) / total if total else 0.0


def multiclass_metrics(
    probs: TensorLike, labels: TensorLike, average: str = "macro", *, n_bins: int = 15
) -> dict[str, Any]:
    """One-vs-rest AUCs, argmax precision/recall/F1, accuracy, confusion matrix and top-label ECE.

    Values are JSON-serialisable (floats, ints, nested lists, ``None``):

    * ``auc_per_class``: OvR AUC of column k against ``labels == k``; ``None`` for a class that is absent (or the
      only class present). ``auc``: their macro mean, or prevalence-weighted mean for ``average="weighted"``
      (equal to ``roc_auc_score(labels, probs, multi_class="ovr", average=...)`` when every class is present;
      where scikit-learn raises for an absent class, the average here is over the defined classes, with a
      logged warning, and ``None`` if there are none).
    * ``precision_per_class``, ``recall_per_class``, ``f1_per_class``, ``support`` (cases per true class),
      and ``precision``, ``recall``, ``f1`` averaged as ``precision_recall_fscore_support(labels, argmax)``
      does: ``macro`` over the classes present in the labels or the predictions, ``weighted`` by support;
      0/0 counts as 0.
    * ``accuracy``, ``confusion_matrix`` (K x K nested list, rows true), ``ece`` (top-label, ``n_bins`` bins),
      ``num_classes``, ``average``.

    Args:
        probs: ``(N, K)`` class probabilities, rows summing to 1, K >= 2.
        labels: ``(N,)`` class indices in ``[0, K)``.
        average: ``"macro"`` or ``"weighted"``.

    Raises:
        ValueError: for invalid input or an unknown ``average``.
    """
    if average not in ("macro", "weighted"):
        raise ValueError(f"average {average!r} is not one of: macro, weighted")
    p = as_probs(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, K) for multi-class metrics, got shape {tuple(p.shape)}")
    k = p.shape[1]
    y = as_labels(labels, num_classes=k)
    n = check_same_length(probs=p, labels=y)

    support = torch.bincount(y, minlength=k)
    aucs: list[float | None] = []
    for c in range(k):
        aucs.append(roc_auc(p[:, c], y == c) if 0 < int(support[c]) < n else None)
    defined = [c for c in range(k) if aucs[c] is not None]
    if len(defined) < k:
        logger.warning(
            "OvR AUC undefined for classes %s (absent from labels)", [c for c in range(k) if c not in defined]
        )
    auc: float | None = None
    if defined:
        auc_values = torch.tensor([aucs[c] for c in defined], dtype=torch.float64)
        weights = support[defined].double() if average == "weighted" else torch.ones(len(defined), dtype=torch.float64)
        auc = _average(auc_values, weights)

    pred = torch.argmax(p, dim=1)
    cm = confusion_matrix(pred, y, k)
    tp = torch.diagonal(cm).double()
    n_pred = cm.sum(dim=0).double()
    n_true = cm.sum(dim=1).double()
    zero = torch.zeros(k, dtype=torch.float64)
    precision = torch.where(n_pred > 0, tp / n_pred.clamp(min=1), zero)
    recall = torch.where(n_true > 0, tp / n_true.clamp(min=1), zero)
    f1 = torch.where(n_pred + n_true > 0, 2 * tp / (n_pred + n_true).clamp(min=1), zero)
    weights = n_true if average == "weighted" else ((n_pred + n_true) > 0).double()
    return {
        "num_classes": k,
        "average": average,
        "accuracy": float((pred == y).double().mean()),
        "auc": auc,
        "auc_per_class": aucs,
        "precision": _average(precision, weights),
        "recall": _average(recall, weights),
        "f1": _average(f1, weights),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "support": support.tolist(),
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
    }
