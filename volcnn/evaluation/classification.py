"""Binary and multi-class classification metrics: scikit-learn's, behind volcnn's input checks.

The curves, areas, confusion counts and ratios are computed by :mod:`sklearn.metrics`. What this module adds:

* one input convention and one set of error messages (:mod:`volcnn.evaluation._checks`): ``scores`` are ``(N,)``
  real numbers, higher meaning "more positive" (probabilities or logits), converted to float64; ``labels`` are
  ``(N,)`` integer class indices (int64 after conversion; bool and whole-valued floats are accepted), 0 or 1 for
  binary metrics. Inputs may be tensors on any device, NumPy arrays or sequences. Invalid input (wrong shape,
  mismatched lengths, NaN, labels out of range, a metric that is undefined because only one class is present)
  raises ``ValueError`` naming the problem, where scikit-learn would accept it (labels outside ``labels=``, NaN
  ranks) or fail with a message that does not name the argument;
* results as Python numbers or CPU tensors (float64 curves, int64 counts);
* the operating points scikit-learn has no function for (Youden's threshold, the threshold reaching a
  sensitivity) as a few lines on top of its curves, with a finite stand-in for its ``+inf`` threshold.

A case is predicted positive when ``score >= threshold`` (scikit-learn's convention).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from volcnn.evaluation._checks import (
    TensorLike,
    as_labels,
    as_probs,
    as_scores_2d,
    binary_inputs,
    check_same_length,
    require_both_classes,
)
from volcnn.evaluation.calibration import expected_calibration_error

__all__ = [
    "binary_metrics",
    "confusion_matrix",
    "finite_threshold_above",
    "mean_ovr_auc",
    "multiclass_metrics",
    "roc_auc",
    "roc_curve",
    "roc_points",
    "threshold_for_sensitivity",
    "youden_threshold",
]

logger = logging.getLogger(__name__)


def _binary_arrays(scores: TensorLike, labels: TensorLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked binary inputs as NumPy: float64 scores ``(N,)`` and int64 0/1 labels ``(N,)``."""
    s, y = binary_inputs(scores, labels)
    return s.numpy(), y.numpy()


