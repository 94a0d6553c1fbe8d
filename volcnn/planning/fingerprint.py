"""A dataset fingerprint for ``volcnn plan``: geometry, intensities, modality verdict, mode, object sizes and class
counts of a datalist's images, read through the project's reader.

The fingerprint is bounded: at most ``max_volumes`` images are read (spread evenly over the sorted image list, so
the same datalist gives the same sample), and of each at most ``voxels_per_volume`` voxels enter the intensity
statistics (a fixed stride over the volume, plus every voxel of the cubes around the volume's candidate centres, in
candidate mode, up to the same bound). An image that cannot be read is listed with its reason and the others are
used; a dataset none of whose images can be read is refused.

Modality verdict per image (:func:`intensity_verdict`), from its sampled voxels:

* ``mask``: integer values, at most :data:`MASK_MAX_VALUES` of them, none negative (binary or label masks);
* ``ct_hu``: 0.5th percentile at or below -700 (air or lung in HU) and 99.5th percentile in [0, 4000];
* ``normalised``: mean within 0.5 of 0 and standard deviation in [0.5, 2] (an image already z-scored);
* ``scalar``: anything else (8-bit exports, MR, images of unknown scale).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.errors import VolcnnError
from volcnn.core.geometry import world_to_voxel
from volcnn.evaluation.findings import read_annotations
from volcnn.io.datalist import load_datalist, read_datalist_json
from volcnn.io.sources import case_name
from volcnn.io.types import VolumeError
from volcnn.io.volume import load_volume

__all__ = [
    "MASK_MAX_VALUES",
    "SECTIONS",
    "VERDICTS",
    "PlanError",
    "describe_verdicts",
    "fingerprint_dataset",
    "intensity_verdict",
    "voxel_sample",
]

logger = logging.getLogger(__name__)

#: the datalist sections a fingerprint counts
SECTIONS = ("training", "validation", "test")
#: modality verdicts, see the module docstring
VERDICTS = ("ct_hu", "normalised", "scalar", "mask")
#: an integer image with at most this many distinct values (none negative) is a mask
MASK_MAX_VALUES = 16
#: side of the cube (mm) sampled around each candidate centre
_CUBE_MM = 32.0


class PlanError(VolcnnError, ValueError):
    """A dataset cannot be planned for (no training entries, a single class, no readable image, images of several
    kinds); the message says which and names files (exit code 1)."""


def voxel_sample(array: np.ndarray, limit: int) -> np.ndarray:
    """At most about ``limit`` voxels of ``array`` as float64 ``(N,)``: every k-th voxel of the flattened array,
    ``k = ceil(size / limit)``, so the same volume gives the same sample."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, math.ceil(flat.size / max(1, int(limit))))
    return flat[::step].astype(np.float64)


def _cube_sample(array: np.ndarray, affine: np.ndarray, centres: Sequence[Sequence[float]], limit: int) -> np.ndarray:
    """Voxels ``(N,)`` of the :data:`_CUBE_MM` cubes around ``centres`` (world RAS mm), at most about ``limit``."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    half = np.ceil(0.5 * _CUBE_MM / spacing).astype(int)
    parts = []
    for centre in centres:
        v = np.rint(world_to_voxel(affine, centre)).astype(int)
        lo, hi = np.maximum(v - half, 0), np.minimum(v + half + 1, array.shape)
        if (hi > lo).all():
            parts.append(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].reshape(-1))
    if not parts:
        return np.empty(0)
    return voxel_sample(np.concatenate(parts), limit)


def intensity_verdict(values: np.ndarray) -> str:
    """The modality verdict (:data:`VERDICTS`) of one image from its sampled voxels ``(N,)``."""
    if values.size == 0:
        return "scalar"
    integral = bool(np.all(values == np.round(values)))
    if integral and values.min() >= 0 and np.unique(values).size <= MASK_MAX_VALUES:
        return "mask"
    lo, hi = np.percentile(values, [0.5, 99.5])
    if lo <= -700.0 and 0.0 <= hi <= 4000.0:
        return "ct_hu"
    if abs(float(values.mean())) <= 0.5 and 0.5 <= float(values.std()) <= 2.0:
        return "normalised"
    return "scalar"


def _spread(items: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` of ``items``, evenly spread (first and last included)."""
    if len(items) <= limit:
        return list(items)
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [0, 10, 50, 90, 100])
    return {k: round(float(v), 4) for k, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)}


