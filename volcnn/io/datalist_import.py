"""Building datalists: the LUNA16 and plain-CSV importers.

The importers write the DESIGN.md datalist format (``name``, ``description``, ``labels``, ``training`` /
``validation`` / ``test``) atomically, split **by patient** (deterministic from the seed, stratified so each
split gets positives when there are enough), and return a JSON-able summary. They raise
:class:`~volcnn.io.datalist.DatalistError` on bad input instead of printing or exiting, so that the CLI decides
how to report.

LUNA16 CSVs give world coordinates in LPS millimetres (the DICOM / ITK convention); datalists use RAS (the
NIfTI convention), so ``x`` and ``y`` change sign on import.

The plain-CSV importer also takes extra columns as clinical features (:mod:`volcnn.io.features`): they become
each entry's ``features`` and the datalist's top-level declaration, their types given or inferred from the cells.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.io.datalist import DatalistError
from volcnn.io.datalist_split import (
    LUNA16_LABELS,
    MAX_LISTED,
    check_fractions,
    parse_float,
    parse_int,
    raise_row_errors,
    read_csv_rows,
    relative_path,
    write_split_datalist,
)
from volcnn.io.features import FEATURE_TYPES, FeatureDecl, _csv_value, parse_feature_spec

__all__ = ["from_luna16", "from_csv", "parse_feature_columns"]

logger = logging.getLogger(__name__)


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
    check_fractions(val_fraction, test_fraction)
    cand_path, img_dir = Path(candidates_csv), Path(image_dir)
    base = Path(dataset_dir) if dataset_dir is not None else img_dir
    if not img_dir.is_dir():
        raise DatalistError(f"{img_dir}: image folder not found")
    header, rows = read_csv_rows(cand_path, ["seriesuid", "coordX", "coordY", "coordZ", "class"])
    has_patient = "patient" in header
    errors: list[str] = []
    parsed: list[tuple[int, str, int, list[float], str]] = []
    for line, row in rows:
        try:
            uid = row["seriesuid"]
            if not uid:
                raise ValueError("empty seriesuid")
            label = parse_int(row["class"], "class")
            if label < 0:
                raise ValueError(f"class {label} is negative")
            lps = [parse_float(row[c], c) for c in ("coordX", "coordY", "coordZ")]
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        patient = row.get("patient") if has_patient else None
        center = [-lps[0] + 0.0, -lps[1] + 0.0, lps[2] + 0.0]  # LPS -> RAS; + 0.0 turns -0.0 into 0.0
        parsed.append((line, uid, label, center, patient or uid))
    raise_row_errors(cand_path, errors)

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
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
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
        entry: dict[str, Any] = {"image": relative_path(index[uid], base), "label": label, "center": center}
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
    splits = write_split_datalist(
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
    _, rows = read_csv_rows(path, ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    errors = []
    for line, row in rows:
        try:
            lps = [parse_float(row[c], c) for c in ("coordX", "coordY", "coordZ")]
            d = parse_float(row["diameter_mm"], "diameter_mm")
            if d <= 0:
                raise ValueError(f"diameter_mm {d} is not positive")
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        out.setdefault(row["seriesuid"], []).append((np.array([-lps[0], -lps[1], lps[2]]), d))
    raise_row_errors(path, errors)
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


#: CSV columns with a meaning of their own in :func:`from_csv`, never clinical features
_RESERVED_COLUMNS = ("image", "label", "patient", "center_x", "center_y", "center_z")


def parse_feature_columns(features: str | Sequence[str]) -> dict[str, str | None]:
    """The feature columns asked for, ``{column: type}`` in the order given (type None: inferred from the cells).

    Args:
        features: ``"age,sex:categorical,smoker:binary"`` or the same items as a sequence; each item is a column
            name, optionally ``:numeric``, ``:binary`` or ``:categorical``.

    Raises:
        ValueError: an empty name, an unknown type, a column named twice, or one of the columns :func:`from_csv`
            reads for itself (``image``, ``label``, ``patient``, ``center_*``).
    """
    items = features.split(",") if isinstance(features, str) else list(features)
    out: dict[str, str | None] = {}
    for item in items:
        col, sep, kind = (part.strip() for part in str(item).partition(":"))
        if not col:
            raise ValueError(f"feature columns are 'name' or 'name:type', got {item!r} in {features!r}")
        if sep and kind not in FEATURE_TYPES:
            raise ValueError(f"feature {col!r}: type must be one of {list(FEATURE_TYPES)}, got {kind!r}")
        if col in out:
            raise ValueError(f"feature column {col!r} is named twice")
        if col in _RESERVED_COLUMNS:
            raise ValueError(f"column {col!r} is read as the entry's {col}, it cannot also be a feature")
        out[col] = kind if sep else None
    if not out:
        raise ValueError("no feature column given")
    return out


def _is_nan_cell(name: str, text: str) -> bool:
    """Whether a CSV cell spells NaN (as :mod:`volcnn.io.features` reads cells)."""
    try:
        value = _csv_value(FeatureDecl(name=name, type="numeric"), text)
    except ValueError:
        return False
    return isinstance(value, float) and math.isnan(value)


def _parses_as(decl: FeatureDecl, cells: Sequence[str]) -> bool:
    try:
        for c in cells:
            _csv_value(decl, c)
    except ValueError:
        return False
    return True


def _feature_decl(name: str, kind: str | None, cells: Sequence[str], where: str) -> FeatureDecl:
    """The declaration of feature column ``name`` from its cells (empty: missing); ``kind`` None infers it.

    Inference: only 0/1/true/false/yes/no -> binary; else all numbers -> numeric; else categorical with the sorted
    distinct cells as its values (2+ needed).

    Raises:
        DatalistError: naming ``where`` and the column, when the type cannot be inferred or a categorical has fewer
            than two values.
    """
    present = [c for c in cells if c]
    if kind is None:
        if not present:
            raise DatalistError(
                f"{where}: feature column {name!r} is empty in every row: its type cannot be inferred "
                f"(give it as {name}:numeric or {name}:binary)"
            )
        kind = next((k for k in ("binary", "numeric") if _parses_as(FeatureDecl(name=name, type=k), present)), None)
        kind = kind or "categorical"
    if kind != "categorical":
        return FeatureDecl(name=name, type=kind)
    values = sorted(set(present))
    if len(values) < 2:
        raise DatalistError(f"{where}: feature column {name!r}: a categorical needs 2+ distinct values, got {values}")
    return FeatureDecl(name=name, type=kind, values=tuple(values))


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
    features: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build a datalist from a CSV with columns ``image,label[,patient][,center_x,center_y,center_z]``.

    ``image`` is a NIfTI / MetaImage file or a DICOM folder, relative to ``dataset_dir`` (default: the CSV's
    folder) or absolute; it is written relative to ``dataset_dir`` when inside it. ``patient`` defaults to the
    image path. The centre columns (RAS mm) come all three or not at all; a row with all three empty is in
    volume mode.

    With ``features``, the named extra columns become each entry's ``features`` (an empty cell is missing:
    ``null``) and the datalist's top-level ``features`` declaration. A column's type is the one given
    (``name:numeric|binary|categorical``) or inferred from its non-empty cells: only 0/1/true/false/yes/no ->
    ``binary`` (written 0/1); else all numbers -> ``numeric``; else ``categorical`` with the sorted distinct cells
    as its values. Inference sees only the rows written (not those dropped by ``skip_missing``); a 0/1 count
    needs ``:numeric``.

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
        features: the feature columns, ``"age,sex:categorical"`` or ``["age", "sex:categorical"]`` (see
            :func:`parse_feature_columns`).

    Returns:
        Summary: ``out_json``, ``dataset_dir``, ``rows``, ``entries``, ``splits`` (per split: entries, patients,
        images, per-label counts), ``skipped_rows`` and ``problems``; with ``features``, also ``features`` (the
        declaration written).

    Raises:
        DatalistError: unreadable CSV, missing columns (feature columns included), bad rows (non-integer or unknown
            label, empty image, bad or partial centre, a NaN or a value not of its feature's type; all listed with
            line numbers and features), missing images unless ``skip_missing``, a feature column whose type cannot
            be inferred or a categorical with one value.
        ValueError: bad fractions, label keys or feature columns.
    """
    check_fractions(val_fraction, test_fraction)
    path = Path(csv_path)
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    feature_types = parse_feature_columns(features) if features is not None else {}
    header, rows = read_csv_rows(path, ["image", "label"])
    absent = [c for c in feature_types if c not in header]
    if absent:
        raise DatalistError(f"{path}: feature column(s) {absent} not in the CSV; header is {header}")
    center_cols = ("center_x", "center_y", "center_z")
    present_centre_cols = [c for c in center_cols if c in header]
    if present_centre_cols and len(present_centre_cols) != 3:
        raise DatalistError(f"{path}: centre columns must be all of {list(center_cols)}, got {present_centre_cols}")
    declared = _label_names(labels, []) if labels is not None else None
    errors: list[str] = []
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    feature_cells: list[tuple[int, dict[str, str]]] = []  # per entry: its line and its feature cells
    n_rows = 0
    for line, row in rows:
        n_rows += 1
        try:
            image = row["image"]
            if not image:
                raise ValueError("empty image")
            label = parse_int(row["label"], "label")
            if declared is not None and str(label) not in declared:
                raise ValueError(f"label {label} is not among the declared labels {sorted(declared)}")
            entry: dict[str, Any] = {"image": image, "label": label}
            if present_centre_cols:
                values = [row[c] for c in center_cols]
                if any(values):
                    if not all(values):
                        raise ValueError(f"partial centre {values}; give all of {list(center_cols)} or none")
                    entry["center"] = [parse_float(v, c) for v, c in zip(values, center_cols, strict=True)]
            cells = {col: row.get(col, "") for col in feature_types}
            nan = [
                f"feature {col!r}: {v!r} is not a value (leave the cell empty for a missing value)"
                for col, v in cells.items()
                if _is_nan_cell(col, v)
            ]
            if nan:
                raise ValueError("; ".join(nan))
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        img = Path(image).expanduser()
        resolved = img if img.is_absolute() else base / img
        if not resolved.exists():
            problems.append(f"{path}: line {line}: image {image} not found (looked for {resolved})")
            continue
        entry["image"] = relative_path(resolved, base) if img.is_absolute() else img.as_posix()
        entry["patient"] = row.get("patient") or entry["image"]
        entries.append(entry)
        feature_cells.append((line, cells))
    raise_row_errors(path, errors)
    if problems and not skip_missing:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatalistError(f"{path}: {len(problems)} missing image(s) (skip_missing drops them):\n  {listed}{more}")
    for p in problems:
        logger.warning("skipped: %s", p)
    if not entries:
        raise DatalistError(f"{path}: no entry to write (rows: {n_rows}, problems: {len(problems)})")
    declaration = _attach_csv_features(path, entries, feature_cells, feature_types) if feature_types else None
    label_names = declared if declared is not None else _label_names(None, (e["label"] for e in entries))
    splits = write_split_datalist(
        out_json,
        entries,
        name=name or path.stem,
        description=f"from {path.name}; split by patient (seed {seed})",
        labels=label_names,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        features=declaration,
    )
    summary = {
        "out_json": str(out_json),
        "dataset_dir": str(base),
        "rows": n_rows,
        "entries": len(entries),
        "splits": splits,
        "skipped_rows": n_rows - len(entries),
        "problems": problems,
    }
    if declaration is not None:
        summary["features"] = declaration
    return summary


