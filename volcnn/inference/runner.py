"""Whole-volume inference over a batch of inputs: heat map, findings and score per case, a summary, failures.

Per input (a NIfTI file or a DICOM series folder) the runner writes, atomically::

    OUT/<case>/heatmap.nii.gz   float32 probability, exactly the input's shape and affine
    OUT/<case>/findings.json    case, score, findings in world RAS mm and input voxels, model, input sha256,
                                how the heat map was made, the settings
    OUT/summary.csv             case, score, n_findings, max_probability, status (all inputs, updated per case)
    OUT/failures.json           [{"input", "error"}] for the inputs that failed ([] when none)

A bad input is logged with its message and recorded in ``failures.json``; the batch goes on with the next one. A
re-run skips a case whose ``findings.json`` was written for the same input bytes, model and settings (an
interrupted batch resumes where it stopped); ``findings.json`` is written last and atomically, so it only exists
for a finished case.

Heat maps are made densely where the network allows and agrees with its windows, window by window otherwise
(:class:`~volcnn.inference.heatmap_strategy.HeatmapStrategy`). That is candidate mode, for models trained on patches
around candidate centres. A model trained on whole volumes (``mode="volume"``) is inferred as it was evaluated: each
case goes to :class:`~volcnn.inference.volume_mode.VolumeModeProcessor` (one probability per volume, no heat map),
through the same batch loop. Outputs carry only the file or folder name of an
input, never header fields (no patient identifiers). :func:`~volcnn.inference.load_bundle_runner` builds the runner
from a bundle's ``configs/inference.json``, :func:`~volcnn.inference.exported_runner` around an exported model.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.core.atomic import atomic_write_json, atomic_write_text
from volcnn.core.geometry import world_to_voxel
from volcnn.core.options import as_bool
from volcnn.explain import explain_findings
from volcnn.explain.features import finding_feature_attributions, patch_feature_attributions
from volcnn.inference.case_features import CaseFeatures, features_record
from volcnn.inference.cases import case_names
from volcnn.inference.dense import DEFAULT_TILE_MB
from volcnn.inference.findings import NMS_METHODS, SCORE_METHODS, find_peaks, volume_score
from volcnn.inference.heatmap_strategy import HEATMAP_METHODS, HeatmapStrategy
from volcnn.inference.localize import snap_findings
from volcnn.inference.refine import FlipMean, refine_findings, refinement_steps
from volcnn.inference.scales import check_scales, fuse_heatmaps, merge_findings, scaled_pixdim
from volcnn.inference.sharding import Shard
from volcnn.inference.volume_mode import VolumeModeProcessor
from volcnn.io.features import FeatureError, parse_feature_spec
from volcnn.io.input_hash import input_sha256
from volcnn.io.sources import case_name
from volcnn.io.volume import load_volume
from volcnn.io.writer import write_nifti
from volcnn.models.bundle_config import INFERENCE_MODES, check_mode
from volcnn.models.calibration import Calibration
from volcnn.transforms.intensity import check_intensity
from volcnn.transforms.resample import resample_to_grid
from volcnn.transforms.volume_cache import preprocess_loaded, volume_transforms

__all__ = ["HEATMAP_METHODS", "INFERENCE_MODES", "SUMMARY_FIELDS", "InferenceRunner"]

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("case", "score", "n_findings", "max_probability", "status")


class InferenceRunner:
    """Heat map, findings and volume score for each input, with per-case outputs and a batch summary.

    Args:
        network: classifier ``(B, 1, *patch_size)`` -> logits ``(B, K)``; moved to ``device``, put in eval mode.
        patch_size: the network's input size in voxels at ``pixdim``.
        pixdim: voxel size (mm) of the preprocessing, as in training.
        hu_window: HU window of the preprocessing, as in training (``intensity="hu"``).
        intensity: the intensity setting of the preprocessing, as in training
            (:data:`~volcnn.transforms.INTENSITY_MODES`).
        stride_mm: heat-map grid step in mm.
        batch_size: windows per forward pass.
        device: where the network runs (default: CUDA when available).
        threshold: smallest probability reported as a finding (after calibration, when there is one).
        min_distance_mm: non-maximum suppression distance between findings.
        nms: ``"size"`` (default): a finding also suppresses weaker peaks within its blob's radius, and reports its
            estimated ``diameter_mm``; ``"fixed"``: only ``min_distance_mm`` (see :func:`~volcnn.inference.find_peaks`).
        max_findings: findings per case at most.
        score: volume score method, one of ``max``, ``topk_mean``, ``noisy_or``.
        score_k: peaks combined by ``topk_mean`` / ``noisy_or``.
        class_index: the softmax channel mapped (1 = nodule).
        skip_air: do not evaluate air: the window method skips windows centred on air (see
            :func:`~volcnn.inference.classifier_heatmap`), the dense method everything outside the
            :func:`~volcnn.inference.body_mask`. Air is told by its HU, so only ``intensity="hu"`` skips it; other
            settings evaluate the whole volume.
        model_info: ``{"name", "version", "sha256"}`` recorded in every ``findings.json``.
        progress: tqdm progress bar per case.
        method: ``"auto"`` (dense when the network can be split and its dense map agrees with the window reference,
            else window), ``"dense"`` (always; a disagreement is only logged) or ``"window"``.
        dense_check_points: grid points at which a dense map is compared with the window reference (0: no check).
        dense_tolerance: largest probability difference at those points for ``"auto"`` to keep the dense map.
        dense_halo: context per tile of the dense method (see :func:`~volcnn.inference.plan_dense`).
        tile_mb: memory budget of one dense tile.
        resume: skip cases already done with the same input, model and settings.
        calibration: the model's :class:`~volcnn.models.Calibration` (or its dict), applied to the heat map before
            findings are read off; None: probabilities as the network gives them.
        operating_threshold: the probability at or above which a finding is a positive call (recorded in
            ``findings.json`` with the number of such findings; default ``threshold``). Findings below it down to
            ``threshold`` are reported too, for FROC analysis and for readers who want a longer list.
        flips: test-time augmentation: the heat map averaged over the volume mirrored along each axis (4 maps).
        mode: ``"candidate"`` (the heat map, findings and score above; the settings from ``stride_mm`` to
            ``tile_mb`` apply only here) or ``"volume"`` (a model trained on whole volumes: each volume fitted into
            ``patch_size`` as in evaluation and classified once; see :mod:`volcnn.inference.volume_mode`).
        margin: the training chain's ``margin``, for volume mode's preprocessing (it does not change a fitted
            volume).
        features: the clinical features the network takes (their declaration, as packaged from the training run),
            for a clinical or fusion network (``network(image, features=...)``); None for an image network. Each
            case's values come from :attr:`case_features` (``volcnn infer --features CSV``); a case without values
            runs with every feature missing (imputed by the network) and ``findings.json`` says so.
        refine_mm: score the classifier's windows within about this distance of each finding and move it onto
            their response (coarse-to-fine, :mod:`volcnn.inference.refine`); 0: findings stay where the heat map
            puts them.
        scales: voxel-size factors of the heat map: 1 (the training ``pixdim``) and coarser ones, at which the CT is
            resampled and mapped too, for nodules larger than the window (:mod:`volcnn.inference.scales`); the
            scales' peaks are merged, each then refined on its own scale's image, and the heat map written is the
            maps' voxelwise maximum. Findings carry their ``scale`` when there are several.
        snap_mm: move each finding to the strongest blob of the image within this distance
            (:mod:`volcnn.inference.localize`); 0: findings stay where the classifier's response puts them.

    Raises:
        ValueError: unknown ``score``, ``method`` or ``mode``, or ``method="dense"`` for a network that cannot be
            split (candidate mode).
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        patch_size: Sequence[int],
        pixdim: Sequence[float] = (1.0, 1.0, 1.0),
        hu_window: Sequence[float] = (-1000.0, 400.0),
        intensity: str = "hu",
        stride_mm: float = 4.0,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        threshold: float = 0.5,
        min_distance_mm: float = 10.0,
        max_findings: int = 20,
        score: str = "max",
        score_k: int = 5,
        class_index: int = 1,
        skip_air: bool = True,
        model_info: Mapping[str, Any] | None = None,
        progress: bool = True,
        method: str = "auto",
        dense_check_points: int = 32,
        dense_tolerance: float = 0.05,
        dense_halo: int | str = "window",
        tile_mb: float = DEFAULT_TILE_MB,
        resume: bool = True,
        calibration: Calibration | Mapping[str, Any] | None = None,
        operating_threshold: float | None = None,
        nms: str = "size",
        flips: bool = False,
        mode: str = "candidate",
        margin: int = 8,
        refine_mm: float = 0.0,
        features: Any = None,
        scales: Sequence[float] | None = None,
        snap_mm: float = 0.0,
    ) -> None:
        if score not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score!r}; choose one of {', '.join(SCORE_METHODS)}")
        if nms not in NMS_METHODS:
            raise ValueError(f"unknown nms {nms!r}; choose one of {', '.join(NMS_METHODS)}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        #: the declared clinical features (None: an image network) and each case's values (set by ``volcnn infer``)
        self.features = None if features is None else parse_feature_spec(features, "inference features")
        self.case_features: Mapping[str, Mapping[str, Any]] | None = None
        #: cases whose features row is wrong: they fail with this message, the rest of the batch runs
        self.case_feature_errors: dict[str, str] = {}
        if self.features is not None:
            network = CaseFeatures(network, self.features.n_columns)
        self.network = network.to(self.device).eval()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.intensity = check_intensity(intensity)
        self.stride_mm = float(stride_mm)
        self.batch_size = int(batch_size)
        self.threshold = float(threshold)
        self.min_distance_mm = float(min_distance_mm)
        self.max_findings = int(max_findings)
        self.score = score
        self.score_k = int(score_k)
        self.class_index = int(class_index)
        self.skip_air = as_bool(skip_air) and self.intensity == "hu"
        if as_bool(skip_air) and not self.skip_air:
            logger.info("intensity %r: air cannot be told by its HU, the whole volume is evaluated", self.intensity)
        info = dict(model_info or {})
        self.model_info = {"name": info.get("name"), "version": info.get("version"), "sha256": info.get("sha256")}
        self.progress = as_bool(progress)
        self.method = method
        self.dense_check_points = int(dense_check_points)
        self.dense_tolerance = float(dense_tolerance)
        self.dense_halo = dense_halo
        self.tile_mb = float(tile_mb)
        self.resume = as_bool(resume)
        self.calibration = (
            calibration
            if calibration is None or isinstance(calibration, Calibration)
            else Calibration.from_dict(calibration)
        )
        self.operating_threshold = self.threshold if operating_threshold is None else float(operating_threshold)
        self.nms = nms
        self.flips = as_bool(flips)
        self.refine_mm = float(refine_mm)
        self.scales = check_scales(scales)
        self.snap_mm = float(snap_mm)
        if not np.isfinite(self.snap_mm) or self.snap_mm < 0:
            raise ValueError(f"snap_mm must be a finite number >= 0, got {snap_mm!r}")
        #: per scale: the refinement's steps in that scale's voxels
        self._refine_steps = [refinement_steps(self.refine_mm, scaled_pixdim(self.pixdim, s)) for s in self.scales]
        self.mode = check_mode(mode)
        self.margin = int(margin)
        self.explain = 0  # explain the N most probable findings per case (set by ``volcnn infer --explain N``)
        self.explain_method = "gradcam"
        self.explain_layer: str | None = None
        self.heatmap = HeatmapStrategy(
            self.network,
            self.patch_size,
            hu_window=self.hu_window,
            stride_mm=self.stride_mm,
            batch_size=self.batch_size,
            device=self.device,
            class_index=self.class_index,
            skip_air=self.skip_air,
            method=method if self.mode == "candidate" else "window",  # volume mode makes no heat map: no split
            dense_check_points=self.dense_check_points,
            dense_tolerance=self.dense_tolerance,
            dense_halo=dense_halo,
            tile_mb=self.tile_mb,
            progress=self.progress,
            flips=self.flips,
        )
        #: the preprocessing chain of each scale (the first: the training pixdim)
        self._chains = [
            volume_transforms("image", scaled_pixdim(self.pixdim, s), self.hu_window, self.intensity)
            for s in self.scales
        ]
        #: the per-case work of volume mode (None in candidate mode, whose work is :meth:`process` itself)
        self.volume_mode: VolumeModeProcessor | None = None
        if self.mode == "volume":
            self.volume_mode = VolumeModeProcessor(
                self.network,
                patch_size=self.patch_size,
                pixdim=self.pixdim,
                hu_window=self.hu_window,
                intensity=self.intensity,
                margin=self.margin,
                device=self.device,
                class_index=self.class_index,
                model_info=self.model_info,
            )

    @property
    def settings(self) -> dict[str, Any]:
        """Everything besides the input and the model that the outputs depend on (JSON types)."""
        if self.volume_mode is not None:
            return self.volume_mode.settings
        settings = {
            "patch_size": self.patch_size,
            "pixdim": self.pixdim,
            "intensity": self.intensity,
            "hu_window": self.hu_window,
            "stride_mm": self.stride_mm,
            "method": self.method,
            "threshold": self.threshold,
            "min_distance_mm": self.min_distance_mm,
            "max_findings": self.max_findings,
            "score": self.score,
            "score_k": self.score_k,
            "class_index": self.class_index,
            "skip_air": self.skip_air,
            "dense_check_points": self.dense_check_points,
            "dense_tolerance": self.dense_tolerance,
            "dense_halo": self.dense_halo,
            "tile_mb": self.tile_mb,
            "nms": self.nms,
            "operating_threshold": self.operating_threshold,
            "flips": self.flips,
            "refine_mm": self.refine_mm,
            "scales": self.scales,
            "snap_mm": self.snap_mm,
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
        }
        normalised: dict[str, Any] = json.loads(json.dumps(settings))
        return normalised

    def run(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        *,
        shard: Shard | None = None,
    ) -> dict[str, Any]:
        """Process every input; a failing input is recorded and the batch continues.

        Args:
            inputs: the batch.
            out_dir: where case folders, ``summary.csv`` and ``failures.json`` go.
            shard: this process's part of the batch when several processes share it (see
                :func:`~volcnn.inference.sharding.torchrun_shard`): it runs only the inputs of
                :meth:`Shard.indices <volcnn.inference.sharding.Shard.indices>`, then, once every rank has finished,
                rank 0 writes ``summary.csv`` and ``failures.json`` for the whole batch (rows in input order, as one
                process writes them; one process rewrites them after every case instead). Every rank must call
                ``run`` with the same ``inputs``. Case names are decided over the whole list either way
                (:func:`~volcnn.inference.cases.case_names`), so the folders do not depend on the number of processes.

        Returns:
            ``{"processed": [{"input", "case", "score", "n_findings", "max_probability"}, ...],
            "failures": [{"input", "error"}, ...], "skipped": [case, ...]}`` for the whole batch (with ``shard``: on
            every rank, from all ranks); skipped cases (done by an earlier run, see :meth:`process`) are in
            ``processed`` too.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if shard is not None:
            shard.check_same_inputs(inputs)
        cases = case_names(inputs)
        outcomes: list[dict[str, Any]] = []  # one per input run here, in input order
        for i in range(len(inputs)) if shard is None else shard.indices(len(inputs)):
            outcomes.append(self._run_one(i, inputs, cases[i], out))
            if shard is None:
                _write_reports(out, outcomes)
        if shard is not None:
            outcomes = sorted((o for part in shard.gather(outcomes) for o in part), key=lambda o: o["index"])
            if [o["index"] for o in outcomes] != list(range(len(inputs))):  # the split is broken: say so, loudly
                raise RuntimeError(f"the ranks ran inputs {[o['index'] for o in outcomes]} of {len(inputs)}")
            if shard.rank == 0:
                _write_reports(out, outcomes)
        elif not inputs:
            _write_reports(out, outcomes)
        return {
            "processed": [o["processed"] for o in outcomes if o["processed"] is not None],
            "failures": [o["failure"] for o in outcomes if o["failure"] is not None],
            "skipped": [o["row"]["case"] for o in outcomes if o["skipped"]],
        }

    def _run_one(self, i: int, inputs: Sequence[str | os.PathLike[str]], case: str, out: Path) -> dict[str, Any]:
        """Input ``i``: skipped when done before, else :meth:`process`; an error is logged and recorded.

        Returns:
            ``{"index": i, "row": summary.csv row, "processed": run's entry or None, "failure": {"input", "error"}
            or None, "skipped": bool}`` (picklable: ranks exchange them).
        """
        path, n, total = inputs[i], i + 1, len(inputs)
        outcome: dict[str, Any] = {"index": i, "processed": None, "failure": None, "skipped": False}
        if case != case_name(path):
            logger.warning("case name %s is taken by an earlier input; writing this one as %s", case_name(path), case)
        start = time.perf_counter()
        try:
            digest = input_sha256(path) if Path(path).exists() else None
            done = self._finished(out / case, digest) if self.resume and digest else None
            if done is not None:
                logger.info("[%d/%d] %s: skipped (done)", n, total, case)
                row = {**{k: done[k] for k in SUMMARY_FIELDS[1:4]}, "case": case, "status": "ok"}
                return {**outcome, "row": row, "processed": {"input": str(path), **done}, "skipped": True}
            result = self.process(path, out / case, case, digest=digest)
        except Exception as e:  # one bad input must not stop the batch
            message = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
            logger.error("[%d/%d] %s failed: %s", n, total, case, message)
            logger.debug("traceback", exc_info=True)
            for stale in ("heatmap.nii.gz", "findings.json"):  # never leave an earlier run's outputs behind
                (out / case / stale).unlink(missing_ok=True)
            return {
                **outcome,
                "row": {"case": case, "status": "failed"},
                "failure": {"input": str(path), "error": message},
            }
        logger.info(
            "[%d/%d] %s: score %.4f, %d findings (%.1f s)",
            *(n, total, case, result["score"], result["n_findings"], time.perf_counter() - start),
        )
        row = {**{k: result[k] for k in SUMMARY_FIELDS[1:4]}, "case": case, "status": "ok"}
        return {**outcome, "row": row, "processed": {"input": str(path), **result}}

    def process(
        self, path: str | os.PathLike[str], case_dir: str | os.PathLike[str], case: str, digest: str | None = None
    ) -> dict[str, Any]:
        """Run one input and write ``case_dir/heatmap.nii.gz``, then ``case_dir/findings.json``.

        A finding's ``center_voxel`` is the input voxel nearest its ``center_ras_mm`` (clipped to the image). In
        volume mode the case goes to :meth:`VolumeModeProcessor.process` instead (``findings.json`` only, and the
        volume's explanation when :attr:`explain` is set).

        Args:
            path: the input.
            case_dir: its output folder.
            case: its case name.
            digest: :func:`input_sha256` of ``path`` when already known.

        Returns:
            ``{"case", "score", "n_findings", "max_probability"}``.
        """
        extra = self._bind_features(case)
        if self.volume_mode is not None:  # a model trained on whole volumes: one prediction per volume
            return self.volume_mode.process(
                path, Path(case_dir), case, digest, explain=self.explain > 0,
                explain_method=self.explain_method, explain_layer=self.explain_layer, extra=extra,
                attribute=self._volume_attribution(),
            )  # fmt: skip
        vol = load_volume(path, expect_hu=self.intensity == "hu")
        digest = digest or input_sha256(path)
        shape, affine = tuple(vol.array.shape), vol.affine.copy()
        handed = [vol]
        del vol  # preprocess_loaded drops the last reference once the last chain's loader has the volume
        last = len(self._chains) - 1
        images = [preprocess_loaded(chain, handed if i == last else handed[0]) for i, chain in enumerate(self._chains)]
        raw_heat, heat_affine, how, findings = self._scales_findings(images, case)
        heat = raw_heat if self.calibration is None else self.calibration.apply(raw_heat)
        del raw_heat
        for f in findings:
            voxel = np.rint(world_to_voxel(affine, f["center_ras_mm"])).astype(int)
            f["center_voxel"] = np.clip(voxel, 0, np.asarray(shape) - 1).tolist()
        explanations = self._explain(path, images, findings, Path(case_dir), (shape, affine))
        self._attribute_features(images, findings, explanations)
        del images
        score = volume_score(
            heat, self.score, self.score_k, heat_affine=heat_affine, min_distance_mm=self.min_distance_mm
        )
        case_dir = Path(case_dir)
        write_nifti(case_dir / "heatmap.nii.gz", resample_to_grid(heat, heat_affine, shape, affine), affine)
        max_probability = round(float(heat.max()) if heat.size else 0.0, 4)
        doc = {
            "case": case,
            "score": round(score, 4),
            "score_method": self.score,
            "max_probability": max_probability,
            "findings": findings,
            "model": self.model_info,
            "input_sha256": digest,
            "stride_mm": self.stride_mm,
            "threshold": self.threshold,
            "operating_threshold": self.operating_threshold,
            "n_at_operating_threshold": sum(f["probability"] >= self.operating_threshold for f in findings),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "heatmap": how,
            "settings": self.settings,
        }
        if explanations:
            doc["explanations"] = explanations
        doc.update(extra)
        atomic_write_json(case_dir / "findings.json", doc)
        return {"case": case, "score": doc["score"], "n_findings": len(findings), "max_probability": max_probability}

    def _scales_findings(
        self, images: Sequence[torch.Tensor], case: str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], list[dict[str, Any]]]:
        """The uncalibrated heat map of every scale's image (``images``, in :attr:`scales` order) and the findings;
        returns ``(raw_heat, heat_affine, how, findings)``: the maps' voxelwise maximum on the first scale's grid, that
        grid, how each map was made, and the findings (:meth:`_findings`).

        The scales' peaks are merged (:func:`merge_findings`) before they are refined, each on its own scale's
        image: one place is refined once, at the scale that saw it best (refining every scale's peaks and merging
        after took twice the time: 8.6 of 13.6 s on one demo CT). The findings then move onto the image's blobs
        (:func:`snap_findings` on the first scale's image, with :attr:`snap_mm`)."""
        maps, groups, hows = [], [], []
        for scale, image in zip(self.scales, images, strict=True):
            heat, heat_affine, how = self.heatmap(image, case)
            group = self._peaks(heat, heat_affine)
            if len(self.scales) > 1:
                for f in group:
                    f["scale"] = scale
            maps.append((heat, heat_affine))
            groups.append(group)
            hows.append(how)
        if len(maps) == 1:
            raw_heat, peaks, how = maps[0][0], groups[0], hows[0]
        else:
            raw_heat = fuse_heatmaps(maps)
            peaks = merge_findings(groups, self.min_distance_mm, self.max_findings)
            how = {**hows[0], "scales": [{"scale": s, **h} for s, h in zip(self.scales, hows, strict=True)]}
        findings = self._findings(peaks, images)
        findings = snap_findings(images[0], findings, self.snap_mm, min_distance_mm=self.min_distance_mm)
        return raw_heat, maps[0][1], how, findings

    @property
    def _refining(self) -> bool:
        """Whether findings are refined: ``refine_mm`` gives a step of at least one voxel at some scale."""
        return any(len(steps) for steps in self._refine_steps)

    def _uncalibrated(self, q: float) -> float:
        """The network's probability that calibrates to ``q`` (``q`` itself without a calibration)."""
        return q if self.calibration is None else self.calibration.invert(q)

    def _peaks(self, raw_heat: np.ndarray, heat_affine: np.ndarray) -> list[dict[str, Any]]:
        """Peaks of the uncalibrated map (the calibration is monotonic: the same peaks, positions and blobs) at or
        above the threshold's uncalibrated value; with ``refine_mm``, at or above half of it (a grid point 2 mm from
        a small nodule's centre measured half the probability of its centre window), since refining may lift them
        over it. At most ``max_findings``, most probable first."""
        search = 0.5 * self.threshold if self._refining else self.threshold
        return find_peaks(
            raw_heat, heat_affine, self._uncalibrated(search), self.min_distance_mm, self.max_findings,
            size_aware=self.nms == "size",
        )  # fmt: skip

    def _findings(self, peaks: list[dict[str, Any]], images: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        """The findings of ``peaks`` (:meth:`_peaks`, each with its ``scale`` when there are several): with
        ``refine_mm``, each moved onto the classifier's response on its scale's image
        (:func:`~volcnn.inference.refine.refine_findings`) and the threshold applied to the refined probabilities;
        then each with its calibrated ``probability`` and, when calibrated, ``probability_uncalibrated``. (With the
        earlier best-window refinement, twice as many peaks gave the same findings scores on 30 CTs in 1.3x the
        time.)"""
        findings = peaks
        if self._refining:
            network = FlipMean(self.network) if self.flips else self.network
            refined: list[dict[str, Any]] = []
            for scale, steps, image in zip(self.scales, self._refine_steps, images, strict=True):
                group = [f for f in peaks if float(f.get("scale", 1.0)) == scale]
                refined += refine_findings(
                    image, network, group, self.patch_size, steps, min_distance_mm=self.min_distance_mm,
                    batch_size=self.batch_size, device=self.device, class_index=self.class_index,
                )  # fmt: skip
            if len(self.scales) > 1:  # refined findings of two scales may now meet
                refined = merge_findings([refined], self.min_distance_mm, self.max_findings)
            cut = self._uncalibrated(self.threshold)
            findings = [f for f in refined if f["probability"] >= cut]
        if self.calibration is not None:
            for f in findings:
                raw = f["probability"]
                f["probability"] = round(float(self.calibration.apply(np.float64(raw))), 4)
                f["probability_uncalibrated"] = raw
        return findings

    def _explain(
        self,
        path: str | os.PathLike[str],
        images: Sequence[torch.Tensor],
        findings: list[dict[str, Any]],
        case_dir: Path,
        grid: tuple[tuple[int, ...], np.ndarray],
    ) -> list[dict[str, Any]]:
        """Grad-CAM / occlusion maps of the ``self.explain`` most probable findings (none when 0): NIfTI on the
        input grid and PNG overlays in ``case_dir`` (see :func:`volcnn.explain.explain_findings`); a finding of a
        coarser scale is explained on that scale's image (``images``, in :attr:`scales` order)."""
        if self.explain <= 0 or not findings:
            return []
        return explain_findings(
            path, self.network, self, findings, case_dir, top=self.explain, method=self.explain_method,
            target_layer=self.explain_layer, preprocessed=images[0], input_grid=grid,  # type: ignore[arg-type]
            scale_images=dict(zip(self.scales[1:], images[1:], strict=True)),  # type: ignore[arg-type]
        )  # fmt: skip

    def _attribute_features(
        self, images: Sequence[torch.Tensor], findings: list[dict[str, Any]], explanations: list[dict[str, Any]]
    ) -> None:
        """With ``explain`` and a network taking features: each explained finding gets ``feature_attributions``,
        ``{name: p - p(name missing)}`` on the window centred at it (:func:`finding_feature_attributions`; on the
        image of the finding's scale, ``images`` in :attr:`scales` order), on the same scale as its ``probability``
        (calibrated when the model is; with ``flips``, the mean over the window mirrored along each axis)."""
        if self.features is None or not explanations:
            return
        assert isinstance(self.network, CaseFeatures) and self.network.features is not None
        chosen = [findings[e["rank"] - 1] for e in explanations]
        for scale, image in zip(self.scales, images, strict=True):
            group = [f for f in chosen if float(f.get("scale", 1.0)) == scale]
            if not group:
                continue
            attributions = finding_feature_attributions(
                self.network.network, image, [f["center_ras_mm"] for f in group], self.patch_size,
                self.network.features[0].cpu().numpy(), self.features, class_index=self.class_index,
                device=self.device, flips=self.flips,
                calibration=None if self.calibration is None else self.calibration.apply,
            )  # fmt: skip
            for finding, attribution in zip(group, attributions, strict=True):
                finding["feature_attributions"] = attribution

    def _volume_attribution(self) -> Callable[[torch.Tensor], dict[str, float]] | None:
        """Volume mode's ``attribute(patch) -> {name: attribution}`` of the fitted volume (the score is the
        network's uncalibrated probability, and so are these), or None (no ``explain``, or an image network)."""
        if self.features is None or self.explain <= 0:
            return None
        assert isinstance(self.network, CaseFeatures) and self.network.features is not None
        inner, raw, spec = self.network.network, self.network.features[0].cpu().numpy(), self.features
        return lambda patch: patch_feature_attributions(
            inner, patch, raw, spec, class_index=self.class_index, device=self.device
        )

    def _features_extra(self, case: str) -> dict[str, Any]:
        """``{"features": record}`` for ``findings.json`` (see :func:`features_record`), or ``{}`` (image network)."""
        if self.features is None:
            return {}
        values = None if self.case_features is None else self.case_features.get(case)
        return {"features": features_record(self.features, values, self.case_features is not None)}

    def _bind_features(self, case: str) -> dict[str, Any]:
        """Give the network this case's features; returns what ``findings.json`` records of them."""
        if self.features is None:
            return {}
        assert isinstance(self.network, CaseFeatures)
        if case in self.case_feature_errors:
            raise FeatureError(self.case_feature_errors[case])
        values = None if self.case_features is None else self.case_features.get(case)
        self.network.set_features(self.features.encode(values, f"features of case {case}"))
        return self._features_extra(case)

    def _finished(self, case_dir: Path, digest: str) -> dict[str, Any] | None:
        """The result of an earlier run of this case with the same input, model, settings and features, or None."""
        if self.features is not None:
            try:
                doc = json.loads((case_dir / "findings.json").read_text())
            except (OSError, ValueError):
                return None
            if not isinstance(doc, dict) or doc.get("features") != self._features_extra(case_dir.name)["features"]:
                return None
        if self.volume_mode is not None:
            return self.volume_mode.finished(case_dir, digest, self.explain_method if self.explain > 0 else None)
        findings, heatmap = case_dir / "findings.json", case_dir / "heatmap.nii.gz"
        if not (findings.is_file() and heatmap.is_file()) or self.model_info.get("sha256") is None:
            return None
        try:
            doc = json.loads(findings.read_text())
            same = (
                doc.get("input_sha256") == digest
                and (doc.get("model") or {}).get("sha256") == self.model_info["sha256"]
                and doc.get("settings") == self.settings
            )
            if not same:
                return None
            return {
                "case": str(doc["case"]),
                "score": float(doc["score"]),
                "n_findings": len(doc["findings"]),
                "max_probability": float(doc["max_probability"]),
            }
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _write_reports(out: Path, outcomes: list[dict[str, Any]]) -> None:
    """``summary.csv`` and ``failures.json`` of the inputs in ``outcomes`` (see :meth:`InferenceRunner._run_one`),
    in their order, each file replaced atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(o["row"] for o in outcomes)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    atomic_write_json(out / "failures.json", [o["failure"] for o in outcomes if o["failure"] is not None])