def fingerprint_dataset(
    datalist: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str] | None = None,
    max_volumes: int = 50,
    voxels_per_volume: int = 200_000,
    progress: bool = True,
    annotations: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a datalist's images (see the module docstring).

    Args:
        datalist: the datalist JSON.
        dataset_dir: folder the image paths are relative to (default: the datalist's folder).
        max_volumes: images read at most.
        voxels_per_volume: voxels per image entering the intensity statistics at most.
        progress: a progress bar over the images read.
        annotations: an annotation CSV (LUNA16 ``annotations.csv`` or volcnn ``nodules.csv``) whose diameters, for
            the datalist's images, add to the positive entries' ``diameter_mm``.

    Returns:
        ``{"datalist", "mode", "labels", "class_counts" {section: {label: n}}, "images" (distinct, all sections),
        "read", "failed" [{"image", "reason"}], "spacing_mm" [per axis quantiles], "size_vox", "extent_mm",
        "intensity" {"p0_5", "p50", "p99_5", "mean", "std", "integral", "distinct"}, "roi_intensity" (the cubes
        around candidate centres; None in volume mode), "verdicts" {verdict: n}, "verdict",
        "diameter_mm" (quantiles of the positive entries' ``diameter_mm``, None when none has one), "examples"
        {verdict: [image, ...]}}``; image names are relative to the dataset folder, never patient identifiers beyond
        the file names the datalist holds.

    Raises:
        PlanError: no training entries, entries both with and without ``center``, no image could be read, or an
            unreadable annotation CSV.
        DatalistError: an unreadable datalist.
    """
    from tqdm.auto import tqdm

    path = Path(datalist)
    raw = read_datalist_json(path)
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    sections = {s: load_datalist(path, s, base) for s in SECTIONS}
    if not sections["training"]:
        raise PlanError(f"{path}: no training entries to plan for")
    entries = [e for s in SECTIONS for e in sections[s]]
    has_centre = {e.get("center") is not None for e in entries}
    if len(has_centre) > 1:
        raise PlanError(f"{path}: some entries have a 'center' and some do not; a datalist is candidate or volume mode")
    mode = "candidate" if has_centre == {True} else "volume"
    counts = {s: dict(sorted(Counter(str(int(e.get("label", 0))) for e in sections[s]).items())) for s in SECTIONS}
    centres: dict[str, list[list[float]]] = {}
    for e in entries:
        centres.setdefault(e["image"], [])
        if e.get("center") is not None:
            centres[e["image"]].append([float(c) for c in e["center"]])
    diameters = [float(e["diameter_mm"]) for e in entries if int(e.get("label", 0)) != 0 and e.get("diameter_mm")]
    if annotations is not None:
        try:
            table = read_annotations(annotations)[0]
        except (ValueError, OSError) as e:
            raise PlanError(str(e)) from e
        cases = {case_name(e["image"]) for e in entries}
        diameters += [float(d) for case, rows in table.items() if case in cases for _, d in rows]

    images = sorted(centres)
    chosen = _spread(images, max(1, int(max_volumes)))
    spacings, sizes, extents, samples, roi, failed = [], [], [], [], [], []
    verdicts: dict[str, list[str]] = {}
    for image in tqdm(chosen, desc="fingerprint", unit="image", disable=not progress):
        name = os.path.relpath(image, base)
        try:
            vol = load_volume(image, expect_hu=False)  # the fingerprint gives its own verdict on the cohort
        except (VolumeError, OSError) as e:
            failed.append({"image": name, "reason": str(getattr(e, "problem", e))})
            logger.warning("%s: not used for the plan (%s)", name, getattr(e, "problem", e))
            continue
        spacing = vol.spacing
        spacings.append(spacing.tolist())
        sizes.append(list(vol.array.shape))
        extents.append((spacing * np.asarray(vol.array.shape)).tolist())
        values = voxel_sample(vol.array, voxels_per_volume)
        samples.append(values)
        verdicts.setdefault(intensity_verdict(values), []).append(name)
        if mode == "candidate":
            roi.append(_cube_sample(vol.array, vol.affine, centres[image], voxels_per_volume))
        del vol
    if not samples:
        raise PlanError(f"{path}: none of the {len(chosen)} images read could be used: {failed[0]['reason']}")

    pooled = np.concatenate(samples)
    lo, mid, hi = np.percentile(pooled, [0.5, 50, 99.5])
    roi_values = np.concatenate(roi) if roi else np.empty(0)
    roi_stats = None
    if roi_values.size:
        roi_lo, roi_hi = np.percentile(roi_values, [0.5, 99.5])
        roi_stats = {"p0_5": round(float(roi_lo), 4), "p99_5": round(float(roi_hi), 4)}
    verdict_counts = {v: len(verdicts[v]) for v in VERDICTS if v in verdicts}
    return {
        "datalist": str(path),
        "mode": mode,
        "labels": raw.get("labels"),
        "class_counts": counts,
        "images": len(images),
        "read": len(samples),
        "failed": failed,
        "spacing_mm": [_quantiles([s[a] for s in spacings]) for a in range(3)],
        "size_vox": [_quantiles([s[a] for s in sizes]) for a in range(3)],
        "extent_mm": [_quantiles([s[a] for s in extents]) for a in range(3)],
        "intensity": {
            "p0_5": round(float(lo), 4),
            "p50": round(float(mid), 4),
            "p99_5": round(float(hi), 4),
            "mean": round(float(pooled.mean()), 4),
            "std": round(float(pooled.std()), 4),
            "integral": bool(np.all(pooled == np.round(pooled))),
            "distinct": int(min(np.unique(pooled).size, 10_000)),
        },
        "roi_intensity": roi_stats,
        "verdicts": verdict_counts,
        "verdict": next(iter(verdict_counts)) if len(verdict_counts) == 1 else None,
        "examples": {v: names[:3] for v, names in verdicts.items()},
        "diameter_mm": _quantiles(diameters),
    }


def describe_verdicts(fingerprint: Mapping[str, Any]) -> str:
    """``"12 ct_hu (a.nii.gz, b.nii.gz, ...), 3 scalar (c.nii.gz)"``."""
    parts = []
    for verdict, n in fingerprint["verdicts"].items():
        names = ", ".join(fingerprint["examples"][verdict]) + (", ..." if n > 3 else "")
        parts.append(f"{n} {verdict} ({names})")
    return ", ".join(parts)