def roc_curve(
    scores: TensorLike, labels: TensorLike, *, drop_intermediate: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROC curve ``(fpr, tpr, thresholds)``, each float64 of shape ``(T + 1,)``.

    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=drop_intermediate)``: one point per distinct
    score, thresholds decreasing, preceded by the point ``(0, 0)`` at threshold ``+inf``. Tied scores form one
    point. ``drop_intermediate=True`` drops collinear points (for lighter plots); the default keeps every point,
    which the thresholds below need.

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels.

    Raises:
        ValueError: for invalid input or when only one class is present (one of the rates is then undefined;
            scikit-learn would warn and return NaN rates).
    """
    s, y = _binary_arrays(scores, labels)
    require_both_classes(torch.from_numpy(y), "the ROC curve")
    fpr, tpr, thr = (
        torch.from_numpy(np.asarray(a, dtype=np.float64))
        for a in skm.roc_curve(y, s, drop_intermediate=drop_intermediate)
    )
    return fpr, tpr, thr


def roc_points(scores: TensorLike, labels: TensorLike, *, drop_intermediate: bool = True) -> dict[str, list[Any]]:
    """The ROC curve as JSON-serialisable lists ``{"fpr", "tpr", "thresholds"}`` for plots and reports.

    The first threshold (``+inf`` in ``roc_curve``) is ``None``. Collinear points are dropped by default.
    """
    fpr, tpr, thr = roc_curve(scores, labels, drop_intermediate=drop_intermediate)
    thresholds: list[float | None] = [None, *thr[1:].tolist()]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds}


def roc_auc(scores: TensorLike, labels: TensorLike) -> float:
    """Area under the ROC curve, ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Equal to P(score of a positive > score of a negative) + ½ P(tie): tied scores form one point of the curve,
    whose trapezoid counts a positive-negative tie one half.

    Args:
        scores: ``(N,)`` real scores.
        labels: ``(N,)`` 0/1 labels.

    Raises:
        ValueError: for invalid input or when only one class is present.
    """
    s, y = _binary_arrays(scores, labels)
    require_both_classes(torch.from_numpy(y), "ROC AUC")
    return float(skm.roc_auc_score(y, s))


def mean_ovr_auc(scores: TensorLike, labels: TensorLike) -> float:
    """Unweighted mean over all K classes of the one-vs-rest ROC AUC of column k against ``labels == k``.

    ``sklearn.metrics.roc_auc_score(onehot(labels), scores, average="macro")``. This is the model-selection metric
    of training (``train_auc``/``val_auc``, :class:`volcnn.engines.RocAuc`): the definition of MONAI's ``ROCAUC``
    handler, which the bundle used before, kept so that the same epochs are selected. For K = 2 softmax columns
    it is the mean of the AUC of column 1 (what :func:`roc_auc` and the evaluation report give) and that of
    column 0 against the negatives; the two are equal unless float32 rounding ties two cases in one column and
    not in the other. For K > 2 with every class present it equals ``multiclass_metrics(...)["auc"]``.

    Args:
        scores: ``(N, K)`` real scores, K >= 2 (probabilities or logits; rows need not sum to 1).
        labels: ``(N,)`` class indices in ``[0, K)``.

    Raises:
        ValueError: for invalid input, or when a class is absent from the labels or is the only one present (its
            one-vs-rest AUC is then undefined).
    """
    s = as_scores_2d(scores)
    k = s.shape[1]
    y = as_labels(labels, num_classes=k)
    n = check_same_length(scores=s, labels=y)
    support = torch.bincount(y, minlength=k)
    undefined = [c for c in range(k) if not 0 < int(support[c]) < n]
    if undefined:
        raise ValueError(
            f"one-vs-rest ROC AUC is undefined for classes {undefined}: each class needs positives and negatives "
            f"(class counts {support.tolist()})"
        )
    onehot = np.eye(k, dtype=np.int64)[y.numpy()]
    return float(skm.roc_auc_score(onehot, s.numpy(), average="macro"))


def finite_threshold_above(value: float) -> float:
    """The smallest float32 number strictly above ``value`` (as a Python float), or the float64 one if none.

    Kept hand-written: scikit-learn's curves put ``+inf`` where the best operating point is "predict nothing
    positive", which JSON cannot hold (``metrics.json`` is written with ``allow_nan=False``). The stand-in must
    predict every case negative however the caller compares: ``score >= threshold`` is false for every score
    ``<= value`` whether the scores are float64 or float32 (a Python float compared with a float32 tensor is
    rounded to float32 first, so the next float64 above ``value`` could round back down onto ``value``).
    """
    f32 = torch.tensor(value, dtype=torch.float32)
    up = float(torch.nextafter(f32, torch.tensor(float("inf"), dtype=torch.float32)))
    if up > value and up != float("inf"):
        return up
    f64 = torch.tensor(value, dtype=torch.float64)
    return float(torch.nextafter(f64, torch.tensor(float("inf"), dtype=torch.float64)))


def youden_threshold(scores: TensorLike, labels: TensorLike) -> float:
    """Threshold maximising Youden's J = TPR - FPR over the ROC thresholds (the distinct scores).

    scikit-learn has no function for it: this is the argmax of ``tpr - fpr`` along ``sklearn.metrics.roc_curve``
    with every point kept. Among equally good thresholds the largest is returned (the first argmax). When no
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
    best = int(np.argmax((tpr - fpr).numpy()))
    if best == 0:
        return finite_threshold_above(float(thr[1]))
    return float(thr[best])


def threshold_for_sensitivity(scores: TensorLike, labels: TensorLike, target: float) -> float:
    """The largest threshold whose sensitivity (TPR = TP / P, float64) is at least ``target``.

    scikit-learn has no function for it: this is the last point of ``sklearn.metrics.precision_recall_curve``
    (thresholds increasing, one per distinct score, recall = sensitivity non-increasing) whose recall reaches
    ``target``. The precision-recall curve rather than the ROC curve because it is defined without negatives.
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
    s, y = _binary_arrays(scores, labels)
    if int(y.sum()) == 0:
        raise ValueError("sensitivity is undefined without positive labels: labels are all 0")
    _, recall, thresholds = skm.precision_recall_curve(y, s)
    reaching = np.flatnonzero(recall[:-1] >= target)  # the last recall (0, no threshold) is never >= target > 0
    return float(thresholds[reaching[-1]])


def confusion_matrix(preds: TensorLike, labels: TensorLike, num_classes: int) -> torch.Tensor:
    """Confusion matrix, int64 ``(K, K)``: entry ``[i, j]`` counts cases of true class ``i`` predicted ``j``.

    ``sklearn.metrics.confusion_matrix(labels, preds, labels=range(K))``: rows are the true class and columns the
    prediction; for K = 2 this is ``[[tn, fp], [fn, tp]]``. Indices outside ``[0, K)`` are refused here (scikit-learn
    would leave those cases out of the counts without a word).

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
    cm = skm.confusion_matrix(y.numpy(), p.numpy(), labels=np.arange(k))
    return torch.from_numpy(cm.astype(np.int64))


