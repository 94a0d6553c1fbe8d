"""FROC analysis and the competition performance metric (CPM) of nodule detection, as in LUNA16.

The rules follow the LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``, Setio et al. 2017):

* **Hit.** A finding hits a nodule when its distance to the nodule centre is at most the nodule's radius
  (``diameter_mm / 2``); coordinates are world millimetres in one convention for both (volcnn uses RAS).
* **True positive.** A nodule hit by at least one finding is detected, with the probability of its most
  probable hit. Further hits on the same nodule are ignored (neither TP nor FP). A finding that hits two
  nodules detects both, as in the official script.
* **Ignored.** A finding that hits no nodule but lies within an *excluded* (irrelevant) annotation is ignored.
  An excluded annotation with a negative diameter (``-1`` in LUNA16's ``annotations_excluded.csv``) gets
  LUNA16's default diameter of :data:`EXCLUDED_DEFAULT_DIAMETER_MM`.
* **False positive.** Every other finding.
* **Scans.** The number of scans is the number of evaluated cases: a case with no findings still counts, a case
  without nodules contributes only false positives.
* **Curve.** One point per distinct probability ``t`` of the counted findings (detected nodules and false
  positives), thresholds descending: a finding is positive at ``t`` when its probability is ``>= t``;
  ``fps_per_scan = FP(t) / scans``, ``sensitivity = TP(t) / nodules`` (missed nodules are in the denominator).
  The curve starts at the implied origin ``(0, 0)`` (threshold above every probability), which is not listed.
* **Sensitivity at an FP rate.** ``numpy.interp(rate, [0, *fps_per_scan], [0, *sensitivity])``: linear
  interpolation in FPs per scan (not in log FPs) between the curve's points, which is what the official script
  does with the ``scikit-learn`` ROC curve it builds (``np.interp(fps_itp, fps, sens)``). Where the curve runs
  vertically through a rate (several points with the same FPs per scan) the highest sensitivity there is taken;
  beyond the last point the sensitivity stays at its final value (the sensitivity with every finding counted).
* **CPM.** The mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan.

Differences from the official script: the hit test is ``distance <= radius`` (the official script uses a
strict ``<``; the two differ only for a finding exactly on the sphere, and ``<=`` is the rule the rest of volcnn
uses); findings per scan are not capped (the official evaluation keeps each scan's 100 most probable marks; the
inference runner caps findings itself with ``max_findings``); a nodule annotation with a negative or zero
diameter is an error instead of being given 10 mm; the CPM interpolates at the seven rates exactly rather than
on a 10001-point grid; a detector with no true positive at all gets sensitivity 0 (the official script produces
NaN there). The optional bootstrap resamples scans with replacement as the official script does, but reports
percentile intervals of the CPM and of each sensitivity (the official one reports intervals of the curve).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

__all__ = [
    "EXCLUDED_DEFAULT_DIAMETER_MM",
    "LUNA16_FP_RATES",
    "froc",
    "rate_key",
    "sensitivity_at",
]

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The seven average numbers of false positives per scan at which LUNA16 reads the sensitivity."""

EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
"""Diameter LUNA16 gives an excluded annotation whose diameter is negative (unknown)."""

Point: TypeAlias = Sequence[float]
"""World coordinates ``(x, y, z)`` in mm."""
Finding: TypeAlias = tuple[Point, float]
"""``(centre, probability)`` of a finding."""
Annotation: TypeAlias = tuple[Point, float]
"""``(centre, diameter_mm)`` of an annotated nodule or excluded region."""


def rate_key(rate: float) -> str:
    """The key of an FP rate in the result's ``sensitivities``: ``0.125 -> "0.125"``, ``1.0 -> "1"``."""
    return f"{float(rate):g}"


