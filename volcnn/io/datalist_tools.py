"""Building and checking datalists: LUNA16 and plain-CSV importers, and a whole-datalist checker.

The importers write the DESIGN.md datalist format (``name``, ``description``, ``labels``, ``training`` /
``validation`` / ``test``) atomically, split **by patient** (deterministic from the seed, stratified so each
split gets positives when there are enough), and return a JSON-able summary. They raise
:class:`~volcnn.io.datalist.DatalistError` on bad input instead of printing or exiting, so that the CLI decides
how to report.

LUNA16 CSVs give world coordinates in LPS millimetres (the DICOM / ITK convention); datalists use RAS (the
NIfTI convention), so ``x`` and ``y`` change sign on import.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.io.atomic import atomic_write_json
from volcnn.io.datalist import DatalistError, read_datalist_json

__all__ = [
    "SECTIONS",
    "LUNA16_LABELS",
    "CheckReport",
    "from_luna16",
    "from_csv",
    "check_datalist",
    "split_patients",
]

logger = logging.getLogger(__name__)

SECTIONS = ("training", "validation", "test")
#: label names of the LUNA16 candidate task
LUNA16_LABELS = {"0": "non-nodule", "1": "nodule"}
#: bad CSV rows listed in one error message before the rest are only counted
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------- splitting


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")


def split_patients(
    strata: Mapping[str, int], *, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, str]:
    """Assign each patient to ``training`` / ``validation`` / ``test``, deterministically from ``seed``.

    Args:
        strata: patient -> stratum (e.g. the patient's highest label); each stratum is spread over the splits in
            proportion to the split sizes, rarest (highest) stratum first, and a stratum with >= 3 patients puts
            at least one in every non-empty split.
        val_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1); the two sum to < 1.
        seed: random seed; the result depends only on it, the fractions and the set of (patient, stratum).

    Returns:
        patient -> split name. With >= 3 patients and both fractions > 0 every split is non-empty; training
        always keeps at least one patient.
    """
    _check_fractions(val_fraction, test_fraction)
    patients = sorted(strata)
    n = len(patients)
    quota = {"validation": round(n * val_fraction), "test": round(n * test_fraction)}
    for name, frac in (("validation", val_fraction), ("test", test_fraction)):
        if n >= 3 and frac > 0:
            quota[name] = max(1, quota[name])
    while quota["validation"] + quota["test"] > max(n - 1, 0):
        quota["test" if quota["test"] >= quota["validation"] else "validation"] -= 1
    quota["training"] = n - quota["validation"] - quota["test"]
    perm = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    counts = dict.fromkeys(SECTIONS, 0)
    out: dict[str, str] = {}
    for stratum in sorted({strata[p] for p in patients}, reverse=True):  # rarest (positives) first
        members = [patients[int(i)] for i in perm if strata[patients[int(i)]] == stratum]
        target = {s: quota[s] / n * len(members) for s in SECTIONS}
        if len(members) >= 3:
            target = {s: max(t, 1.0) if quota[s] else t for s, t in target.items()}
        got = dict.fromkeys(SECTIONS, 0)
        for p in members:  # greedy: the split furthest below its target that still has room
            free = [s for s in ("test", "validation", "training") if counts[s] < quota[s]]
            name = max(free, key=lambda s: target[s] - got[s])
            out[p] = name
            got[name] += 1
            counts[name] += 1
    return out


def _write_split_datalist(
    out_json: str | os.PathLike[str],
    entries: list[dict[str, Any]],
    *,
    name: str,
    description: str,
    labels: Mapping[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Split ``entries`` by patient, write the datalist atomically, return per-split counts."""
    strata: dict[str, int] = {}
    for e in entries:
        strata[e["patient"]] = max(strata.get(e["patient"], 0), int(e["label"]))
    assignment = split_patients(strata, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    body: dict[str, Any] = {"name": name, "description": description, "labels": dict(labels)}
    for section in SECTIONS:
        body[section] = [e for e in entries if assignment[e["patient"]] == section]
    atomic_write_json(out_json, body)
    logger.info("wrote %s: %s", out_json, {s: len(body[s]) for s in SECTIONS})
    return {s: _count(body[s], labels) for s in SECTIONS}


def _count(entries: Iterable[Any], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``{"entries", "patients", "images", "labels": {label: n}}`` of a list of datalist entries."""
    by_label: dict[str, int] = dict.fromkeys(labels or {}, 0)
    patients, images, n = set(), set(), 0
    for e in entries:
        n += 1
        if not isinstance(e, dict):
            continue
        key = str(e.get("label"))
        by_label[key] = by_label.get(key, 0) + 1
        images.add(e.get("image"))
        patients.add(e.get("patient", e.get("image")))
    return {"entries": n, "patients": len(patients), "images": len(images), "labels": by_label}


# --------------------------------------------------------------------------------------------- CSV helpers


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Rows of a CSV as ``(line_number, row)``; raises :class:`DatalistError` on a missing file or column."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                raise DatalistError(f"{path}: missing column(s) {missing}; header is {header}")
            rows = []
            for row in reader:
                if not any((v or "").strip() for k, v in row.items() if k is not None):
                    continue  # blank line
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatalistError(f"{path}: cannot read CSV ({e})") from e
    return header, rows


def _raise_row_errors(path: Path, errors: list[str]) -> None:
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise DatalistError(f"{path}: {len(errors)} bad row(s):\n  {listed}{more}")


def _parse_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not an integer") from None
        if not f.is_integer():
            raise ValueError(f"{what} {value!r} is not an integer") from None
        return int(f)


def _parse_float(value: str, what: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} {value!r} is not finite")
    return f


def _rel(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators) when inside it, else absolute."""
    for p, b in ((Path(os.path.abspath(path)), Path(os.path.abspath(base))), (path.resolve(), base.resolve())):
        try:
            return p.relative_to(b).as_posix()
        except ValueError:
            continue
    return str(Path(os.path.abspath(path)))


# --------------------------------------------------------------------------------------------- LUNA16


def _index_images(image_dir: Path, suffixes: Sequence[str]) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """seriesuid -> image path under ``image_dir`` (any depth), and the seriesuids found more than once.

    A file ``<uid><suffix>`` counts for each suffix (earlier suffixes win within one folder); a folder named
    ``<uid>`` that holds files counts as a DICOM series.
    """
    found: dict[str, list[tuple[int, Path]]] = {}
    seen: set[str] = set()
    for root, dirs, files in os.walk(image_dir, followlinks=True):
        seen.add(os.path.realpath(root))
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in seen)  # no symlink loops
        rootp = Path(root)
        local: dict[str, tuple[int, Path]] = {}
        for fname in files:
            for rank, suffix in enumerate(suffixes):
                if fname.endswith(suffix) and len(fname) > len(suffix):
                    uid = fname[: -len(suffix)]
                    if uid not in local or rank < local[uid][0]:
                        local[uid] = (rank, rootp / fname)
                    break
        if rootp != image_dir and files and not any(f.endswith(tuple(suffixes)) for f in files):
            local.setdefault(rootp.name, (len(suffixes), rootp))  # a DICOM series folder
        for uid, hit in local.items():
            found.setdefault(uid, []).append(hit)
    index = {uid: hits[0][1] for uid, hits in found.items()}
    dups = {uid: [h[1] for h in hits] for uid, hits in found.items() if len(hits) > 1}
    return index, dups


def from_luna16(
    candidates_csv: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    annotations_csv: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    image_suffixes: Sequence[str] = (".mhd", ".nii.gz", ".nii"),
    skip_missing: bool = False,
    dataset_dir: str | os.PathLike[str] | None = None,
    name: str = "luna16",
) -> dict[str, Any]:
    """Build a candidate-mode datalist from LUNA16 ``candidates.csv`` (and optionally ``annotations.csv``).

    One entry per candidate row: ``image`` (``<seriesuid><suffix>`` found in ``image_dir`` or any subfolder, as
    LUNA16's ``subset0..9``, or a DICOM folder named ``<seriesuid>``), ``label`` (the ``class`` column),
    ``center`` in RAS mm (``(-coordX, -coordY, coordZ)`` of the LPS CSV), ``patient`` (the optional ``patient``
    column, else the seriesuid: LUNA16 has one scan per patient) and ``case`` (the seriesuid). With
    ``annotations_csv``, a class-1 candidate within the radius of an annotation of its series also gets that
    (nearest) annotation's ``diameter_mm``.

    Args:
        candidates_csv: columns ``seriesuid,coordX,coordY,coordZ,class[,patient]``, LPS mm.
        image_dir: folder searched (recursively) for the images.
        out_json: the datalist written (atomically).
        annotations_csv: columns ``seriesuid,coordX,coordY,coordZ,diameter_mm``, LPS mm.
        val_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1); the two sum to < 1.
        seed: split seed.
        image_suffixes: file endings tried, in order of preference.
        skip_missing: drop the rows whose image is missing or ambiguous (they are still listed in the summary's
            ``problems``) instead of raising.
        dataset_dir: the folder ``image`` paths are written relative to (default ``image_dir``); pass the same
            folder as ``dataset_dir`` when loading the datalist.
        name: the datalist's ``name``.

    Returns:
        Summary: ``out_json``, ``dataset_dir``, ``rows``, ``entries``, ``series`` (found), ``splits`` (per split:
        entries, patients, images, per-label counts), ``with_diameter``, ``skipped_rows`` and ``problems``.

    Raises:
        DatalistError: unreadable CSV, missing columns or bad rows (all listed with line numbers); images missing
            or ambiguous (all listed) unless ``skip_missing``; no entry left.
        ValueError: bad fractions.
    """
    _check_fractions(val_fraction, test_fraction)
    cand_path, img_dir = Path(candidates_csv), Path(image_dir)
    base = Path(dataset_dir) if dataset_dir is not None else img_dir
    if not img_dir.is_dir():
        raise DatalistError(f"{img_dir}: image folder not found")
    header, rows = _read_csv(cand_path, ["seriesuid", "coordX", "coordY", "coordZ", "class"])
    has_patient = "patient" in header
    errors: list[str] = []
    parsed: list[tuple[int, str, int, list[float], str]] = []
    for line, row in rows:
        try:
            uid = row["seriesuid"]
            if not uid:
                raise ValueError("empty seriesuid")
            label = _parse_int(row["class"], "class")
            if label < 0:
                raise ValueError(f"class {label} is negative")
            lps = [_parse_float(row[c], c) for c in ("coordX", "coordY", "coordZ")]
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        patient = row.get("patient") if has_patient else None
        center = [-lps[0] + 0.0, -lps[1] + 0.0, lps[2] + 0.0]  # LPS -> RAS; + 0.0 turns -0.0 into 0.0
        parsed.append((line, uid, label, center, patient or uid))
    _raise_row_errors(cand_path, errors)

    annotations = _read_luna16_annotations(Path(annotations_csv)) if annotations_csv is not None else {}

    index, dups = _index_images(img_dir, tuple(image_suffixes))
    problems: list[str] = []
    bad_uids: set[str] = set()
    rows_of: dict[str, list[int]] = {}
    for line, uid, *_ in parsed:
        rows_of.setdefault(uid, []).append(line)
    for uid, lines in rows_of.items():
        where = f"{cand_path}: seriesuid {uid} ({len(lines)} row(s), first at line {lines[0]})"
        if uid in dups:
            problems.append(f"{where}: image is ambiguous, found at {[str(p) for p in dups[uid]]}")
            bad_uids.add(uid)
        elif uid not in index:
            problems.append(f"{where}: no image {uid}{{{','.join(image_suffixes)}}} or DICOM folder in {img_dir}")
            bad_uids.add(uid)
    if problems and not skip_missing:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DatalistError(
            f"{cand_path}: {len(problems)} series without a usable image (skip_missing drops them):\n  {listed}{more}"
        )
    for p in problems:
        logger.warning("skipped: %s", p)

    entries: list[dict[str, Any]] = []
    with_diameter = 0
    for _line, uid, label, center, patient in parsed:
        if uid in bad_uids:
            continue
        entry: dict[str, Any] = {"image": _rel(index[uid], base), "label": label, "center": center}
        entry |= {"patient": patient, "case": uid}
        if label == 1 and uid in annotations:
            diameter = _match_annotation(center, annotations[uid])
            if diameter is not None:
                entry["diameter_mm"] = diameter
                with_diameter += 1
        entries.append(entry)
    if not entries:
        raise DatalistError(f"{cand_path}: no candidate left to write (rows: {len(parsed)}, problems: {len(problems)})")
    desc = f"LUNA16 candidates from {cand_path.name}; centers in RAS mm; split by patient (seed {seed})"
    splits = _write_split_datalist(
        out_json,
        entries,
        name=name,
        description=desc,
        labels=LUNA16_LABELS,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    return {
        "out_json": str(out_json),
        "dataset_dir": str(base),
        "rows": len(parsed),
        "entries": len(entries),
        "series": len(rows_of) - len(bad_uids),
        "splits": splits,
        "with_diameter": with_diameter,
        "skipped_rows": len(parsed) - len(entries),
        "problems": problems,
    }


def _read_luna16_annotations(path: Path) -> dict[str, list[tuple[np.ndarray, float]]]:
    """seriesuid -> [(RAS centre, diameter mm)] from a LUNA16 ``annotations.csv``."""
    _, rows = _read_csv(path, ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    errors = []
    for line, row in rows:
        try:
            lps = [_parse_float(row[c], c) for c in ("coordX", "coordY", "coordZ")]
            d = _parse_float(row["diameter_mm"], "diameter_mm")
            if d <= 0:
                raise ValueError(f"diameter_mm {d} is not positive")
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        out.setdefault(row["seriesuid"], []).append((np.array([-lps[0], -lps[1], lps[2]]), d))
    _raise_row_errors(path, errors)
    return out


def _match_annotation(center: Sequence[float], annotations: list[tuple[np.ndarray, float]]) -> float | None:
    """Diameter of the nearest annotation whose sphere contains ``center``, else None."""
    best: tuple[float, float] | None = None
    c = np.asarray(center, dtype=np.float64)
    for a_center, diameter in annotations:
        dist = float(np.linalg.norm(c - a_center))
        if dist <= diameter / 2 and (best is None or dist < best[0]):
            best = (dist, diameter)
    return None if best is None else best[1]


# --------------------------------------------------------------------------------------------- plain CSV


def _label_names(labels: Mapping[Any, str] | Sequence[str] | None, present: Iterable[int]) -> dict[str, str]:
    if labels is None:
        return {str(k): str(k) for k in sorted(set(present))}
    if isinstance(labels, Mapping):
        out = {}
        for k, v in labels.items():
            try:
                out[str(int(k))] = str(v)
            except (TypeError, ValueError) as e:
                raise ValueError(f"label keys must be integers, got {k!r}") from e
        return out
    return {str(i): str(v) for i, v in enumerate(labels)}


def from_csv(
    csv_path: str | os.PathLike[str],
    out_json: str | os.PathLike[str],
    *,
    dataset_dir: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    labels: Mapping[Any, str] | Sequence[str] | None = None,
    skip_missing: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Build a datalist from a CSV with columns ``image,label[,patient][,center_x,center_y,center_z]``.

    ``image`` is a NIfTI / MetaImage file or a DICOM folder, relative to ``dataset_dir`` (default: the CSV's
    folder) or absolute; it is written relative to ``dataset_dir`` when inside it. ``patient`` defaults to the
    image path. The centre columns (RAS mm) come all three or not at all; a row with all three empty is in
    volume mode.

    Args:
        csv_path: the CSV.
        out_json: the datalist written (atomically).
        dataset_dir: the folder images are relative to.
        val_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1); the two sum to < 1.
        seed: split seed.
        labels: label names, as ``{0: "benign", 1: "malignant"}`` or ``["benign", "malignant"]``; a row whose
            label is not among them is an error. Default: each label present, named by its number.
        skip_missing: drop rows whose image does not exist (listed in ``problems``) instead of raising.
        name: the datalist's ``name`` (default: the CSV's stem).

    Returns:
        Summary: ``out_json``, ``dataset_dir``, ``rows``, ``entries``, ``splits`` (per split: entries, patients,
        images, per-label counts), ``skipped_rows`` and ``problems``.

    Raises:
        DatalistError: unreadable CSV, missing columns, bad rows (non-integer or unknown label, empty image, bad
            or partial centre; all listed with line numbers), missing images unless ``skip_missing``.
        ValueError: bad fractions or label keys.
    """
    _check_fractions(val_fraction, test_fraction)
    path = Path(csv_path)
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    header, rows = _read_csv(path, ["image", "label"])
    center_cols = ("center_x", "center_y", "center_z")
    present_centre_cols = [c for c in center_cols if c in header]
    if present_centre_cols and len(present_centre_cols) != 3:
        raise DatalistError(f"{path}: centre columns must be all of {list(center_cols)}, got {present_centre_cols}")
    declared = _label_names(labels, []) if labels is not None else None
    errors: list[str] = []
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        try:
            image = row["image"]
            if not image:
                raise ValueError("empty image")
            label = _parse_int(row["label"], "label")
            if declared is not None and str(label) not in declared:
                raise ValueError(f"label {label} is not among the declared labels {sorted(declared)}")
            entry: dict[str, Any] = {"image": image, "label": label}
            if present_centre_cols:
                values = [row[c] for c in center_cols]
                if any(values):
                    if not all(values):
                        raise ValueError(f"partial centre {values}; give all of {list(center_cols)} or none")
                    entry["center"] = [_parse_float(v, c) for v, c in zip(values, center_cols, strict=True)]
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        img = Path(image).expanduser()
        resolved = img if img.is_absolute() else base / img
        if not resolved.exists():
            problems.append(f"{path}: line {line}: image {image} not found (looked for {resolved})")
            continue
        entry["image"] = _rel(resolved, base) if img.is_absolute() else img.as_posix()
        entry["patient"] = row.get("patient") or entry["image"]
        entries.append(entry)
    _raise_row_errors(path, errors)
    if problems and not skip_missing:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DatalistError(f"{path}: {len(problems)} missing image(s) (skip_missing drops them):\n  {listed}{more}")
    for p in problems:
        logger.warning("skipped: %s", p)
    if not entries:
        raise DatalistError(f"{path}: no entry to write (rows: {n_rows}, problems: {len(problems)})")
    label_names = declared if declared is not None else _label_names(None, (e["label"] for e in entries))
    splits = _write_split_datalist(
        out_json,
        entries,
        name=name or path.stem,
        description=f"from {path.name}; split by patient (seed {seed})",
        labels=label_names,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    return {
        "out_json": str(out_json),
        "dataset_dir": str(base),
        "rows": n_rows,
        "entries": len(entries),
        "splits": splits,
        "skipped_rows": n_rows - len(entries),
        "problems": problems,
    }


# --------------------------------------------------------------------------------------------- checking


@dataclass
class CheckReport:
    """What :func:`check_datalist` found.

    Attributes:
        datalist: the checked file.
        dataset_dir: the folder relative image paths were resolved against.
        problems: one line per problem, each naming the section, the entry index and/or image, and the problem.
        counts: per section (and ``"total"``): ``entries``, ``patients``, ``images``, ``labels`` {label: n}.
        labels: the declared label names.
        images_loaded: how many distinct images were loaded.
    """

    datalist: str
    dataset_dir: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    images_loaded: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def format(self) -> str:
        """A readable multi-line text: a counts table (sections x labels) and the problems."""
        label_keys = list(self.labels)
        for sec in self.counts.values():
            label_keys += [k for k in sec.get("labels", {}) if k not in label_keys]
        heads = [f"{k}:{self.labels[k]}" if k in self.labels else f"{k}:?" for k in label_keys]
        cols = ["section", *heads, "entries", "patients", "images"]
        table = []
        for sec_name, sec in self.counts.items():
            by = sec.get("labels", {})
            table.append(
                [sec_name, *(str(by.get(k, 0)) for k in label_keys)]
                + [str(sec.get("entries", 0)), str(sec.get("patients", 0)), str(sec.get("images", 0))]
            )
        widths = [max(len(r[i]) for r in [cols, *table]) for i in range(len(cols))]

        def fmt(r: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )

        lines = [f"datalist: {self.datalist} (dataset_dir {self.dataset_dir})", fmt(cols)]
        lines += [fmt(r) for r in table]
        lines.append(f"images loaded: {self.images_loaded}")
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_datalist(
    datalist_json: str | os.PathLike[str],
    dataset_dir: str | os.PathLike[str] | None = None,
    *,
    load_images: bool = True,
    progress: bool = False,
) -> CheckReport:
    """Check a whole datalist and list every problem found (it keeps going past each one).

    Checks: the JSON is a datalist with declared ``labels``; every entry has an ``image``; every image exists
    and (with ``load_images``) loads through :func:`~volcnn.io.volume.load_volume` (each image once however many
    entries use it); labels are integers among the declared keys; centres are three finite numbers lying
    inside their volume (world RAS mm -> voxel through the affine, within the array's extent); no patient
    (or, without ``patient``, no image) appears in two sections.

    Args:
        datalist_json: the datalist.
        dataset_dir: the folder relative image paths are resolved against (default: the JSON's folder).
        load_images: load every image (needed to check centres); without it, only existence is checked.
        progress: show a tqdm bar over the images.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when there is any problem.

    Raises:
        DatalistError: the JSON cannot be read or is not an object (nothing else can be checked then).
    """
    path = Path(datalist_json)
    data = read_datalist_json(path)
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    report = CheckReport(datalist=str(path), dataset_dir=str(base))
    problems = report.problems
    raw_labels = data.get("labels")
    if isinstance(raw_labels, dict) and raw_labels:
        report.labels = {str(k): str(v) for k, v in raw_labels.items()}
    else:
        problems.append(f'{path}: no \'labels\' declared (a non-empty object such as {{"0": ..., "1": ...}})')
    present = [s for s in SECTIONS if s in data]
    if not present:
        problems.append(f"{path}: none of the sections {list(SECTIONS)}")

    # per image: the entries using it, with their centres to check once the volume is loaded
    uses: dict[Path, list[tuple[str, int, list[float] | None]]] = {}
    shown: dict[Path, str] = {}
    sections_of: dict[str, set[str]] = {}
    valid_entries: dict[str, list[dict[str, Any]]] = {}
    for section in present:
        entries = data[section]
        if not isinstance(entries, list):
            problems.append(f"{section}: must be a list, got {type(entries).__name__}")
            continue
        valid_entries[section] = []
        for i, item in enumerate(entries):
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or not item["image"]:
                problems.append(f"{section}[{i}]: each entry needs an 'image' path")
                continue
            where = f"{section}[{i}] {item['image']}"
            valid_entries[section].append(item)
            if "label" in item:
                lab = item["label"]
                if isinstance(lab, bool) or not isinstance(lab, int):
                    problems.append(f"{where}: label {lab!r} is not an integer")
                elif report.labels and str(lab) not in report.labels:
                    problems.append(f"{where}: label {lab} is not among the declared labels {sorted(report.labels)}")
            center = _entry_center(item, where, problems)
            img = Path(item["image"]).expanduser()
            resolved = img if img.is_absolute() else base / img
            uses.setdefault(resolved, []).append((section, i, center))
            shown.setdefault(resolved, item["image"])
            patient = item.get("patient")
            key = f"patient {patient}" if patient is not None else f"image {item['image']}"
            sections_of.setdefault(key, set()).add(section)
    for key, secs in sorted(sections_of.items()):
        if len(secs) > 1:
            problems.append(f"{key} is in more than one section: {[s for s in SECTIONS if s in secs]}")

    items: Iterable[tuple[Path, list[tuple[str, int, list[float] | None]]]] = uses.items()
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(list(items), desc="check images", unit="image")
    for resolved, used_by in items:
        first_sec, first_i, _ = used_by[0]
        more = f" (+{len(used_by) - 1} more entries)" if len(used_by) > 1 else ""
        where = f"{first_sec}[{first_i}]{more} {shown[resolved]}"
        if not resolved.exists():
            problems.append(f"{where}: image not found (looked for {resolved})")
            continue
        if not load_images:
            continue
        if _check_image(resolved, used_by, where, shown[resolved], problems):
            report.images_loaded += 1

    for section, entries in valid_entries.items():
        report.counts[section] = _count(entries, report.labels)
    report.counts["total"] = _count([e for es in valid_entries.values() for e in es], report.labels)
    logger.info("checked %s: %d problem(s)", path, len(problems))
    return report


def _entry_center(item: dict[str, Any], where: str, problems: list[str]) -> list[float] | None:
    center = item.get("center")
    if center is None:
        return None
    if (
        not isinstance(center, list | tuple)
        or len(center) != 3
        or not all(isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) for c in center)
    ):
        problems.append(f"{where}: center must be three finite numbers [x, y, z] in RAS mm, got {center!r}")
        return None
    return [float(c) for c in center]


def _check_image(
    resolved: Path,
    used_by: list[tuple[str, int, list[float] | None]],
    where: str,
    shown: str,
    problems: list[str],
) -> bool:
    """Load one image and check every centre that uses it; False when it does not load."""
    from volcnn.io.volume import load_volume
    from volcnn.transforms.geometry import world_to_voxel

    try:
        vol = load_volume(resolved)
    except Exception as e:  # any reader failure is a problem to list, not a crash
        problems.append(f"{where}: cannot load ({type(e).__name__}: {e})")
        return False
    shape = np.asarray(vol.array.shape[:3], dtype=np.float64)
    centred = [(s, i, c) for s, i, c in used_by if c is not None]
    if not centred:
        return True
    vox = world_to_voxel(vol.affine, np.asarray([c for _, _, c in centred]))
    inside = np.all((vox >= -0.5) & (vox <= shape - 0.5), axis=1)
    for (section, i, center), v, ok in zip(centred, vox, inside, strict=True):
        if not ok:
            problems.append(
                f"{section}[{i}] {shown}: center {center} RAS mm is outside the volume "
                f"(voxel {np.round(v, 1).tolist()}, shape {vol.array.shape[:3]})"
            )
    return True
