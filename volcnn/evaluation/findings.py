"""Detection evaluation of ``volcnn infer`` outputs against nodule annotations: FROC and CPM, LUNA16 style.

:func:`evaluate_findings` reads every ``FINDINGS_DIR/<case>/findings.json`` written by the inference runner
(findings in world RAS mm) and an annotation CSV, one of:

* LUNA16 ``annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm`` in **LPS** mm (``x`` and ``y``
  change sign to become RAS);
* volcnn's synthetic ``nodules.csv``: ``case,...,x_ras,y_ras,z_ras,diameter_mm,...`` in **RAS** mm.

The case name is the ``<case>`` folder name; it is matched to the annotation's ``seriesuid`` (or ``case``)
column. Only cases with a ``findings.json`` are evaluated: a case with no annotation row is a nodule-free scan
(it can only add false positives), and annotated cases without findings are listed as not inferred. An
optional CSV of excluded (irrelevant) annotations in the same formats, like LUNA16's
``annotations_excluded.csv``, marks regions where findings are ignored. The scoring rules are those of
:func:`volcnn.evaluation.froc.froc`. ``volcnn evaluate-findings`` runs it (:mod:`volcnn.commands.evaluate_findings`).

Outputs carry case names only (folder names, i.e. series UIDs or file names), never other CSV columns such as
``patient``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from volcnn.core.atomic import atomic_write_json
from volcnn.evaluation.froc import LUNA16_FP_RATES, froc, rate_key
from volcnn.evaluation.froc_plot import plot_froc
from volcnn.io.datalist_split import parse_float, raise_row_errors, read_csv_rows

__all__ = [
    "COORDS",
    "evaluate_findings",
    "format_table",
    "per_scan_auc",
    "read_annotations",
    "read_findings",
    "read_scores",
]

logger = logging.getLogger(__name__)

COORDS = ("auto", "lps", "ras")
"""Accepted values of ``coords``: detect from the header, LPS (LUNA16) or RAS (volcnn) millimetres."""
_LUNA16_COLUMNS = ("coordX", "coordY", "coordZ")
_RAS_COLUMNS = ("x_ras", "y_ras", "z_ras")
_MAX_NAMED = 10

Annotations = dict[str, list[tuple[list[float], float]]]


def read_annotations(
    path: str | os.PathLike[str], coords: str = "auto", *, allow_negative_diameter: bool = False
) -> tuple[Annotations, str]:
    """Nodule (or excluded-region) annotations of a CSV, as RAS mm per case.

    Args:
        path: LUNA16 ``annotations.csv`` (``seriesuid,coordX,coordY,coordZ,diameter_mm``) or volcnn
            ``nodules.csv`` (``case,x_ras,y_ras,z_ras,diameter_mm``, other columns ignored).
        coords: ``"auto"`` (``coordX`` columns are LPS, ``x_ras`` columns RAS), ``"lps"`` or ``"ras"``; an
            explicit value overrides the convention of ``coordX`` columns (``x_ras`` columns are always RAS).
        allow_negative_diameter: accept negative diameters, as LUNA16's excluded annotations use ``-1`` for an
            unknown size (:func:`~volcnn.evaluation.froc.froc` then gives them 10 mm); a zero diameter is an error.

    Returns:
        ``({case: [([x, y, z] RAS mm, diameter_mm), ...]}, convention used: "lps" or "ras")``.

    Raises:
        ValueError: unreadable file, unknown header, explicit convention contradicting the header, bad rows
            (all listed with line numbers); the message names the file.
    """
    if coords not in COORDS:
        raise ValueError(f"coords must be one of {COORDS}, got {coords!r}")
    path = Path(path)
    header, rows = read_csv_rows(path, ["diameter_mm"])
    key = "seriesuid" if "seriesuid" in header else "case"
    if key not in header:
        raise ValueError(f"{path}: no 'seriesuid' or 'case' column naming the scans; header is {header}")
    if all(c in header for c in _LUNA16_COLUMNS):
        columns, used = _LUNA16_COLUMNS, ("lps" if coords == "auto" else coords)
    elif all(c in header for c in _RAS_COLUMNS):
        if coords == "lps":
            raise ValueError(f"{path}: columns {list(_RAS_COLUMNS)} hold RAS coordinates; --coords lps contradicts")
        columns, used = _RAS_COLUMNS, "ras"
    else:
        raise ValueError(
            f"{path}: expected coordinate columns {list(_LUNA16_COLUMNS)} (LUNA16, LPS) or {list(_RAS_COLUMNS)} "
            f"(volcnn nodules.csv, RAS); header is {header}"
        )
    out: Annotations = {}
    errors: list[str] = []
    for line, row in rows:
        try:
            case = row[key]
            if not case:
                raise ValueError(f"empty {key}")
            x, y, z = (parse_float(row[c], c) for c in columns)
            diameter = parse_float(row["diameter_mm"], "diameter_mm")
            if diameter <= 0 and not (allow_negative_diameter and diameter < 0):
                raise ValueError(f"diameter_mm {diameter:g} is not positive")
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        centre = [-x + 0.0, -y + 0.0, z + 0.0] if used == "lps" else [x, y, z]  # + 0.0: no -0.0
        out.setdefault(case, []).append((centre, diameter))
    raise_row_errors(path, errors)
    return out, used


def read_findings(findings_dir: str | os.PathLike[str]) -> dict[str, list[tuple[list[float], float]]]:
    """``{case: [([x, y, z] RAS mm, probability), ...]}`` of every ``findings_dir/<case>/findings.json``.

    The case is the folder name; a ``"case"`` field that differs is reported as a warning. Folders without a
    ``findings.json`` (failed inputs) are skipped.

    Raises:
        ValueError: a ``findings.json`` that is not valid JSON or has malformed findings (naming the file).
    """
    root = Path(findings_dir)
    out: dict[str, list[tuple[list[float], float]]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "findings.json"
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read findings ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("findings"), list):
            raise ValueError(f"{path}: not a volcnn findings file (no 'findings' list)")
        if doc.get("case") not in (None, folder.name):
            logger.warning("%s: case %r differs from its folder name; using %r", path, doc["case"], folder.name)
        items = []
        for i, f in enumerate(doc["findings"]):
            try:
                centre = [float(v) for v in f["center_ras_mm"]]
                prob = float(f["probability"])
                if len(centre) != 3:
                    raise ValueError(f"center_ras_mm has {len(centre)} values, expected 3")
                if not all(math.isfinite(v) for v in [*centre, prob]):
                    raise ValueError("non-finite center_ras_mm or probability")
            except (KeyError, TypeError, ValueError) as e:
                detail = f"missing {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{path}: finding {i} is malformed ({detail})") from e
            items.append((centre, prob))
        out[folder.name] = items
    return out


def _read_numbers(findings_dir: str | os.PathLike[str], key: str) -> dict[str, float]:
    """``{case: value}`` of the finite number ``key`` of every ``findings_dir/<case>/findings.json`` that has one."""
    out: dict[str, float] = {}
    for path in sorted(Path(findings_dir).glob("*/findings.json")):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read findings ({e})") from e
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[path.parent.name] = float(value)
    return out


def read_scores(findings_dir: str | os.PathLike[str]) -> dict[str, float]:
    """``{case: score}``: the volume score of every ``findings_dir/<case>/findings.json`` that has one."""
    return _read_numbers(findings_dir, "score")


def _operating_threshold(root: Path, cases: Sequence[str], warnings: list[str]) -> float | None:
    """The ``operating_threshold`` the evaluated cases' ``findings.json`` share; None (with a warning when they
    disagree) when there is none to read the operating point at."""
    thresholds = _read_numbers(root, "operating_threshold")
    values = {thresholds[c] for c in cases if c in thresholds}
    if len(values) == 1 and all(c in thresholds for c in cases):
        return values.pop()
    if values:
        warnings.append(
            f"the findings in {root} name {len(values)} different operating thresholds (or some none): no operating "
            "point reported; infer every case with one bundle"
        )
    return None


def per_scan_auc(scores: dict[str, float], cases: Sequence[str], nodules: Annotations) -> dict[str, Any]:
    """ROC AUC of the volume score for "the scan has a nodule", over ``cases``.

    Returns:
        ``{"auc", "num_with_nodules", "num_without_nodules", "num_without_score"}``; ``auc`` is None (with
        ``"reason"``) when the scans are all of one kind or no scan has a score.
    """
    from volcnn.evaluation.classification import roc_auc

    scored = [c for c in cases if c in scores]
    labels = [1 if nodules.get(c) else 0 for c in scored]
    result: dict[str, Any] = {
        "num_with_nodules": sum(labels),
        "num_without_nodules": len(labels) - sum(labels),
        "num_without_score": len(cases) - len(scored),
        "auc": None,
    }
    if 0 < sum(labels) < len(labels):
        result["auc"] = roc_auc([scores[c] for c in scored], labels)
    else:
        result["reason"] = "the scans are all with nodules or all without: the AUC is undefined"
    return result


def _named(cases: Sequence[str]) -> str:
    shown = ", ".join(cases[:_MAX_NAMED])
    return shown + (f", ... ({len(cases) - _MAX_NAMED} more)" if len(cases) > _MAX_NAMED else "")


def _failed_inputs(root: Path) -> int:
    """Number of inputs the inference run recorded as failed (``failures.json``), 0 when absent or unreadable."""
    try:
        failures = json.loads((root / "failures.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 0
    return len(failures) if isinstance(failures, list) else 0


def evaluate_findings(
    findings_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    coords: str = "auto",
    excluded: str | os.PathLike[str] | None = None,
    cases: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """FROC and CPM of the findings of an inference run against an annotation CSV.

    Args:
        findings_dir: the ``volcnn infer`` output folder (``<case>/findings.json``).
        annotations: nodule CSV, LUNA16 ``annotations.csv`` (LPS) or volcnn ``nodules.csv`` (RAS).
        coords: ``"auto"``, ``"lps"`` or ``"ras"``: the convention of the CSVs (see :func:`read_annotations`).
        excluded: optional CSV of irrelevant annotations (LUNA16 ``annotations_excluded.csv``), same formats.
        cases: evaluate only these cases (each needs a ``findings.json``); default: every inferred case.
        out_dir: where ``froc.json`` and ``froc.png`` are written (atomically); ``None``: nothing written.
        fp_rates: FP rates of the sensitivities and the CPM.
        bootstrap: resamples of the scans for percentile intervals (0: none).
        seed: bootstrap seed.

    Returns:
        The :func:`~volcnn.evaluation.froc.froc` result plus ``inputs`` (paths and the coordinate conventions used),
        ``not_inferred`` (annotated cases without ``findings.json``, sorted), ``num_not_inferred``,
        ``num_scans_without_nodules`` (evaluated cases with no annotation row), ``num_failed_inputs`` (from the
        run's ``failures.json``), ``per_scan`` (:func:`per_scan_auc`: the ROC AUC of the findings' volume
        ``score`` for "has a nodule"), ``operating_point`` (sensitivity and false positives per scan of the findings
        at or above the ``operating_threshold`` their ``findings.json`` name, when they all name the same one),
        ``warnings`` (messages) and, with ``out_dir``, ``outputs``.

    Raises:
        ValueError: no ``findings.json``; unreadable or malformed CSV / findings; no case in common between the
            findings and the annotations (a naming mismatch); requested ``cases`` without findings; no nodules.
            Messages name the file and the problem.
        OSError: the outputs cannot be written.
    """
    root = Path(findings_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: findings folder not found")
    findings = read_findings(root)
    if not findings:
        raise ValueError(f"{root}: no <case>/findings.json found; is this a 'volcnn infer' output folder?")
    nodules, used = read_annotations(annotations, coords)
    excluded_ann, excluded_used = (
        read_annotations(excluded, coords, allow_negative_diameter=True) if excluded is not None else ({}, None)
    )
    if cases is None:
        evaluated = sorted(findings)
    else:
        evaluated = list(cases)
        missing = [c for c in evaluated if c not in findings]
        if missing:
            raise ValueError(f"{root}: no findings.json for {len(missing)} requested case(s): {_named(missing)}")
    if not set(findings) & set(nodules):
        raise ValueError(
            f"{annotations}: no case in common with the {len(findings)} inferred case(s) in {root} "
            f"(e.g. {_named(sorted(findings)[:3])}); annotated cases are e.g. {_named(sorted(nodules)[:3])}. "
            "The case folder names must equal the annotation's seriesuid / case values."
        )
    warnings: list[str] = []
    not_inferred = sorted(set(nodules) - set(findings))
    if not_inferred:
        warnings.append(
            f"{len(not_inferred)} annotated case(s) have no findings.json in {root} and were not evaluated: "
            f"{_named(not_inferred)}"
        )
    nodule_free = [c for c in evaluated if c not in nodules]
    failed = _failed_inputs(root)
    if failed:
        warnings.append(f"{failed} input(s) failed inference (see {root / 'failures.json'}) and were not evaluated")
    operating = _operating_threshold(root, evaluated, warnings)
    for message in warnings:
        logger.warning("%s", message)
    try:
        result = froc(
            findings,
            nodules,
            cases=evaluated,
            excluded_per_case=excluded_ann,
            fp_rates=fp_rates,
            bootstrap=bootstrap,
            seed=seed,
            operating_threshold=operating,
        )
    except ValueError as e:
        raise ValueError(f"evaluating {root} against {annotations}: {e}") from e
    result["per_scan"] = per_scan_auc(read_scores(root), evaluated, nodules)
    result |= {
        "inputs": {
            "findings_dir": str(root),
            "annotations": str(annotations),
            "annotations_coords": used,
            "excluded": None if excluded is None else str(excluded),
            "excluded_coords": excluded_used,
        },
        "not_inferred": not_inferred,
        "num_not_inferred": len(not_inferred),
        "num_scans_without_nodules": len(nodule_free),
        "num_failed_inputs": failed,
        "warnings": warnings,
    }
    if out_dir is not None:
        out = Path(out_dir)
        result["outputs"] = {"json": str(out / "froc.json"), "png": str(out / "froc.png")}
        curve = result["curve"]
        plot_froc(
            curve["fps_per_scan"],
            curve["sensitivity"],
            out / "froc.png",
            cpm=result["cpm"],
            operating_points={float(k): v for k, v in result["sensitivities"].items()},
            title=f"FROC: {result['num_scans']} scans, {result['num_nodules']} nodules",
        )
        atomic_write_json(out / "froc.json", result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The short text summary printed by the command: counts, sensitivity per FP rate, CPM (and intervals)."""
    ci = result.get("bootstrap") or {}
    ci_sens = ci.get("sensitivities") or {}
    level = f"{100 * ci['confidence']:g}% CI" if ci else ""

    def interval(bounds: Any) -> str:
        return f"  [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""

    lines = [
        f"FROC over {result['num_scans']} scans, {result['num_nodules']} nodules, {result['num_findings']} findings: "
        f"{result['num_tp']} nodules detected, {result['num_fp']} false positives, "
        f"{result['num_ignored_duplicate'] + result['num_ignored_excluded']} ignored",
        f"  {'FPs/scan':>8}  {'sensitivity':>11}" + (f"  {level}" if level else ""),
    ]
    for rate in result["fp_rates"]:
        key = rate_key(rate)
        lines.append(f"  {key:>8}  {result['sensitivities'][key]:>11.3f}" + interval(ci_sens.get(key)))
    lines.append(f"  {'CPM':>8}  {result['cpm']:>11.3f}" + interval(ci.get("cpm")))
    op = result.get("operating_point")
    if op:
        lines.append(
            f"at the operating threshold {op['threshold']:.3g}: sensitivity {op['sensitivity']:.3f}, "
            f"{op['fps_per_scan']:.2f} false positives per scan"
        )
    scan = result.get("per_scan") or {}
    if scan:
        auc = "undefined" if scan.get("auc") is None else f"{scan['auc']:.3f}"
        lines.append(
            f"per scan (volume score, has a nodule): AUC {auc} over {scan['num_with_nodules']} scans with and "
            f"{scan['num_without_nodules']} without nodules"
        )
    return "\n".join(lines)
