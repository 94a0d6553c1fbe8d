"""k-fold cross-validation through the bundle (``volcnn crossval``): folds drawn by :mod:`volcnn.data.folds`, each
trained with ``train.json`` and evaluated with the ``evaluate.json`` overlay as a normal run, then pooled.

Layout of the output folder ``O``::

    O/folds.json              k, seed, the datalist's sha256, each entry's fold (patient, image, label, fold)
    O/fold_<i>/datalist.json  fold i's datalist (test = fold i, validation = fold i+1, training = the rest)
    O/fold_<i>/...            a normal training run (run.json, models/, metrics.json, predictions.csv, report.html)
    O/fold_<i>/done.json      written last: the fold is finished
    O/oof_predictions.csv     every held-out entry once: image, label, prob, fold (and center_x/y/z in candidate mode)
    O/cv_metrics.json         pooled out-of-fold ROC AUC with its bootstrap CI, per-fold AUCs, k, seed
    O/roc.png, O/report.md    the folds' and the pooled ROC curves; the figures in a table

A killed cross-validation resumes where it stopped when run again with the same arguments: finished folds
(``done.json``) are skipped, an unfinished one resumes its training from its last checkpoint (the bundle's
``resume``), and a fold drawn differently (another k, seed or datalist) is refused rather than mixed in.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from volcnn.core.errors import UsageError
from volcnn.core.hashing import sha256_file
from volcnn.data.folds import assign_folds, fold_datalist, patient_of
from volcnn.evaluation.bootstrap import roc_auc_ci
from volcnn.evaluation.classification import roc_auc, roc_curve
from volcnn.evaluation.plots import plot_roc
from volcnn.io.datalist import read_datalist_json

__all__ = ["OOF_FIELDS", "crossval_summary", "run_crossval"]

logger = logging.getLogger(__name__)

#: columns of ``oof_predictions.csv`` (the centre columns only in candidate mode)
OOF_FIELDS = ("image", "label", "prob", "fold")
_CENTRE = ("center_x", "center_y", "center_z")


def _pooled_entries(raw: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    entries = [e if isinstance(e, dict) else {"image": e} for s in ("training", "validation") for e in raw.get(s, [])]
    if not entries:
        raise UsageError(f"{path}: no training or validation entries to cross-validate")
    return entries


def _check_folds(out: Path, doc: Mapping[str, Any]) -> None:
    """Refuse an output folder whose folds were drawn differently (a resumed CV must be the same CV)."""
    path = out / "folds.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in ("k", "seed", "datalist_sha256", "entries") if old.get(key) != doc.get(key)]
    if changed:
        raise UsageError(
            f"{path}: this folder holds a cross-validation with other {', '.join(changed)}; "
            "give a new --out or remove it"
        )


def run_crossval(
    config_file: str | os.PathLike[str],
    evaluate_file: str | os.PathLike[str],
    datalist: str | os.PathLike[str],
    out: str | os.PathLike[str],
    k: int = 5,
    seed: int = 0,
    dataset_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    only: Sequence[int] | None = None,
    pool: bool = True,
) -> dict[str, Any]:
    """Draw the folds, train and evaluate each (skipping finished ones), pool the out-of-fold predictions.

    With ``only``, just those folds run: start one process per GPU or per job, each with its folds and the same other
    arguments, into one output folder; the process that finds every fold finished pools them.

    Args:
        config_file: the bundle's ``train.json``.
        evaluate_file: its ``evaluate.json`` overlay.
        datalist: the datalist; its ``test`` section is never used.
        out: the output folder ``O`` (see the module docstring).
        k: folds (at least 3).
        seed: the folds' seed; also the training seed of every fold unless ``overrides`` sets ``seed``.
        dataset_dir: folder the image paths are relative to (default: the datalist's folder).
        overrides: train.json overrides for every fold (``plan.json``'s settings, device, epochs...).
        only: the folds this call runs (default: all).
        pool: pool the folds once all are finished; ``False`` leaves it to another call (the processes that
            ``volcnn crossval --devices`` starts, whose parent pools).

    Returns:
        ``cv_metrics.json``'s content, or ``{"pending": [folds not finished yet]}`` when other folds remain (or
        ``{"pending": []}`` when all are finished and ``pool`` is false).

    Raises:
        UsageError: too few patients or class holders for ``k`` folds, no entries, a fold outside 0..k-1 in
            ``only``, or an output folder holding another cross-validation.
    """
    from monai.bundle import run as bundle_run

    path, root = Path(datalist), Path(out)
    raw = read_datalist_json(path)
    entries = _pooled_entries(raw, path)
    folds = assign_folds(entries, k, seed)
    doc = {
        "k": k,
        "seed": seed,
        "datalist": str(path),
        "datalist_sha256": sha256_file(path),
        "entries": [
            {"patient": patient_of(e), "image": e["image"], "label": int(e.get("label", 0)), "fold": f}
            for e, f in zip(entries, folds, strict=True)
        ],
    }
    _check_folds(root, doc)
    chosen = list(range(k)) if only is None else sorted(set(int(f) for f in only))
    if any(not 0 <= f < k for f in chosen):
        raise UsageError(f"folds {chosen} outside 0..{k - 1}")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "folds.json", doc)
    base = str(Path(dataset_dir) if dataset_dir is not None else path.parent)
    common = {"seed": seed, **dict(overrides or {}), "dataset_dir": base}
    for fold in chosen:
        fold_dir = root / f"fold_{fold}"
        if (fold_dir / "done.json").is_file():
            logger.info("fold %d of %d: finished earlier, skipped", fold, k)
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        fold_list = fold_dir / "datalist.json"
        atomic_write_json(fold_list, fold_datalist(raw, entries, folds, fold, k, seed))
        run = {**common, "datalist": str(fold_list), "output_dir": str(fold_dir)}
        logger.info("fold %d of %d: training", fold, k)
        bundle_run("training", config_file=str(config_file), **run, resume=True)
        logger.info("fold %d of %d: evaluating its held-out patients", fold, k)
        bundle_run(config_file=[str(config_file), str(evaluate_file)], **run)
        if not (fold_dir / "predictions.csv").is_file():
            raise RuntimeError(f"{fold_dir}: the evaluation wrote no predictions.csv")
        atomic_write_json(fold_dir / "done.json", {"fold": fold, "k": k, "seed": seed})
        gc.collect()  # the fold's workflows (and their cached patches) are unreferenced now; free them before the next
    pending = [f for f in range(k) if not (root / f"fold_{f}" / "done.json").is_file()]
    if pending:
        logger.info("folds %s are not finished: the pooled figures are written when they are", pending)
        return {"pending": pending}
    if not pool:
        return {"pending": []}
    return crossval_summary(root, k, seed)


def _read_predictions(fold_dir: Path, fold: int) -> list[dict[str, Any]]:
    with open(fold_dir / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        item: dict[str, Any] = {"image": row["image"], "label": int(row["label"]), "prob": float(row["prob"])}
        item["fold"] = fold
        if all(row.get(c) not in (None, "") for c in _CENTRE):
            item.update({c: float(row[c]) for c in _CENTRE})
        out.append(item)
    return out


def _auc_or_none(probs: np.ndarray, labels: np.ndarray) -> float | None:
    return float(roc_auc(probs, labels)) if len(set(labels.tolist())) == 2 else None


def crossval_summary(root: str | os.PathLike[str], k: int, seed: int, n_boot: int = 1000) -> dict[str, Any]:
    """Pool the folds' ``predictions.csv`` into ``oof_predictions.csv``, ``cv_metrics.json``, ``roc.png`` and
    ``report.md`` (binary labels: the AUC of ``prob``, the probability of class 1)."""
    root = Path(root)
    rows = [r for fold in range(k) for r in _read_predictions(root / f"fold_{fold}", fold)]
    fields = [*OOF_FIELDS, *(_CENTRE if rows and "center_x" in rows[0] else ())]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(root / "oof_predictions.csv", buffer.getvalue().encode("utf-8"))

    probs = np.asarray([r["prob"] for r in rows])
    labels = np.asarray([r["label"] for r in rows])
    per_fold, curves, aucs = [], {}, {}
    for fold in range(k):
        mask = np.asarray([r["fold"] == fold for r in rows])
        auc = _auc_or_none(probs[mask], labels[mask])
        per_fold.append({"fold": fold, "n": int(mask.sum()), "positives": int(labels[mask].sum()), "roc_auc": auc})
        if auc is not None:
            fpr, tpr, _ = roc_curve(probs[mask], labels[mask])
            curves[f"fold {fold}"], aucs[f"fold {fold}"] = (fpr.numpy(), tpr.numpy()), auc
    pooled = _auc_or_none(probs, labels)
    ci = tuple(roc_auc_ci(probs, labels, n_boot=n_boot, seed=seed)) if pooled is not None else None
    if pooled is not None:
        fpr, tpr, _ = roc_curve(probs, labels)
        curves["pooled out-of-fold"], aucs["pooled out-of-fold"] = (fpr.numpy(), tpr.numpy()), pooled
    fold_aucs = [f["roc_auc"] for f in per_fold if f["roc_auc"] is not None]
    metrics = {
        "k": k,
        "seed": seed,
        "n": len(rows),
        "positives": int(labels.sum()),
        "pooled_roc_auc": pooled,
        "pooled_roc_auc_ci95": list(ci) if ci is not None else None,
        "fold_roc_auc_mean": float(np.mean(fold_aucs)) if fold_aucs else None,
        "fold_roc_auc_std": float(np.std(fold_aucs)) if fold_aucs else None,
        "folds": per_fold,
    }
    if curves:
        plot_roc(curves, root / "roc.png", aucs=aucs, ci={"pooled out-of-fold": ci}, title=f"{k}-fold cross-validation")
    atomic_write_json(root / "cv_metrics.json", metrics)
    atomic_write_text(root / "report.md", _report(metrics))
    return metrics


def _report(m: Mapping[str, Any]) -> str:
    def show(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    ci = m["pooled_roc_auc_ci95"]
    lines = [
        f"# {m['k']}-fold cross-validation (seed {m['seed']})",
        "",
        f"Pooled out-of-fold ROC AUC **{show(m['pooled_roc_auc'])}**"
        + (f" (95% bootstrap CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        + f" over {m['n']} held-out entries ({m['positives']} positive); per fold "
        f"{show(m['fold_roc_auc_mean'])} +- {show(m['fold_roc_auc_std'])}.",
        "",
        "| fold | held-out entries | positives | ROC AUC |",
        "| --- | --- | --- | --- |",
        *[f"| {f['fold']} | {f['n']} | {f['positives']} | {show(f['roc_auc'])} |" for f in m["folds"]],
        "",
        "![ROC](roc.png)",
    ]
    return "\n".join(lines) + "\n"
