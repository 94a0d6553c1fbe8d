"""Ignite adapters of the evaluation report of ``evaluate.json``.

:class:`PredictionCollector` gathers every case an evaluator sees (probabilities, label, what identifies the case;
under DDP every rank's, in datalist order); :class:`EvaluationReport` hands them, with a second collector's cases
of the validation section for the decision threshold, to :func:`volcnn.evaluation.write_classification_report`
when the evaluator completes. The metrics and the files (``metrics.json``, ``predictions.csv``, the plots,
``report.html``) are computed and written there; here is only what needs an engine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from volcnn.engines.dist import is_rank0, world_size
from volcnn.evaluation import write_classification_report

__all__ = ["PredictionCollector", "EvaluationReport"]


class PredictionCollector:
    """Ignite handler collecting class probabilities, labels and case identity for every evaluated sample.

    Reads the evaluator's post-processed output (``pred``: ``(K,)`` softmax probabilities, ``label``: one-hot
    ``(K,)`` or an index) and the batch entry (``case``, ``center``, the image's path). The datalist's
    ``patient`` field is never kept. Reset at every run.

    The image is named by its path as the datalist gave it: relative to ``dataset_dir`` when the file lies under
    it (``volcnn.io.load_datalist`` joins a datalist's relative paths to ``dataset_dir``, so this gives back what
    the datalist wrote), else absolute. The file name alone is not enough: ``train/0001.nii.gz`` and
    ``test/0001.nii.gz``, or the same series UID in two LUNA16 subsets, would share one. Without ``dataset_dir``
    every path is absolute. The ``case`` column is the entry's ``case`` field, else the file name without its
    extensions.

    Under DDP (``multi_gpu_evaluate.json``) each rank evaluates its contiguous block of the section; when the
    evaluator completes, every rank's collection is gathered in rank order, so all ranks hold the whole section
    in datalist order, as one process would.

    Args:
        dataset_dir: the bundle's ``dataset_dir`` (``"@dataset_dir"`` in ``evaluate.json``), or ``None``.

    Attributes:
        probs: ``(N, K)`` float64 after a run.
        labels: ``(N,)`` int64.
        cases: one dict per sample (``case``, ``image``, ``center_x/y/z``).
    """

    def __init__(self, dataset_dir: str | os.PathLike[str] | None = None) -> None:
        self.dataset_dir = dataset_dir
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
            self.cases.append(_case_info(item, self.dataset_dir))

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


def _case_info(item: dict[str, Any], dataset_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    image = item.get("image")
    meta = getattr(image, "meta", {}) or {}
    filename = meta.get("filename_or_obj")
    name = os.path.basename(str(filename)) if filename else None
    info["case"] = item.get("case") or (name.split(".")[0] if name else None)
    info["image"] = _datalist_path(str(filename), dataset_dir) if filename else None
    center = item.get("center")
    if center is not None:
        xyz = torch.as_tensor(center).reshape(-1).tolist()
        for axis, value in zip("xyz", xyz, strict=False):
            info[f"center_{axis}"] = float(value)
    return info


def _datalist_path(filename: str, dataset_dir: str | os.PathLike[str] | None) -> str:
    """``filename`` relative to ``dataset_dir`` (``/`` separators) when it lies under it, else absolute.

    Lexical (no symlinks resolved): the loader read ``dataset_dir`` joined with the datalist's path, so the two
    share their spelling; resolving links could take a linked file out of the folder the datalist names.
    """
    path = os.path.abspath(filename)
    if dataset_dir is not None and str(dataset_dir):
        root = os.path.abspath(dataset_dir)
        if os.path.commonpath([root, path]) == root and path != root:
            return PurePath(os.path.relpath(path, root)).as_posix()
    return PurePath(path).as_posix()


class EvaluationReport:
    """Ignite handler writing the evaluation outputs when the evaluator completes: an adapter of
    :func:`volcnn.evaluation.write_classification_report`, fed by the collectors.

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

    def write(self, engine_metrics: dict[str, float | None] | None = None) -> dict[str, Any]:
        """Compute everything from the collected predictions and write all outputs; returns ``metrics.json``."""
        tc = self.threshold_collector
        return write_classification_report(
            self.collector.probs,
            self.collector.labels,
            self.collector.cases,
            self.output_dir,
            threshold_probs=tc.probs if tc is not None and len(tc) else None,
            threshold_labels=tc.labels if tc is not None and len(tc) else None,
            section=self.section,
            class_names=self.class_names,
            target_sensitivity=self.target_sensitivity,
            n_boot=self.n_boot,
            seed=self.seed,
            extra=self.extra,
            engine_metrics=engine_metrics,
        )


def _finite(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The engine's numeric metrics as floats, ``None`` for NaN/inf (``metrics.json`` is strict JSON)."""
    out: dict[str, float | None] = {}
    for name, value in metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        out[name] = v if math.isfinite(v) else None
    return out
