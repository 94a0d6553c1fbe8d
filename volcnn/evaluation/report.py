"""The classification report of one evaluated section: ``metrics.json``, ``predictions.csv``, ``roc.png``,
``confusion.png``, ``calibration.png`` and ``report.html``, from probabilities, labels and case descriptions.

A plain function of tensors so it can be run and tested without an engine; the bundle's ``evaluate.json`` calls
it through the Ignite adapters of :mod:`volcnn.engines.evaluation`. The binary decision threshold is chosen on a
*different* set of cases (the validation section) when one is given, so the reported figures are not tuned on
the cases they describe; without one it is chosen on the evaluated cases and the report says it is optimistic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from volcnn.core.atomic import atomic_write_json
from volcnn.evaluation._checks import TensorLike, as_labels, to_tensor
from volcnn.evaluation.calibration import expected_calibration_error, reliability_bins
from volcnn.evaluation.classification import (
    binary_metrics,
    multiclass_metrics,
    roc_curve,
    threshold_for_sensitivity,
    youden_threshold,
)
from volcnn.evaluation.html import write_report_html
from volcnn.evaluation.plots import plot_calibration, plot_confusion, plot_roc
from volcnn.evaluation.predictions import write_predictions_csv
from volcnn.evaluation.summary import classification_report
from volcnn.models.calibration import CALIBRATION_FILE, fit_platt

__all__ = ["write_classification_report"]

logger = logging.getLogger(__name__)

_HTML_ROWS = 40
"""Cases listed in ``report.html``: those whose probability is furthest from their label (binary)."""


def write_classification_report(
    probs: TensorLike,
    labels: TensorLike,
    cases: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    threshold_probs: TensorLike | None = None,
    threshold_labels: TensorLike | None = None,
    *,
    section: str = "test",
    class_names: Sequence[str] | None = None,
    target_sensitivity: float | None = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
    engine_metrics: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """Compute the metrics of one section and write every output file to ``out_dir`` (atomically).

    Binary (K = 2): the threshold is Youden's on ``threshold_probs``/``threshold_labels`` (the validation
    section), and so is the operating point at ``target_sensitivity``; with no such cases, or cases of one class,
    Youden's on the evaluated cases is used and flagged as optimistic. ``metrics`` holds
    :func:`~volcnn.evaluation.classification_report` at that threshold (AUC with its bootstrap CI, threshold
    metrics, ECE). K > 2: :func:`~volcnn.evaluation.multiclass_metrics`.

    ``predictions.csv`` has one row per case: ``index``, the fields of ``cases[i]`` (e.g. ``case``, ``image``,
    ``center_x/y/z``; the caller decides what identifies a case, and must leave out patient identifiers),
    ``label``, ``prob`` (K = 2) or ``prob_0..prob_{K-1}``, ``predicted`` and ``correct``.

    Args:
        probs: ``(N, K)`` class probabilities of the evaluated cases (rows sum to 1), K >= 2.
        labels: ``(N,)`` class indices.
        cases: N mappings of JSON/CSV-friendly values describing the cases, in the order of ``probs``.
        out_dir: output folder (created if needed).
        threshold_probs: ``(M, K)`` probabilities of the cases the threshold is chosen on, or ``None``.
        threshold_labels: ``(M,)`` their class indices (given together with ``threshold_probs``).
        section: name of the evaluated section (written into the outputs).
        class_names: K display names (default ``non-nodule``/``nodule`` for K = 2, else ``class k``).
        target_sensitivity: also report the operating point reaching this sensitivity on the threshold cases.
        n_boot: bootstrap resamples for the AUC confidence interval.
        seed: bootstrap seed.
        extra: constant fields added to ``metrics.json`` (e.g. the network name), shown in the report.
        engine_metrics: figures computed by the engine during the same run (``val_auc``), shown as they are.

    Returns:
        The ``metrics.json`` payload.

    Raises:
        ValueError: for no cases, ``probs``/``labels``/``cases`` of different lengths, ``probs`` not ``(N, K)``,
            or only one of ``threshold_probs``/``threshold_labels``.
    """
    p = to_tensor(probs, "probs")
    if len(p) == 0:
        raise ValueError(f"no cases were evaluated in section {section!r}; nothing to report")
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got shape {tuple(p.shape)}")
    p = p.to(torch.float64)
    k = p.shape[1]
    y = as_labels(labels, num_classes=k)
    if not len(y) == len(cases) == len(p):
        raise ValueError(f"probs, labels and cases must describe the same cases: {len(p)}, {len(y)}, {len(cases)}")
    if (threshold_probs is None) != (threshold_labels is None):
        raise ValueError("threshold_probs and threshold_labels must be given together")
    names = (
        list(class_names) if class_names else (["non-nodule", "nodule"] if k == 2 else [f"class {i}" for i in range(k)])
    )
    extra = dict(extra or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    payload: dict[str, Any] = {"section": section, "num_samples": len(y), "class_names": names}
    images: list[tuple[str, Path]] = []
    if k == 2:
        scores = p[:, 1]
        youden, at_target, source = _validation_thresholds(threshold_probs, threshold_labels, target_sensitivity)
        if youden is None:
            notes.append(f"Threshold chosen on the evaluated cases themselves ({source}): optimistic.")
            source = f"{section} (Youden; {source})"
        report = classification_report(scores, y, youden, n_boot=n_boot, seed=seed)
        report["threshold_source"] = source
        if at_target is not None:
            report["at_target_sensitivity"] = {
                "target": target_sensitivity,
                "chosen_on": "validation",
                **binary_metrics(scores, y, at_target),
            }
        calibration = _calibration_fit(threshold_probs, threshold_labels, scores, y, out)
        if calibration is not None:
            report["calibration"] = calibration
        payload["metrics"] = report
        images += _binary_plots(out, section, scores, y, report, names)
    else:
        report = multiclass_metrics(p, y)
        payload["metrics"] = {"task": "multiclass", "num_samples": len(y), **report}
        images += _multiclass_plots(out, p, y, report, names)
    payload["engine_metrics"] = dict(engine_metrics or {})
    payload.update(extra)
    rows = _rows(p, y, cases, payload["metrics"].get("threshold"))
    write_predictions_csv(out / "predictions.csv", rows)
    payload["files"] = {
        "predictions": "predictions.csv",
        **{n: path.name for n, path in images},
        "report": "report.html",
    }
    atomic_write_json(out / "metrics.json", payload)
    _html(out, payload, images, rows, notes, extra)
    logger.info("evaluation of %d %s cases written to %s", len(y), section, out)
    return payload


def _calibration_fit(
    probs: TensorLike | None, labels: TensorLike | None, scores: torch.Tensor, y: torch.Tensor, out: Path
) -> dict[str, Any] | None:
    """Platt scaling fitted on the threshold (validation) cases, written to ``out/calibration.json``; its
    parameters and the evaluated cases' ECE before and after it. None when there are no validation cases or too
    few of either class to fit (the report is then uncalibrated, as before)."""
    if probs is None or labels is None or len(to_tensor(probs, "threshold_probs")) == 0:
        return None
    p = to_tensor(probs, "threshold_probs")
    try:
        fitted = fit_platt(p[:, 1].numpy(), as_labels(labels, "threshold_labels", num_classes=2).numpy())
    except ValueError as e:
        logger.warning("no calibration fitted: %s", e)
        return None
    fitted.write(out / CALIBRATION_FILE)
    calibrated = torch.from_numpy(fitted.apply(scores.numpy()))
    return {
        **fitted.to_dict(),
        "file": CALIBRATION_FILE,
        "ece_before": expected_calibration_error(scores, y),
        "ece_after": expected_calibration_error(calibrated, y),
    }


def _validation_thresholds(
    probs: TensorLike | None, labels: TensorLike | None, target_sensitivity: float | None
) -> tuple[float | None, float | None, str]:
    """``(youden, threshold at the target sensitivity, source)`` on the threshold cases, or ``(None, None, why)``."""
    if probs is None or labels is None:
        return None, None, "no validation cases"
    p = to_tensor(probs, "threshold_probs")
    if len(p) == 0:
        return None, None, "no validation cases"
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"threshold_probs must have shape (M, 2) for a binary report, got shape {tuple(p.shape)}")
    scores, y = p[:, 1].to(torch.float64), as_labels(labels, "threshold_labels", num_classes=2)
    if y.unique().numel() < 2:
        return None, None, "validation cases are of one class"
    youden = youden_threshold(scores, y)
    target = None
    if target_sensitivity is not None:
        target = threshold_for_sensitivity(scores, y, float(target_sensitivity))
    return youden, target, "validation (Youden)"


def _binary_plots(
    out: Path, section: str, scores: torch.Tensor, labels: torch.Tensor, report: dict[str, Any], names: list[str]
) -> list[tuple[str, Path]]:
    images: list[tuple[str, Path]] = []
    if report.get("auc") is not None:
        fpr, tpr, _ = roc_curve(scores, labels)
        op = (1.0 - report["specificity"], report["sensitivity"])
        ci = report.get("auc_ci95")
        curves = {section: (fpr.tolist(), tpr.tolist())}
        roc = plot_roc(curves, out / "roc.png", aucs={section: report["auc"]},
                       ci={section: tuple(ci) if ci else None}, operating_points={section: op},
                       title=f"ROC ({section})")  # fmt: skip
        images.append(("roc", roc))
    title = f"Confusion at threshold {report['threshold']:.3g}"
    images.append(("confusion", plot_confusion(report["confusion_matrix"], names, out / "confusion.png", title=title)))
    images.append(("calibration", _calibration(out, scores, labels, report.get("ece"), "Calibration")))
    return images


def _multiclass_plots(
    out: Path, probs: torch.Tensor, labels: torch.Tensor, report: dict[str, Any], names: list[str]
) -> list[tuple[str, Path]]:
    curves, aucs = {}, {}
    for c, name in enumerate(names):
        binary = (labels == c).long()
        if binary.unique().numel() == 2:
            fpr, tpr, _ = roc_curve(probs[:, c], binary)
            curves[name] = (fpr.tolist(), tpr.tolist())
            aucs[name] = report["auc_per_class"][c]
    images: list[tuple[str, Path]] = []
    if curves:
        images.append(("roc", plot_roc(curves, out / "roc.png", aucs=aucs, title="ROC, one vs rest")))
    images.append(("confusion", plot_confusion(report["confusion_matrix"], names, out / "confusion.png")))
    images.append(("calibration", _calibration(out, probs, labels, report.get("ece"), "Calibration (top label)")))
    return images


def _calibration(out: Path, probs: torch.Tensor, labels: torch.Tensor, ece: float | None, title: str) -> Path:
    bins = reliability_bins(probs, labels)
    return plot_calibration(
        bins["mean_confidence"].tolist(),
        bins["observed_frequency"].tolist(),
        bins["count"].tolist(),
        out / "calibration.png",
        ece=ece,
        title=title,
    )


def _rows(
    probs: torch.Tensor, labels: torch.Tensor, cases: Sequence[Mapping[str, Any]], threshold: float | None
) -> list[dict[str, Any]]:
    """One ``predictions.csv`` row per case (see ``write_classification_report``)."""
    rows = []
    binary = probs.shape[1] == 2
    for i, (p, y, case) in enumerate(zip(probs, labels.tolist(), cases, strict=True)):
        row: dict[str, Any] = {"index": i, **case, "label": y}
        if binary:
            prob = float(p[1])
            row["prob"] = prob
            row["predicted"] = int(prob >= threshold) if threshold is not None else int(p.argmax())
        else:
            row.update({f"prob_{c}": float(v) for c, v in enumerate(p.tolist())})
            row["predicted"] = int(p.argmax())
        row["correct"] = int(row["predicted"] == y)
        rows.append(row)
    return rows


def _html(
    out: Path,
    payload: dict[str, Any],
    images: list[tuple[str, Path]],
    rows: list[dict[str, Any]],
    notes: list[str],
    extra: dict[str, Any],
) -> None:
    m = payload["metrics"]
    keys = ["num_samples", "num_positive", "num_negative", "auc", "auc_ci95", "threshold", "threshold_source",
            "sensitivity", "specificity", "precision", "f1", "accuracy", "ece"]  # fmt: skip
    if m.get("task") == "multiclass":
        keys = ["num_samples", "accuracy", "auc", "precision", "recall", "f1", "ece"]
    summary = {"section": payload["section"], **{k: m.get(k) for k in keys if k in m}}
    sections = []
    if m.get("at_target_sensitivity"):
        sections.append(
            ("Operating point at the target sensitivity (chosen on validation)", m["at_target_sensitivity"])
        )
    if payload.get("engine_metrics"):
        sections.append(("Metrics computed by the engine", payload["engine_metrics"]))
    run = {k: v for k, v in payload.items() if k in extra}
    if run:
        sections.append(("Run", run))
    # the cases most worth a look: the largest gap between label and probability
    if rows and "prob" in rows[0]:
        ranked = sorted(rows, key=lambda r: -abs(r["label"] - r["prob"]))[:_HTML_ROWS]
        wanted = ("case", "image", "center_x", "center_y", "center_z", "label", "prob", "predicted")
        columns: list[str] = [c for c in wanted if c in rows[0]]
        table = (columns, [[r.get(c) for c in columns] for r in ranked])
        notes = [*notes, f"The table lists the {_HTML_ROWS} cases whose probability is furthest from their label."]
    else:
        columns = list(rows[0].keys()) if rows else []
        table = (columns, [[r.get(c) for c in columns] for r in rows[:_HTML_ROWS]])
    write_report_html(
        out / "report.html",
        title=f"volcnn evaluation: {payload['section']}",
        summary=summary,
        sections=sections,
        images=images,
        table=table,
        notes=notes,
    )