def binary_metrics(scores: TensorLike, labels: TensorLike, threshold: float) -> dict[str, float]:
    """Threshold metrics of binary predictions ``score >= threshold``.

    Returns a dict with float ``accuracy, sensitivity, specificity, precision, f1, npv, threshold`` and int
    ``tp, fp, tn, fn``: the counts are ``confusion_matrix``'s, the ratios those of
    ``sklearn.metrics.precision_recall_fscore_support(labels, preds, labels=[0, 1], zero_division=0)`` (class 1:
    precision, sensitivity, F1; class 0: NPV, specificity). A ratio whose denominator is 0 (e.g. precision when
    nothing is predicted positive, sensitivity without positives) is 0.0, never NaN.
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
    s, y = _binary_arrays(scores, labels)
    pred = (s >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    precision, recall, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "precision": float(precision[1]),
        "f1": float(f1[1]),
        "npv": float(precision[0]),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": threshold,
    }


def multiclass_metrics(
    probs: TensorLike, labels: TensorLike, average: str = "macro", *, n_bins: int = 15
) -> dict[str, Any]:
    """One-vs-rest AUCs, argmax precision/recall/F1, accuracy, confusion matrix and top-label ECE.

    Values are JSON-serialisable (floats, ints, nested lists, ``None``):

    * ``auc_per_class``: OvR AUC (``roc_auc``) of column k against ``labels == k``; ``None`` for a class that is
      absent (or the only class present). ``auc``: their macro mean, or prevalence-weighted mean for
      ``average="weighted"`` (equal to ``roc_auc_score(labels, probs, multi_class="ovr", average=...)`` when every
      class is present; where scikit-learn raises for an absent class, the average here is over the defined
      classes, with a logged warning, and ``None`` if there are none).
    * ``precision_per_class``, ``recall_per_class``, ``f1_per_class``, ``support`` (cases per true class):
      ``precision_recall_fscore_support(labels, argmax, labels=range(K), zero_division=0)``; ``precision``,
      ``recall``, ``f1``: the same with ``average=average`` (``macro`` over the classes present in the labels or
      the predictions, ``weighted`` by support).
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
    aucs: list[float | None] = [roc_auc(p[:, c], y == c) if 0 < int(support[c]) < n else None for c in range(k)]
    defined = [c for c in range(k) if aucs[c] is not None]
    if len(defined) < k:
        logger.warning(
            "OvR AUC undefined for classes %s (absent from labels)", [c for c in range(k) if c not in defined]
        )
    auc: float | None = None
    if defined:
        weights = support[defined].double().numpy() if average == "weighted" else None
        auc = float(np.average([aucs[c] for c in defined], weights=weights))

    y_np, pred = y.numpy(), torch.argmax(p, dim=1).numpy()
    per_class = skm.precision_recall_fscore_support(y_np, pred, labels=np.arange(k), zero_division=0)
    precision, recall, f1, _ = skm.precision_recall_fscore_support(y_np, pred, average=average, zero_division=0)
    return {
        "num_classes": k,
        "average": average,
        "accuracy": float(skm.accuracy_score(y_np, pred)),
        "auc": auc,
        "auc_per_class": aucs,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "precision_per_class": per_class[0].tolist(),
        "recall_per_class": per_class[1].tolist(),
        "f1_per_class": per_class[2].tolist(),
        "support": support.tolist(),
        "confusion_matrix": confusion_matrix(pred, y, k).tolist(),
        "ece": expected_calibration_error(p, y, n_bins=n_bins),
    }
