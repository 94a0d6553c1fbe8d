"""Evaluation outputs of ``evaluate.json``: per-case predictions, metrics, plots and a self-contained report.

:class:`PredictionCollector` gathers every case an evaluator sees; :class:`EvaluationReport` turns them into
``metrics.json``, ``predictions.csv``, ``roc.png``, ``confusion.png``, ``calibration.png`` and ``report.html``
in the output folder, all written atomically. The decision threshold is chosen on a *different* section (the
validation split, collected by a second collector) so the test figures are not tuned on the test cases.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from volcnn import evaluation as M
from volcnn.core.atomic import atomic_write_json
from volcnn.engines.dist import is_rank0, world_size
from volcnn.evaluation import plot_calibration, plot_confusion, plot_roc, write_predictions_csv, write_report_html

__all__ = ["PredictionCollector", "EvaluationReport"]

logger = logging.getLogger(__name__)


class PredictionCollector:
    """Ignite handler collecting class probabilities, labels and case identity for every evaluated sample.

    Reads the evaluator's post-processed output (``pred``: ``(K,)`` softmax probabilities, ``label``: one-hot
    ``(K,)`` or an index) and the batch entry (``case``, ``center``, the image file name). The datalist's
    ``patient`` field is never kept. Reset at every run.

    Under DDP (``multi_gpu_evaluate.json``) each rank evaluates its contiguous block of the section; when the
    evaluator completes, every rank's collection is gathered in rank order, so all ranks hold the whole section
    in datalist order, as one process would.

    Attributes:
        probs: ``(N, K)`` float64 after a run.
        labels: ``(N,)`` int64.
        cases: one dict per sample (``case``, ``image``, ``center_x/y/z``).
    """

    def __init__(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[int] = []
        self.cases: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.gather)

    def reset(self, engine: Engine | None = None) -> None:
        self._probs, self._labels, self.cases = [], [], []

    def collect(self, engine: Engine) -> None:
        outputs: Any = engine.state.output
        batch: Any = engine.state.batch
        if isinstance(outputs, dict):  # not decollated: split the batch dimension
            outputs = [dict(zip(outputs, v, strict=False)) for v in zip(*outputs.values(), strict=False)]
        items: list[Any] = batch if isinstance(batch, list) else [{}] * len(outputs)
        for out, item in zip(outputs, items, strict=False):
            pred = torch.as_tensor(out["pred"]).detach().float().cpu().reshape(-1)
            label = torch.as_tensor(out["label"]).detach().cpu().reshape(-1)
            self._probs.append(pred.double())
            self._labels.append(int(label.argmax()) if label.numel() > 1 else int(label.item()))
            self.cases.append(_case_info(item))

    def gather(self, engine: Engine | None = None) -> None:
        """Replace this rank's collection by all ranks' in rank order (a collective; a no-op in one process)."""
        if world_size() < 2:
            return
        parts: list[Any] = [None] * world_size()
        dist.all_gather_object(parts, (self._probs, self._labels, self.cases))
        self._probs = [p for probs, _, _ in parts for p in probs]
        self._labels = [y for _, labels, _ in parts for y in labels]
        self.cases = [c for _, _, cases in parts for c in cases]

    @property
    def probs(self) -> torch.Tensor:
        return torch.stack(self._probs) if self._probs else torch.zeros(0, 0, dtype=torch.float64)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self._labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self._labels)


def _case_info(item: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    image = item.get("image")
    meta = getattr(image, "meta", {}) or {}
    filename = meta.get("filename_or_obj")
    name = os.path.basename(str(filename)) if filename else None
    info["case"] = item.get("case") or (name.split(".")[0] if name else None)
    info["image"] = name
    center = item.get("center")
    if center is not None:
        xyz = torch.as_tensor(center).reshape(-1).tolist()
        for axis, value in zip("xyz", xyz, strict=False):
            info[f"center_{axis}"] = float(value)
    return info


class EvaluationReport:
    """Ignite handler writing the evaluation outputs when the evaluator completes.

    Under DDP only rank 0 writes; the collectors have gathered every rank's cases by then.

    Args:
        output_dir: folder for ``metrics.json``, ``predictions.csv``, the PNGs and ``report.html``.
        collector: the :class:`PredictionCollector` attached to the same evaluator.
        threshold_collector: a collector that ran on the validation section before; the binary decision
            threshold is Youden's on those cases (and the target-sensitivity threshold too). Without it (or if
            it holds one class only), Youden's on the evaluated cases is used and flagged as optimistic.
        section: datalist section evaluated (written into the outputs).
        class_names: display names, ``K`` of them (default ``"class k"``; binary: non-nodule / nodule).
        target_sensitivity: also report the operating point reaching this sensitivity on validation.
        n_boot: bootstrap resamples for the AUC confidence interval.
        seed: bootstrap seed.
        extra: constant fields added to ``metrics.json`` (e.g. the network name).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        collector: PredictionCollector,
        threshold_collector: PredictionCollector | None = None,
        section: str = "test",
        class_names: list[str] | None = None,
        target_sensitivity: float | None = 0.9,
        n_boot: int = 1000,
        seed: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.collector = collector
        self.threshold_collector = threshold_collector
        self.section = section
        self.class_names = class_names
        self.target_sensitivity = target_sensitivity
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if is_rank0():
            self.write(engine_metrics=_finite(engine.state.metrics))

    # ------------------------------------------------------------------ thresholds
    def _validation_thresholds(self) -> tuple[float | None, float | None, str]:
        tc = self.threshold_collector
        if tc is None or len(tc) == 0:
            return None, None, "no validation cases"
        scores, labels = _positive_scores(tc.probs), tc.labels
        if labels.unique().numel() < 2:
            return None, None, "validation cases are of one class"
        youden = M.youden_threshold(scores, labels)
        target = None
        if self.target_sensitivity is not None:
            target = M.threshold_for_sensitivity(scores, labels, float(self.target_sensitivity))
        return youden, target, "validation (Youden)"

    # ------------------------------------------------------------------ writing
    def write(self, engine_metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """Compute everything from the collected predictions and write all outputs; returns ``metrics.json``."""
        probs, labels = self.collector.probs, self.collector.labels
        if len(labels) == 0:
            raise ValueError(f"no cases were evaluated in section {self.section!r}; nothing to report")
        k = probs.shape[1]
        names = self.class_names or (["non-nodule", "nodule"] if k == 2 else [f"class {i}" for i in range(k)])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        notes: list[str] = []
        payload: dict[str, Any] = {"section": self.section, "num_samples": len(labels), "class_names": names}
        images: list[tuple[str, Path]] = []
        if k == 2:
            scores = _positive_scores(probs)
            youden, at_target, source = self._validation_thresholds()
            if youden is None:
                notes.append(f"Threshold chosen on the evaluated cases themselves ({source}): optimistic.")
                source = f"{self.section} (Youden; {source})"
            report = M.classification_report(scores, labels, youden, n_boot=self.n_boot, seed=self.seed)
            report["threshold_source"] = source
            if at_target is not None:
                report["at_target_sensitivity"] = {
                    "target": self.target_sensitivity,
                    "chosen_on": "validation",
                    **M.binary_metrics(scores, labels, at_target),
                }
            payload["metrics"] = report
            images += self._binary_plots(scores, labels, report, names)
        else:
            report = M.multiclass_metrics(probs, labels)
            payload["metrics"] = {"task": "multiclass", "num_samples": len(labels), **report}
            images += self._multiclass_plots(probs, labels, report, names)
        payload["engine_metrics"] = engine_metrics or {}
        payload.update(self.extra)
        rows = self._rows(probs, labels, names, payload["metrics"].get("threshold"))
        write_predictions_csv(self.output_dir / "predictions.csv", rows)
        payload["files"] = {"predictions": "predictions.csv", **{n: p.name for n, p in images}, "report": "report.html"}
        atomic_write_json(self.output_dir / "metrics.json", payload)
        self._html(payload, images, rows, notes)
        logger.info("evaluation of %d %s cases written to %s", len(labels), self.section, self.output_dir)
        return payload

    def _binary_plots(
        self, scores: torch.Tensor, labels: torch.Tensor, report: dict[str, Any], names: list[str]
    ) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        d, sec = self.output_dir, self.section
        if report.get("auc") is not None:
            fpr, tpr, _ = M.roc_curve(scores, labels)
            op = (1.0 - report["specificity"], report["sensitivity"])
            ci = report.get("auc_ci95")
            curves = {sec: (fpr.tolist(), tpr.tolist())}
            roc = plot_roc(curves, d / "roc.png", aucs={sec: report["auc"]}, ci={sec: tuple(ci) if ci else None},
                           operating_points={sec: op}, title=f"ROC ({sec})")  # fmt: skip
            out.append(("roc", roc))
        title = f"Confusion at threshold {report['threshold']:.3g}"
        out.append(("confusion", plot_confusion(report["confusion_matrix"], names, d / "confusion.png", title=title)))
        out.append(("calibration", self._calibration(scores, labels, report.get("ece"), "Calibration")))
        return out

    def _multiclass_plots(
        self, probs: torch.Tensor, labels: torch.Tensor, report: dict[str, Any], names: list[str]
    ) -> list[tuple[str, Path]]:
        curves, aucs = {}, {}
        for c, name in enumerate(names):
            binary = (labels == c).long()
            if binary.unique().numel() == 2:
                fpr, tpr, _ = M.roc_curve(probs[:, c], binary)
                curves[name] = (fpr.tolist(), tpr.tolist())
                aucs[name] = report["auc_per_class"][c]
        out: list[tuple[str, Path]] = []
        if curves:
            out.append(("roc", plot_roc(curves, self.output_dir / "roc.png", aucs=aucs, title="ROC, one vs rest")))
        out.append(("confusion", plot_confusion(report["confusion_matrix"], names, self.output_dir / "confusion.png")))
        out.append(("calibration", self._calibration(probs, labels, report.get("ece"), "Calibration (top label)")))
        return out

    def _calibration(self, probs: torch.Tensor, labels: torch.Tensor, ece: float | None, title: str) -> Path:
        bins = M.reliability_bins(probs, labels)
        return plot_calibration(
            bins["mean_confidence"].tolist(),
            bins["observed_frequency"].tolist(),
            bins["count"].tolist(),
            self.output_dir / "calibration.png",
            ece=ece,
            title=title,
        )

    def _rows(
        self, probs: torch.Tensor, labels: torch.Tensor, names: list[str], threshold: float | None
    ) -> list[dict[str, Any]]:
        rows = []
        for i, (p, y, case) in enumerate(zip(probs, labels.tolist(), self.collector.cases, strict=True)):
            row: dict[str, Any] = {"index": i, **case, "label": y}
            if len(names) == 2:
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
        self, payload: dict[str, Any], images: list[tuple[str, Path]], rows: list[dict[str, Any]], notes: list[str]
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
        extra = {k: v for k, v in payload.items() if k in self.extra}
        if extra:
            sections.append(("Run", extra))
        # the cases most worth a look: the largest gap between label and probability
        prob_key = "prob" if "prob" in (rows[0] if rows else {}) else None
        if prob_key:
            ranked = sorted(rows, key=lambda r: -abs(r["label"] - r[prob_key]))[:40]
            wanted = ("case", "image", "center_x", "center_y", "center_z", "label", "prob", "predicted")
            columns: list[str] = [c for c in wanted if c in rows[0]]
            table = (columns, [[r.get(c) for c in columns] for r in ranked])
            notes = [*notes, "The table lists the 40 cases whose probability is furthest from their label."]
        else:
            columns = list(rows[0].keys()) if rows else []
            table = (columns, [[r.get(c) for c in columns] for r in rows[:40]])
        write_report_html(
            self.output_dir / "report.html",
            title=f"volcnn evaluation: {payload['section']}",
            summary=summary,
            sections=sections,
            images=[(name, path) for name, path in images],
            table=table,
            notes=notes,
        )


def _positive_scores(probs: torch.Tensor) -> torch.Tensor:
    return probs[:, 1] if probs.ndim == 2 else probs


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        out[name] = v if math.isfinite(v) else None
    return out  # type: ignore[return-value]
