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

Heat maps are computed densely (:func:`~volcnn.inference.dense_heatmap`: the trunk once per tile, only inside the
body) when the network can be split into trunk and pooling head, else window by window. The dense map of a network
that relies on its patches' zero padding differs from what the network says about each window, so every dense map
is checked against the window reference at a few points, and ``method="auto"`` falls back to the window method
when they differ by more than ``dense_tolerance``.
Outputs carry only the file or folder name of an input, never header fields (no patient identifiers).
:func:`load_bundle_runner` builds the runner from a bundle's ``configs/inference.json`` and :func:`infer_main`
is the ``volcnn infer`` command's body.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImaged
from torch import nn

from volcnn.engines.options import as_bool
from volcnn.inference.body_mask import body_mask
from volcnn.inference.dense import (
    DEFAULT_TILE_MB,
    SplitClassifier,
    dense_heatmap,
    dense_window_difference,
    split_classifier,
)
from volcnn.inference.findings import SCORE_METHODS, find_peaks, volume_score
from volcnn.inference.heatmap import classifier_heatmap, heatmap_grid, resample_to_grid, select_windows
from volcnn.io import VolcnnReader, Volume, atomic_write_json, atomic_write_text, load_volume, write_nifti
from volcnn.transforms import volume_transforms, world_to_voxel
from volcnn.transforms.geometry import as_affine

__all__ = [
    "HEATMAP_METHODS",
    "InferenceRunner",
    "case_name",
    "file_sha256",
    "infer_main",
    "input_sha256",
    "load_bundle_runner",
    "load_checkpoint",
    "model_info",
]

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("case", "score", "n_findings", "max_probability", "status")
HEATMAP_METHODS = ("auto", "dense", "window")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")


def case_name(path: str | os.PathLike[str]) -> str:
    """The case name of an input: its file name without ``.nii`` / ``.nii.gz`` / ``.mhd`` / ``.mha``, or its folder
    name.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_`` so the name is a safe folder name.
    """
    name = Path(os.path.abspath(path)).name
    for suffix in _VOLUME_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return name or "case"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    return _hash_files(hashlib.sha256(), [Path(path)]).hexdigest()


def input_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of an input: a file's bytes (a ``.mhd`` header then its data file), or for a folder the bytes of
    its files in sorted name order."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p, *_metaimage_data_file(p)]
    return _hash_files(hashlib.sha256(), files).hexdigest()


def _metaimage_data_file(header: Path) -> list[Path]:
    """The detached data file a ``.mhd`` header names (``ElementDataFile = scan.raw``), if it exists."""
    if header.suffix.lower() != ".mhd":
        return []
    for line in header.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() not in ("", "LOCAL"):
            data = header.parent / value.strip()
            return [data] if data.is_file() else []
    return []


def _hash_files(h: Any, files: Sequence[Path]) -> Any:
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h