def _attach_csv_features(
    path: Path,
    entries: list[dict[str, Any]],
    feature_cells: list[tuple[int, dict[str, str]]],
    feature_types: Mapping[str, str | None],
) -> dict[str, Any]:
    """Declare the feature columns (types given or inferred) and set each entry's ``features``; the declaration.

    Raises:
        DatalistError: a column whose type cannot be inferred or a categorical with one value (all columns listed);
            a cell that is not a value of its feature's type (all listed with line and feature).
    """
    decls, problems = [], []
    for col, kind in feature_types.items():
        try:
            decls.append(_feature_decl(col, kind, [cells[col] for _, cells in feature_cells], str(path)))
        except DatalistError as e:
            problems.append(str(e))
    if problems:
        raise DatalistError("\n".join(problems))
    spec = parse_feature_spec({d.name: d.to_json() for d in decls}, f"{path}: features")
    errors: list[str] = []
    for entry, (line, cells) in zip(entries, feature_cells, strict=True):
        values: dict[str, Any] = {}
        for d in spec.decls:
            try:
                values[d.name] = _csv_value(d, cells[d.name])
            except ValueError as e:
                errors.append(f"line {line}: feature {d.name!r}: {e}")
                values[d.name] = None
        errors += spec.check(values, f"line {line}")
        entry["features"] = values
    raise_row_errors(path, errors)
    return spec.to_json()


# --------------------------------------------------------------------------------------------- checking