def sensitivity_at(
    fps_per_scan: Sequence[float] | np.ndarray, sensitivity: Sequence[float] | np.ndarray, rates: Iterable[float]
) -> list[float]:
    """Sensitivity of a FROC curve at each FP rate, by the LUNA16 rule (see the module docstring).

    Args:
        fps_per_scan: the curve's FPs per scan, non-decreasing, without the origin.
        sensitivity: the curve's sensitivities, same length.
        rates: FPs per scan to read the curve at.

    Returns:
        ``numpy.interp(rate, [0, *fps_per_scan], [0, *sensitivity])`` for each rate, as Python floats.
    """
    fps = np.concatenate([[0.0], np.asarray(fps_per_scan, dtype=np.float64)])
    sens = np.concatenate([[0.0], np.asarray(sensitivity, dtype=np.float64)])
    if fps.shape != sens.shape:
        raise ValueError(f"fps_per_scan has {fps.size - 1} points but sensitivity has {sens.size - 1}")
    if np.any(np.diff(fps) < 0):
        raise ValueError("fps_per_scan must be non-decreasing (thresholds in descending order)")
    return [float(v) for v in np.interp(np.asarray(list(rates), dtype=np.float64), fps, sens)]


@dataclass
class _Scan:
    """What one evaluated scan contributes: detected-nodule and false-positive probabilities, and counts."""

    tp_probs: np.ndarray
    fp_probs: np.ndarray
    nodules: int
    findings: int
    duplicates: int
    excluded: int


def _points(values: Sequence[Any], what: str, case: str, second: str) -> tuple[np.ndarray, np.ndarray]:
    """``(centres (n, 3), second values (n,))`` of a case's ``[(xyz, value), ...]``, checked to be finite."""
    centres = np.zeros((len(values), 3), dtype=np.float64)
    other = np.zeros(len(values), dtype=np.float64)
    for i, item in enumerate(values):
        try:
            xyz, value = item
            centre = np.asarray(xyz, dtype=np.float64)
            number = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"case {case!r}: {what} {i} must be ((x, y, z), {second}), got {item!r}") from e
        if centre.shape != (3,) or not np.all(np.isfinite(centre)):
            raise ValueError(f"case {case!r}: {what} {i} centre must be 3 finite numbers, got {xyz!r}")
        if not math.isfinite(number):
            raise ValueError(f"case {case!r}: {what} {i} {second} must be finite, got {value!r}")
        centres[i], other[i] = centre, number
    return centres, other