def model_info(ckpt_path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "version", "sha256"}`` of a model: name and version from bundle metadata, sha256 of the file."""
    meta = meta or {}
    return {"name": meta.get("name"), "version": meta.get("version"), "sha256": file_sha256(ckpt_path)}


def load_checkpoint(network: nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Load a state dict (plain, or under ``network`` / ``model`` / ``net``) with ``weights_only=True``; eval mode.

    Raises:
        FileNotFoundError: naming ``path`` when it is missing.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model weights not found (expected the trained network's state dict)")
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, Mapping):
        for key in ("network", "model", "net"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    network.load_state_dict(state)
    return network.eval()


class _PreloadedReader(VolcnnReader):
    """A :class:`VolcnnReader` that hands out an already loaded volume instead of reading the file again."""

    def __init__(self, volume: Volume) -> None:
        super().__init__()
        self.volume = volume

    def read(self, data: Sequence[str | os.PathLike[Any]] | str | os.PathLike[Any], **kwargs: Any) -> Volume:
        return self.volume


class InferenceRunner:
    """Heat map, findings and volume score for each input, with per-case outputs and a batch summary.

    Args:
        network: classifier ``(B, 1, *patch_size)`` -> logits ``(B, K)``; moved to ``device``, put in eval mode.
        patch_size: the network's input size in voxels at ``pixdim``.
        pixdim: voxel size (mm) of the preprocessing, as in training.
        hu_window: HU window of the preprocessing, as in training.
        stride_mm: heat-map grid step in mm.
        batch_size: windows per forward pass.
        device: where the network runs (default: CUDA when available).
        threshold: smallest probability reported as a finding.
        min_distance_mm: non-maximum suppression distance between findings.
        max_findings: findings per case at most.
        score: volume score method, one of ``max``, ``topk_mean``, ``noisy_or``.
        score_k: peaks combined by ``topk_mean`` / ``noisy_or``.
        class_index: the softmax channel mapped (1 = nodule).
        skip_air: do not evaluate air: the window method skips windows centred on air (see
            :func:`~volcnn.inference.classifier_heatmap`), the dense method everything outside the
            :func:`~volcnn.inference.body_mask`.
        model_info: ``{"name", "version", "sha256"}`` recorded in every ``findings.json``.
        progress: tqdm progress bar per case.
        method: ``"auto"`` (dense when the network can be split and its dense map agrees with the window reference,
            else window), ``"dense"`` (always; a disagreement is only logged) or ``"window"``.
        dense_check_points: grid points at which a dense map is compared with the window reference (0: no check).
        dense_tolerance: largest probability difference at those points for ``"auto"`` to keep the dense map.
        dense_halo: context per tile of the dense method (see :func:`~volcnn.inference.plan_dense`).
        tile_mb: memory budget of one dense tile.
        resume: skip cases already done with the same input, model and settings.

    Raises:
        ValueError: unknown ``score`` or ``method``, or ``method="dense"`` for a network that cannot be split.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        patch_size: Sequence[int],
        pixdim: Sequence[float] = (1.0, 1.0, 1.0),
        hu_window: Sequence[float] = (-1000.0, 400.0),
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
    ) -> None:
        if score not in SCORE_METHODS:
            raise ValueError(f"unknown score method {score!r}; choose one of {', '.join(SCORE_METHODS)}")
        if method not in HEATMAP_METHODS:
            raise ValueError(f"unknown heat-map method {method!r}; choose one of {', '.join(HEATMAP_METHODS)}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.network = network.to(self.device).eval()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.stride_mm = float(stride_mm)
        self.batch_size = int(batch_size)
        self.threshold = float(threshold)
        self.min_distance_mm = float(min_distance_mm)
        self.max_findings = int(max_findings)
        self.score = score
        self.score_k = int(score_k)
        self.class_index = int(class_index)
        self.skip_air = as_bool(skip_air)
        info = dict(model_info or {})
        self.model_info = {"name": info.get("name"), "version": info.get("version"), "sha256": info.get("sha256")}
        self.progress = as_bool(progress)
        self.method = method
        self.dense_check_points = int(dense_check_points)
        self.dense_tolerance = float(dense_tolerance)
        self.dense_halo = dense_halo
        self.tile_mb = float(tile_mb)
        self.resume = as_bool(resume)
        self.explain = 0  # explain the N most probable findings per case (set by ``volcnn infer --explain N``)
        self.explain_method = "gradcam"
        self.explain_layer: str | None = None
        self._split: SplitClassifier | None = None
        if method != "window":
            try:
                self._split = split_classifier(self.network)
            except ValueError as e:
                if method == "dense":
                    raise ValueError(f"method 'dense': {e}") from e
                logger.info("heat maps window by window: %s", e)
        if self._split is not None:
            logger.info(
                "heat maps dense: the %s trunk once per tile (stride %s) %s, checked against windows at %d points%s",
                type(self.network).__name__,
                self._split.total_stride,
                "inside the body mask" if self.skip_air else "over the whole volume",
                self.dense_check_points,
                " (window method where they differ)" if method == "auto" else "",
            )
        self._chain = volume_transforms("image", self.pixdim, self.hu_window)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything besides the input and the model that the outputs depend on (JSON types)."""
        settings = {
            "patch_size": self.patch_size,
            "pixdim": self.pixdim,
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
        }
        normalised: dict[str, Any] = json.loads(json.dumps(settings))
        return normalised

    def run(self, inputs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
        """Process every input; a failing input is recorded and the batch continues.

        Returns:
            ``{"processed": [{"input", "case", "score", "n_findings", "max_probability"}, ...],
            "failures": [{"input", "error"}, ...], "skipped": [case, ...]}``; skipped cases (done by an earlier
            run, see :meth:`process`) are in ``processed`` too.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        processed: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        skipped: list[str] = []
        rows: list[dict[str, Any]] = []
        used: set[str] = set()
        for n, path in enumerate(inputs, 1):
            case = _unique(case_name(path), used)
            start = time.perf_counter()
            try:
                digest = input_sha256(path) if Path(path).exists() else None
                done = self._finished(out / case, digest) if self.resume and digest else None
                if done is not None:
                    logger.info("[%d/%d] %s: skipped (done)", n, len(inputs), case)
                    skipped.append(case)
                    processed.append({"input": str(path), **done})
                    rows.append({**{k: done[k] for k in SUMMARY_FIELDS[1:4]}, "case": case, "status": "ok"})
                    _write_reports(out, rows, failures)
                    continue
                result = self.process(path, out / case, case, digest=digest)
            except Exception as e:  # one bad input must not stop the batch
                message = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
                logger.error("[%d/%d] %s failed: %s", n, len(inputs), case, message)
                logger.debug("traceback", exc_info=True)
                failures.append({"input": str(path), "error": message})
                rows.append({"case": case, "status": "failed"})
                for stale in ("heatmap.nii.gz", "findings.json"):  # never leave an earlier run's outputs behind
                    (out / case / stale).unlink(missing_ok=True)
            else:
                logger.info(
                    "[%d/%d] %s: score %.4f, %d findings (%.1f s)",
                    *(n, len(inputs), case, result["score"], result["n_findings"], time.perf_counter() - start),
                )
                processed.append({"input": str(path), **result})
                rows.append({**{k: result[k] for k in SUMMARY_FIELDS[1:4]}, "case": case, "status": "ok"})
            _write_reports(out, rows, failures)
        if not inputs:
            _write_reports(out, rows, failures)
        return {"processed": processed, "failures": failures, "skipped": skipped}

    def process(
        self, path: str | os.PathLike[str], case_dir: str | os.PathLike[str], case: str, digest: str | None = None
    ) -> dict[str, Any]:
        """Run one input and write ``case_dir/heatmap.nii.gz``, then ``case_dir/findings.json``.

        A finding's ``center_voxel`` is the input voxel nearest its ``center_ras_mm`` (clipped to the image).

        Args:
            path: the input.
            case_dir: its output folder.
            case: its case name.
            digest: :func:`input_sha256` of ``path`` when already known.

        Returns:
            ``{"case", "score", "n_findings", "max_probability"}``.
        """
        vol = load_volume(path)
        digest = digest or input_sha256(path)
        shape, affine = tuple(vol.array.shape), vol.affine.copy()
        handed = [vol]
        del vol  # _preprocess drops the last reference once the chain's loader has the volume
        image = self._preprocess(str(path), handed)
        heat, heat_affine, how = self._heatmap(image, case)
        findings = find_peaks(heat, heat_affine, self.threshold, self.min_distance_mm, self.max_findings)
        for f in findings:
            voxel = np.rint(world_to_voxel(affine, f["center_ras_mm"])).astype(int)
            f["center_voxel"] = np.clip(voxel, 0, np.asarray(shape) - 1).tolist()
        explanations = self._explain(path, image, findings, Path(case_dir), (shape, affine))
        del image
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
            "heatmap": how,
            "settings": self.settings,
        }
        if explanations:
            doc["explanations"] = explanations
        atomic_write_json(case_dir / "findings.json", doc)
        return {"case": case, "score": doc["score"], "n_findings": len(findings), "max_probability": max_probability}

    def _explain(
        self,
        path: str | os.PathLike[str],
        image: torch.Tensor,
        findings: list[dict[str, Any]],
        case_dir: Path,
        grid: tuple[tuple[int, ...], np.ndarray],
    ) -> list[dict[str, Any]]:
        """Grad-CAM / occlusion maps of the ``self.explain`` most probable findings (none when 0): NIfTI on the
        input grid and PNG overlays in ``case_dir`` (see :func:`volcnn.explain.explain_findings`)."""
        if self.explain <= 0 or not findings:
            return []
        from volcnn.explain import explain_findings

        return explain_findings(
            path, self.network, self, findings, case_dir, top=self.explain, method=self.explain_method,
            target_layer=self.explain_layer, preprocessed=image, input_grid=grid,  # type: ignore[arg-type]
        )  # fmt: skip

    def _heatmap(self, image: torch.Tensor, case: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Heat map of a preprocessed ``(1, X, Y, Z)`` image: ``(heat, heat_affine, how)``, ``how`` for findings.json:
        ``{"method", "grid_step_vox"}`` and for a dense map ``"check": {"points", "max_abs_diff", "tolerance"}``."""
        if self._split is None:
            heat, heat_affine = self._window_heatmap(image)
            return heat, heat_affine, {"method": "window", "grid_step_vox": _grid_step(image, heat_affine)}
        start = time.perf_counter()
        mask = body_mask(image, hu_window=self.hu_window) if self.skip_air else None
        t_mask = time.perf_counter() - start
        heat, heat_affine = dense_heatmap(
            image,
            self.network,
            self.patch_size,
            stride_mm=self.stride_mm,
            device=self.device,
            class_index=self.class_index,
            mask=mask,
            halo=self.dense_halo,
            tile_mb=self.tile_mb,
            split=self._split,
            progress=self.progress,
        )
        how: dict[str, Any] = {"method": "dense", "grid_step_vox": _grid_step(image, heat_affine)}
        t_dense = time.perf_counter() - start - t_mask
        logger.debug("%s: body mask %.2f s, dense heat map %.2f s", case, t_mask, t_dense)
        if self.dense_check_points > 0:
            start = time.perf_counter()
            evaluated = None
            if mask is not None:
                centres = heatmap_grid(image.shape[1:], how["grid_step_vox"])[1]
                evaluated = select_windows(image, centres, skip_air=False, mask=mask).reshape(heat.shape)
            diff, n = dense_window_difference(
                image,
                self.network,
                heat,
                heat_affine,
                self.patch_size,
                evaluated=evaluated,
                n_points=self.dense_check_points,
                batch_size=self.batch_size,
                device=self.device,
                class_index=self.class_index,
            )
            how["check"] = {"points": n, "max_abs_diff": round(diff, 4), "tolerance": self.dense_tolerance}
            logger.debug("%s: dense check %.2f s, largest difference %.4f", case, time.perf_counter() - start, diff)
            if diff > self.dense_tolerance:
                fallback = self.method == "auto"
                logger.warning(
                    "%s: the dense heat map differs from window-by-window evaluation by up to %.3f (tolerance %.3f) "
                    "at %d points: the network depends on its patches' zero padding; %s",
                    *(case, diff, self.dense_tolerance, n),
                    "using the window method (method 'window' skips the dense attempt)"
                    if fallback
                    else "keeping the dense map (method 'dense')",
                )
                if fallback:
                    heat, heat_affine = self._window_heatmap(image)
                    how = {"method": "window", "dense_check": how["check"]}
                    # the disagreement comes from the network's padding, not from this CT: later cases go straight
                    # to windows instead of paying for a dense map and its check again
                    self._split = None
                    logger.warning("the remaining cases of this run use the window method")
        if how["method"] == "window":
            how["grid_step_vox"] = _grid_step(image, heat_affine)
        return heat, heat_affine, how

    def _window_heatmap(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return classifier_heatmap(
            image,
            self.network,
            self.patch_size,
            batch_size=self.batch_size,
            device=self.device,
            class_index=self.class_index,
            progress=self.progress,
            stride_mm=self.stride_mm,
            skip_air=self.skip_air,
        )

    def _finished(self, case_dir: Path, digest: str) -> dict[str, Any] | None:
        """The result of an earlier run of this case with the same input, model and settings, or None."""
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

    def _preprocess(self, path: str, vol: Volume | list[Volume]) -> torch.Tensor:
        """The training chain (:func:`~volcnn.transforms.volume_transforms`) on an already loaded volume.

        ``vol`` may be handed over in a one-item list, which is emptied once the chain's loader has taken the
        volume, so that the caller's reference does not keep it alive while the volume is resampled.

        Returns:
            MetaTensor ``(1, X, Y, Z)`` in RAS at ``pixdim``, windowed to [0, 1], with its affine.
        """
        volume = vol.pop() if isinstance(vol, list) else vol
        load = self._chain.transforms[0]
        if isinstance(load, LoadImaged):  # same LoadImaged, fed the volume in memory: the file is read once
            data = load({"image": path}, reader=_PreloadedReader(volume))
            del volume
            return self._chain(data, start=1)["image"]
        return self._chain({"image": path})["image"]


def _grid_step(image: torch.Tensor, heat_affine: np.ndarray) -> list[int]:
    """Voxels between heat-map grid points per axis: ``heat_affine = image.affine @ diag(step, 1)``."""
    affine = as_affine(image.affine) if hasattr(image, "affine") else np.eye(4)
    return [int(v) for v in np.rint(np.linalg.solve(affine, as_affine(heat_affine)).diagonal()[:3])]


def _unique(name: str, used: set[str]) -> str:
    out, i = name, 1
    while out in used:
        i += 1
        out = f"{name}-{i}"
    if out != name:
        logger.warning("case name %s is taken by an earlier input; writing this one as %s", name, out)
    used.add(out)
    return out


def _write_reports(out: Path, rows: list[dict[str, Any]], failures: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    atomic_write_json(out / "failures.json", failures)


def load_bundle_runner(bundle_dir: str | os.PathLike[str], **overrides: Any) -> InferenceRunner:
    """Build the :class:`InferenceRunner` of a bundle from ``configs/inference.json`` and ``models/model.pt``.

    Args:
        bundle_dir: the bundle root.
        overrides: config ids to replace, e.g. ``device="cpu"``, ``stride_mm=8.0``, ``network_def="resnet18"``,
            ``heatmap_method="window"``. ``heatmap_method`` (``auto``, ``dense``, ``window``; from the config when it
            has the key) becomes the runner's ``method`` even when the config's ``runner`` does not name it.

    Raises:
        FileNotFoundError: naming the missing config or checkpoint.
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    config, meta = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: bundle inference config not found")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta) if meta.is_file() else {})
    parser["bundle_root"] = str(root)
    parser.update(dict(overrides))
    if "heatmap_method" in parser and "method" not in parser["runner"]:  # a config that predates the key
        parser["runner#method"] = "@heatmap_method"
    ckpt = Path(str(parser.get_parsed_content("ckpt_path")))
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: model weights not found; train the bundle or copy its state dict there")
    runner = parser.get_parsed_content("runner")
    if not isinstance(runner, InferenceRunner):
        raise TypeError(f"{config}: 'runner' must build a volcnn.inference.InferenceRunner, got {type(runner)}")
    return runner


def infer_main(
    bundle: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    model: str | os.PathLike[str] | None = None,
    explain: int = 0,
    explain_method: str = "gradcam",
    explain_layer: str | None = None,
    **overrides: Any,
) -> int:
    """The body of ``volcnn infer (--bundle DIR | --model FILE) --out DIR INPUT...``.

    Args:
        bundle: a bundle folder (``configs/inference.json`` + ``models/model.pt``).
        model: an exported model (``.ts`` or ``.onnx`` from ``volcnn export``) run alone, without a bundle; its
            preprocessing settings are embedded. Heat maps then use the window method (an exported graph cannot
            be split into trunk and head).
        explain: explain the N most probable findings per case (Grad-CAM by default; bundle models only).
        overrides: bundle config ids (``device``, ``stride_mm``...); with ``model``: ``InferenceRunner`` arguments.

    Returns:
        The exit code: 0 all inputs processed; 1 some failed (listed in ``OUT/failures.json``, the rest were
        processed); 2 bad usage (no inputs, bundle folder, config or model missing, unusable bundle or output).
    """
    if not inputs:
        logger.error("no inputs given: pass NIfTI files or DICOM series folders")
        return 2
    if (bundle is None) == (model is None):
        logger.error("give exactly one of --bundle and --model")
        return 2
    if bundle is not None and not Path(bundle).is_dir():
        logger.error("%s: bundle folder not found", bundle)
        return 2
    try:
        if model is not None:  # noqa: SIM108
            runner = _exported_runner(model, **overrides)
        else:
            runner = load_bundle_runner(bundle, **overrides)  # type: ignore[arg-type]
    except FileNotFoundError as e:
        logger.error("%s", e)
        return 2
    except Exception as e:
        logger.error("%s: cannot build the inference runner (%s: %s)", bundle or model, type(e).__name__, e)
        return 2
    if explain:
        from volcnn.explain import EXPLAIN_METHODS

        if model is not None:
            logger.error("--explain needs the bundle's network (--bundle), not an exported model")
            return 2
        if explain_method not in EXPLAIN_METHODS:
            logger.error("unknown explanation method %r; choose one of %s", explain_method, ", ".join(EXPLAIN_METHODS))
            return 2
        runner.explain, runner.explain_method, runner.explain_layer = int(explain), explain_method, explain_layer
    try:
        result = runner.run(list(inputs), out_dir)
    except OSError as e:
        logger.error("%s: cannot write outputs (%s)", out_dir, e)
        return 2
    n_bad = len(result["failures"])
    if n_bad:
        logger.warning("%d of %d inputs failed; see %s", n_bad, len(inputs), Path(out_dir) / "failures.json")
        return 1
    return 0


def _exported_runner(model: str | os.PathLike[str], **overrides: Any) -> InferenceRunner:
    """An :class:`InferenceRunner` around an exported ``.ts`` / ``.onnx`` model and its embedded settings."""
    from volcnn.inference.exported import load_exported

    device = overrides.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if overrides.pop("heatmap_method", "window") == "dense":
        raise ValueError("an exported model runs window by window only (its graph cannot be split into trunk and head)")
    network, settings = load_exported(model, device=device)
    return InferenceRunner(network, **{**settings, "device": device, "method": "window", **overrides})
