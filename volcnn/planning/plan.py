"""Training settings from a dataset fingerprint (:mod:`volcnn.planning.fingerprint`), each with the reason it was
chosen, and the files ``volcnn plan`` writes.

``plan.json`` holds ``train.json`` override keys only, so that ``python -m monai.bundle run training --args_file
plan.json ...`` uses it as it is; ``fingerprint.json`` beside it holds what the plan was made from and
``plan.md`` why each value was chosen.

The rules, in the spirit of nnU-Net's fixed rules from a fingerprint (Isensee et al., Nature Methods 2021), made for
classification:

* ``pixdim``: candidate mode, isotropic (a patch is a cube in millimetres) at a quarter of the 10th percentile object
  diameter (1 mm without diameters), kept between the median finest and coarsest spacing, rounded down to 0.25 mm
  (at least 0.5 mm); volume mode, the median spacing per axis, except that an axis more than 3x coarser
  than the finest takes its 10th percentile (nnU-Net's anisotropy rule).
* ``patch_size``: candidate mode, a cube of side ``2 x`` the 95th percentile object diameter + 8 mm (48 mm without
  diameters), at least 32 mm, in voxels rounded up to a multiple of 8 (16 to 96); volume mode, the median extent at
  ``pixdim`` scaled down to at most :data:`VOLUME_VOXELS` voxels for the device, each axis a multiple of 16.
* ``margin``: a sixth of the largest patch side (context for rotation and scaling), volume mode 8.
* ``intensity`` / ``hu_window``: CT in HU, ``hu`` with the window from the 0.5th..99.5th HU percentiles around the
  candidates (volume mode: of the whole volumes), rounded out to 50 HU; other scalar images, ``percentile``; images
  already normalised, ``zscore``; masks, ``none``.
* ``sampling`` / ``class_weighting``: training classes more than 4:1 apart, class-balanced batches and an
  unweighted loss (on the synthetic cohort CPM 0.778 against 0.548 for the weighted loss on a 1:30 mix, README);
  else shuffled batches and a class-weighted loss.
* ``network_def``: candidate mode, ``valid_cnn3d`` (its dense heat map equals window-by-window evaluation) for
  patches of at least 32 voxels, ``seed_cnn3d`` below; volume mode, ``resnet10``.
* ``batch_size``: the largest power of two with at most 4 Mi voxels per batch on CUDA (0.5 Mi on CPU), 2 to 64.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volcnn.core.atomic import atomic_write_json, atomic_write_text
from volcnn.planning.fingerprint import PlanError, describe_verdicts

__all__ = ["DEVICES", "PLAN_KEYS", "VOLUME_VOXELS", "plan_report", "plan_settings", "write_plan"]

#: devices a plan is made for
DEVICES = ("cuda", "cpu")
#: the train.json keys a plan sets, in this order
PLAN_KEYS = ("network_def", "pixdim", "patch_size", "margin", "intensity", "hu_window", "sampling",
             "class_weighting", "batch_size")  # fmt: skip
#: most voxels of a volume-mode patch per device
VOLUME_VOXELS = {"cuda": 128**3, "cpu": 64**3}
_BATCH_VOXELS = {"cuda": 1 << 22, "cpu": 1 << 19}


def _round_up(value: float, step: int) -> int:
    return int(step * math.ceil(value / step - 1e-9))


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, value)))))


def _pixdim(fp: Mapping[str, Any]) -> tuple[list[float], str]:
    medians = [float(q["median"]) for q in fp["spacing_mm"]]
    if fp["mode"] == "candidate":
        finest, coarsest = min(medians), max(medians)
        d = fp.get("diameter_mm")
        if d:
            wanted, basis = (
                float(d["p10"]) / 4.0,
                f"a quarter of the 10th percentile object diameter ({d['p10']:.3g} mm)",
            )
        else:
            wanted, basis = 1.0, "1 mm (no object sizes known)"
        side = max(0.5, math.floor(min(max(wanted, finest), coarsest) * 4.0 + 1e-9) / 4.0)
        return [side] * 3, (
            f"isotropic: {basis}, kept between the median finest ({finest:.3g} mm) and coarsest ({coarsest:.3g} mm) "
            "spacing, rounded down to 0.25 mm: small objects span 4 voxels, no detail finer than the scans' is invented"
        )
    finest = min(medians)
    out, notes = [], []
    for axis, (median, q) in enumerate(zip(medians, fp["spacing_mm"], strict=True)):
        if median > 3.0 * finest:
            out.append(round(float(q["p10"]), 3))
            notes.append(f"axis {axis} is over 3x coarser than the finest: its 10th percentile {q['p10']:.3g} mm")
        else:
            out.append(round(median, 3))
    why = "the median spacing per axis" + (f"; {'; '.join(notes)} (nnU-Net's anisotropy rule)" if notes else "")
    return out, why


def _patch(fp: Mapping[str, Any], pixdim: list[float], device: str) -> tuple[list[int], str]:
    if fp["mode"] == "candidate":
        d = fp.get("diameter_mm")
        if d:
            side_mm = max(32.0, 2.0 * _p95(d) + 8.0)
            why = f"2 x the 95th percentile object diameter ({_p95(d):.3g} mm) + 8 mm, at least 32 mm"
        else:
            side_mm, why = 48.0, "48 mm (no diameter_mm in the datalist)"
        side = min(96, max(16, _round_up(side_mm / pixdim[0], 8)))
        return [side] * 3, f"{why} = {side_mm:.3g} mm, in voxels rounded up to a multiple of 8"
    extent = [float(q["median"]) / p for q, p in zip(fp["extent_mm"], pixdim, strict=True)]
    budget = VOLUME_VOXELS[device]
    scale = min(1.0, (budget / max(1.0, math.prod(extent))) ** (1.0 / 3.0))
    patch = [max(16, _round_up(e * scale, 16)) for e in extent]
    while math.prod(patch) > budget * 1.5 and max(patch) > 16:
        patch[patch.index(max(patch))] -= 16
    return patch, (
        f"the median extent at pixdim ({', '.join(f'{e:.0f}' for e in extent)} voxels) scaled by {scale:.2f} to at "
        f"most {budget} voxels for {device}, each axis a multiple of 16; the whole volume is fitted into it"
    )


def _p95(q: Mapping[str, float]) -> float:
    """A 95th percentile from the stored quantiles: halfway between the 90th and the maximum."""
    return 0.5 * (float(q["p90"]) + float(q["max"]))


def _intensity(fp: Mapping[str, Any]) -> tuple[str, list[float], str]:
    verdict = fp["verdict"]
    if verdict is None:
        raise PlanError(
            f"{fp['datalist']}: the images are not all of one kind ({describe_verdicts(fp)}); plan them separately "
            "or convert them to one kind first"
        )
    if verdict == "ct_hu":
        stats = fp["roi_intensity"] or fp["intensity"]
        where = "around the candidates" if fp["roi_intensity"] else "of the volumes"
        lo = max(-1024.0, 50.0 * math.floor(stats["p0_5"] / 50.0))
        hi = min(3071.0, 50.0 * math.ceil(stats["p99_5"] / 50.0))
        if hi <= lo:
            hi = lo + 50.0
        return "hu", [lo, hi], f"CT in HU: window from the 0.5th..99.5th HU percentiles {where}, rounded out to 50 HU"
    if verdict == "mask":
        return "none", [-1000.0, 400.0], "binary or label masks (few non-negative integers): values kept as they are"
    if verdict == "normalised":
        return "zscore", [-1000.0, 400.0], "values already centred near 0 with unit spread: z-scored per volume"
    return (
        "percentile",
        [-1000.0, 400.0],
        ("a scalar image not in HU (e.g. 8-bit, MR): each volume's 0.5th..99.5th percentiles to [0, 1]"),
    )


def _imbalance(fp: Mapping[str, Any]) -> tuple[str, str, str]:
    counts = fp["class_counts"]["training"]
    if len(counts) < 2:
        raise PlanError(f"{fp['datalist']}: the training entries hold one class only ({counts}); nothing to classify")
    ratio = max(counts.values()) / min(counts.values())
    if ratio > 4.0:
        return "balanced", "none", f"training classes {ratio:.1f}:1 apart: class-balanced batches, unweighted loss"
    return "shuffle", "balanced", f"training classes {ratio:.1f}:1: shuffled batches, class-weighted loss"


def plan_settings(fingerprint: Mapping[str, Any], device: str = "cuda") -> tuple[dict[str, Any], dict[str, str]]:
    """The settings (``train.json`` keys, :data:`PLAN_KEYS`) for a fingerprint, and why each was chosen.

    Raises:
        PlanError: images of several kinds, a single training class, or an unknown ``device``.
    """
    if device not in DEVICES:
        raise PlanError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    fp = fingerprint
    intensity, window, why_intensity = _intensity(fp)
    sampling, weighting, why_imbalance = _imbalance(fp)
    pixdim, why_pixdim = _pixdim(fp)
    patch, why_patch = _patch(fp, pixdim, device)
    if fp["mode"] == "candidate":
        network = "valid_cnn3d" if min(patch) >= 32 else "seed_cnn3d"
        why_network = (
            "unpadded convolutions: its dense heat map equals window-by-window evaluation"
            if network == "valid_cnn3d"
            else "patches under 32 voxels (valid_cnn3d needs 32)"
        )
        margin, why_margin = int(math.ceil(max(patch) / 6)), "a sixth of the patch side: context for rotation/scale"
    else:
        network, why_network = "resnet10", "whole volumes: a residual network with padding"
        margin, why_margin = 8, "volume mode: the fitted volume padded so that rotations and shifts keep it whole"
    voxels = math.prod(patch)
    batch = min(64, max(2, _pow2_floor(_BATCH_VOXELS[device] / voxels)))
    settings = {
        "network_def": network,
        "pixdim": pixdim,
        "patch_size": patch,
        "margin": margin,
        "intensity": intensity,
        "hu_window": window,
        "sampling": sampling,
        "class_weighting": weighting,
        "batch_size": batch,
    }
    reasons = {
        "network_def": why_network,
        "pixdim": why_pixdim,
        "patch_size": why_patch,
        "margin": why_margin,
        "intensity": why_intensity,
        "hu_window": why_intensity if intensity == "hu" else "not used by this intensity setting (bundle default)",
        "sampling": why_imbalance,
        "class_weighting": why_imbalance,
        "batch_size": f"the largest power of two with at most {_BATCH_VOXELS[device]} voxels per batch on {device}",
    }
    return settings, reasons


def plan_report(settings: Mapping[str, Any], reasons: Mapping[str, str], fingerprint: Mapping[str, Any]) -> str:
    """``plan.md``: the dataset in a few lines, then each setting with its value and reason."""
    fp = fingerprint
    spacing = " x ".join(f"{q['median']:.3g}" for q in fp["spacing_mm"])
    size = " x ".join(f"{q['median']:.0f}" for q in fp["size_vox"])
    lines = [
        "# Plan",
        "",
        f"Datalist `{fp['datalist']}`: {fp['images']} images ({fp['read']} read for the fingerprint"
        + (f", {len(fp['failed'])} unreadable" if fp["failed"] else "")
        + f"), {fp['mode']} mode.",
        "",
        f"- class counts: {json.dumps(fp['class_counts'])}",
        f"- median spacing {spacing} mm, median size {size} voxels",
        f"- intensities: 0.5th..99.5th percentile {fp['intensity']['p0_5']:g}..{fp['intensity']['p99_5']:g}, "
        f"mean {fp['intensity']['mean']:g}, std {fp['intensity']['std']:g}; verdict: {describe_verdicts(fp)}",
    ]
    if fp.get("diameter_mm"):
        d = fp["diameter_mm"]
        lines.append(f"- object diameters: median {d['median']:g} mm, 90th percentile {d['p90']:g}, max {d['max']:g}")
    lines += ["", "| setting | value | why |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{json.dumps(settings[k])}` | {reasons[k]} |" for k in settings]
    lines += ["", "Use it: `python -m monai.bundle run training --config_file configs/train.json --args_file plan.json "
              "--dataset_dir D --datalist DL --output_dir O`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_plan(
    out: str | os.PathLike[str], settings: Mapping[str, Any], reasons: Mapping[str, str], fingerprint: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``out`` (plan.json: the settings only), ``fingerprint.json`` and ``plan.md`` beside it, atomically.

    Returns:
        ``{"plan", "fingerprint", "report"}`` paths.
    """
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    paths = {
        "plan": path,
        "fingerprint": path.with_name(f"{stem}_fingerprint.json" if stem != "plan" else "fingerprint.json"),
        "report": path.with_name(f"{stem}.md"),
    }
    atomic_write_json(paths["fingerprint"], dict(fingerprint))
    atomic_write_text(paths["report"], plan_report(settings, reasons, fingerprint))
    atomic_write_json(paths["plan"], dict(settings))
    return paths