def _hits(findings: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(n_findings, n_annotations)`` boolean: finding within the annotation's radius (``<=``)."""
    if not len(findings) or not len(centres):
        return np.zeros((len(findings), len(centres)), dtype=bool)
    dist2 = ((findings[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return dist2 <= (radii**2)[None, :]


def _match_scan(case: str, findings: Sequence[Any], annotations: Sequence[Any], excluded: Sequence[Any]) -> _Scan:
    """Classify one scan's findings as detected-nodule hits, false positives or ignored."""
    f_xyz, f_prob = _points(findings, "finding", case, "probability")
    n_xyz, n_diam = _points(annotations, "nodule", case, "diameter_mm")
    e_xyz, e_diam = _points(excluded, "excluded annotation", case, "diameter_mm")
    bad = np.flatnonzero(n_diam <= 0)
    if bad.size:
        raise ValueError(f"case {case!r}: nodule {int(bad[0])} has diameter_mm {n_diam[bad[0]]:g}; it must be > 0")
    e_diam = np.where(e_diam < 0, EXCLUDED_DEFAULT_DIAMETER_MM, e_diam)
    hit = _hits(f_xyz, n_xyz, n_diam / 2)
    detected = hit.any(axis=0)
    # the most probable hit of each detected nodule (first of equals) is its representative
    if len(f_xyz):
        best = np.argmax(np.where(hit, f_prob[:, None], -np.inf), axis=0)
    else:
        best = np.zeros(len(n_xyz), dtype=np.intp)
    representative = np.zeros(len(f_xyz), dtype=bool)
    representative[best[detected]] = True
    on_nodule = hit.any(axis=1)
    on_excluded = _hits(f_xyz, e_xyz, e_diam / 2).any(axis=1) & ~on_nodule
    false_pos = ~on_nodule & ~on_excluded
    return _Scan(
        tp_probs=f_prob[best[detected]],
        fp_probs=f_prob[false_pos],
        nodules=len(n_xyz),
        findings=len(f_xyz),
        duplicates=int((on_nodule & ~representative).sum()),
        excluded=int(on_excluded.sum()),
    )


class _Sweep:
    """The threshold sweep over counted findings, reusable with per-entry weights (for the bootstrap)."""

    def __init__(self, tp_probs: np.ndarray, fp_probs: np.ndarray) -> None:
        probs = np.concatenate([tp_probs, fp_probs])
        is_tp = np.concatenate([np.ones(len(tp_probs), dtype=bool), np.zeros(len(fp_probs), dtype=bool)])
        self.order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[self.order]
        self.is_tp = is_tp[self.order]
        # the last entry of each group of equal probabilities: the point where that threshold is reached
        self.ends = np.zeros(0, dtype=np.intp)
        if probs.size:
            self.ends = np.flatnonzero(np.r_[sorted_probs[1:] != sorted_probs[:-1], True])
        self.thresholds = sorted_probs[self.ends]

    def counts(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cumulative ``(TP, FP)`` at each threshold; ``weights`` (in input order) repeat entries."""
        w = np.ones(self.is_tp.size) if weights is None else weights[self.order]
        tp = np.cumsum(np.where(self.is_tp, w, 0.0))[self.ends]
        fp = np.cumsum(np.where(self.is_tp, 0.0, w))[self.ends]
        return tp, fp


def _check_rates(fp_rates: Iterable[float]) -> list[float]:
    rates = [float(r) for r in fp_rates]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"fp_rates must be a non-empty sequence of positive numbers, got {rates}")
    if len({rate_key(r) for r in rates}) != len(rates):
        raise ValueError(f"fp_rates has duplicates: {rates}")
    return rates


def froc(
    findings_per_case: Mapping[str, Sequence[Finding]],
    annotations_per_case: Mapping[str, Sequence[Annotation]],
    cases: Sequence[str] | None = None,
    excluded_per_case: Mapping[str, Sequence[Annotation]] | None = None,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    *,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    operating_threshold: float | None = None,
) -> dict[str, Any]:
    """FROC curve, sensitivity at fixed FP rates and CPM of a nodule detector, by the LUNA16 rules.

    Args:
        findings_per_case: case -> ``[((x, y, z), probability), ...]``, world mm.
        annotations_per_case: case -> ``[((x, y, z), diameter_mm), ...]`` of the nodules to detect, same
            convention; diameters must be > 0.
        cases: the scans evaluated (default: every case of ``findings_per_case`` or ``annotations_per_case``).
            A case missing from either mapping has no findings / no nodules; findings and annotations of
            other cases are not used.
        excluded_per_case: case -> ``[((x, y, z), diameter_mm), ...]`` of irrelevant annotations: findings on
            them that hit no nodule are ignored. A negative diameter means 10 mm, as in LUNA16.
        fp_rates: FPs per scan at which the sensitivity is read; the CPM is their mean sensitivity.
        bootstrap: number of resamples of the scans (with replacement) for percentile intervals; 0: none.
        confidence: level of the bootstrap intervals, in (0, 1).
        seed: seed of the bootstrap.
        operating_threshold: a probability at which to read one point of the curve (the findings a user is shown).

    Returns:
        JSON-serialisable ``{"cpm", "sensitivities": {rate_key(rate): sensitivity}, "fp_rates",
        "curve": {"fps_per_scan", "sensitivity", "thresholds"}, "num_scans", "num_nodules", "num_findings",
        "num_tp", "num_fp", "num_ignored_duplicate", "num_ignored_excluded"}``; ``num_tp`` is the number of
        detected nodules at the lowest threshold. With ``bootstrap`` also ``"bootstrap": {"resamples", "used",
        "confidence", "seed", "cpm": [low, high], "sensitivities": {key: [low, high]}}`` (resamples without a
        nodule are not used). With ``operating_threshold`` also ``"operating_point": {"threshold", "sensitivity",
        "fps_per_scan", "num_tp", "num_fp"}`` of the findings with probability >= the threshold, matched as above.

    Raises:
        ValueError: no scans, duplicate cases, no nodule in the evaluated scans, a non-positive nodule
            diameter, a non-finite coordinate / probability / diameter, bad ``fp_rates`` or bootstrap settings.
    """
    rates = _check_rates(fp_rates)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    excluded_per_case = excluded_per_case or {}
    scan_ids = sorted(set(findings_per_case) | set(annotations_per_case)) if cases is None else list(cases)
    if not scan_ids:
        raise ValueError("no scans to evaluate: give at least one case")
    if len(set(scan_ids)) != len(scan_ids):
        dups = sorted({c for c in scan_ids if scan_ids.count(c) > 1})
        raise ValueError(f"cases listed more than once: {dups[:10]}")
    scans = [
        _match_scan(c, findings_per_case.get(c, ()), annotations_per_case.get(c, ()), excluded_per_case.get(c, ()))
        for c in scan_ids
    ]
    num_nodules = sum(s.nodules for s in scans)
    if num_nodules == 0:
        raise ValueError(f"no nodules in the {len(scans)} evaluated scan(s): sensitivity is undefined")
    tp_probs = np.concatenate([s.tp_probs for s in scans])
    fp_probs = np.concatenate([s.fp_probs for s in scans])
    sweep = _Sweep(tp_probs, fp_probs)
    tp, fp = sweep.counts()
    fps_per_scan, sensitivity = fp / len(scans), tp / num_nodules
    sens_at = sensitivity_at(fps_per_scan, sensitivity, rates)
    result: dict[str, Any] = {
        "cpm": float(np.mean(sens_at)),
        "sensitivities": {rate_key(r): s for r, s in zip(rates, sens_at, strict=True)},
        "fp_rates": rates,
        "curve": {
            "fps_per_scan": [float(v) for v in fps_per_scan],
            "sensitivity": [float(v) for v in sensitivity],
            "thresholds": [float(v) for v in sweep.thresholds],
        },
        "num_scans": len(scans),
        "num_nodules": int(num_nodules),
        "num_findings": sum(s.findings for s in scans),
        "num_tp": int(tp_probs.size),
        "num_fp": int(fp_probs.size),
        "num_ignored_duplicate": sum(s.duplicates for s in scans),
        "num_ignored_excluded": sum(s.excluded for s in scans),
    }
    if operating_threshold is not None:
        t = float(operating_threshold)
        hits, false = int(np.count_nonzero(tp_probs >= t)), int(np.count_nonzero(fp_probs >= t))
        result["operating_point"] = {
            "threshold": t,
            "sensitivity": hits / num_nodules,
            "fps_per_scan": false / len(scans),
            "num_tp": hits,
            "num_fp": false,
        }
    if bootstrap:
        result["bootstrap"] = _bootstrap(scans, sweep, rates, bootstrap, confidence, seed)
    return result


def _bootstrap(
    scans: list[_Scan], sweep: _Sweep, rates: list[float], resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Percentile intervals of the CPM and of each sensitivity over resamples of the scans."""
    rng = np.random.default_rng(seed)
    n = len(scans)
    tp_scan = np.concatenate([np.full(s.tp_probs.size, i) for i, s in enumerate(scans)]).astype(int)
    fp_scan = np.concatenate([np.full(s.fp_probs.size, i) for i, s in enumerate(scans)]).astype(int)
    entry_scan = np.concatenate([tp_scan, fp_scan])
    nodules = np.array([s.nodules for s in scans], dtype=np.float64)
    sens_rows = []
    for _ in range(resamples):
        times = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)  # copies of each scan
        total = float(times @ nodules)
        if total == 0:
            continue
        tp, fp = sweep.counts(times[entry_scan])
        sens_rows.append(sensitivity_at(fp / n, tp / total, rates))
    alpha = (1 - confidence) / 2
    out: dict[str, Any] = {"resamples": resamples, "used": len(sens_rows), "confidence": confidence, "seed": seed}
    if not sens_rows:
        return out | {"cpm": None, "sensitivities": dict.fromkeys(map(rate_key, rates))}
    sens = np.asarray(sens_rows)
    lo, hi = np.quantile(sens, [alpha, 1 - alpha], axis=0)
    cpm_lo, cpm_hi = np.quantile(sens.mean(axis=1), [alpha, 1 - alpha])
    out["cpm"] = [float(cpm_lo), float(cpm_hi)]
    out["sensitivities"] = {rate_key(r): [float(a), float(b)] for r, a, b in zip(rates, lo, hi, strict=True)}
    return out
