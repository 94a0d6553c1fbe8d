"""Patient-level splits and the CSV helpers shared by the datalist importers.

Splits are **by patient** (deterministic from the seed, stratified so each split gets positives when there are
enough), so that no patient's scans are in two splits.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_json
from volcnn.io.datalist import SECTIONS, DatalistError

__all__ = [
    "SECTIONS",
    "LUNA16_LABELS",
    "MAX_LISTED",
    "split_patients",
    "check_fractions",
    "write_split_datalist",
    "count_labels",
    "read_csv_rows",
    "raise_row_errors",
    "parse_int",
    "parse_float",
    "relative_path",
]

logger = logging.getLogger(__name__)

#: label names of the LUNA16 candidate task
LUNA16_LABELS = {"0": "non-nodule", "1": "nodule"}
#: bad CSV rows listed in one error message before the rest are only counted
MAX_LISTED = 20


# --------------------------------------------------------------------------------------------- splitting


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")


def split_patients(
    strata: Mapping[str, int],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    stream: int = 0xDA7A,
) -> dict[str, str]:
    """Assign each patient to ``training`` / ``validation`` / ``test``, deterministically from ``seed``.

    Args:
        strata: patient -> stratum (e.g. the patient's highest label); each stratum is spread over the splits in
            proportion to the split sizes, rarest (highest) stratum first, and a stratum with >= 3 patients puts
            at least one in every non-empty split.
        val_fraction: fraction of patients in validation, in [0, 1).
        test_fraction: fraction of patients in test, in [0, 1); the two sum to < 1.
        seed: random seed; the result depends only on it, the fractions and the set of (patient, stratum).
        stream: second word of the generator's seed, so that callers splitting for different purposes with the
            same ``seed`` draw independent permutations.

    Returns:
        patient -> split name. With >= 3 patients and both fractions > 0 every split is non-empty; training
        always keeps at least one patient.
    """
    check_fractions(val_fraction, test_fraction)
    patients = sorted(strata)
    n = len(patients)
    quota = {"validation": round(n * val_fraction), "test": round(n * test_fraction)}
    for name, frac in (("validation", val_fraction), ("test", test_fraction)):
        if n >= 3 and frac > 0:
            quota[name] = max(1, quota[name])
    while quota["validation"] + quota["test"] > max(n - 1, 0):
        quota["test" if quota["test"] >= quota["validation"] else "validation"] -= 1
    quota["training"] = n - quota["validation"] - quota["test"]
    perm = np.random.default_rng([seed, stream]).permutation(n)
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


def write_split_datalist(
    out_json: str | os.PathLike[str],
    entries: list[dict[str, Any]],
    *,
    name: str,
    description: str,
    labels: Mapping[str, str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    features: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Split ``entries`` by patient, write the datalist atomically, return per-split counts.

    ``features``, when given, is written as the top-level clinical features declaration (the entries carry their
    own ``features`` values).
    """
    strata: dict[str, int] = {}
    for e in entries:
        strata[e["patient"]] = max(strata.get(e["patient"], 0), int(e["label"]))
    assignment = split_patients(strata, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    body: dict[str, Any] = {"name": name, "description": description, "labels": dict(labels)}
    if features is not None:
        body["features"] = dict(features)
    for section in SECTIONS:
        body[section] = [e for e in entries if assignment[e["patient"]] == section]
    atomic_write_json(out_json, body)
    logger.info("wrote %s: %s", out_json, {s: len(body[s]) for s in SECTIONS})
    return {s: count_labels(body[s], labels) for s in SECTIONS}


def count_labels(entries: Iterable[Any], labels: Mapping[str, str] | None = None) -> dict[str, Any]:
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


def read_csv_rows(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
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
                extra = [v for v in row.get(None) or [] if v.strip()]  # type: ignore[call-overload]
                if extra:
                    raise DatalistError(
                        f"{path}: line {reader.line_num}: {len(extra)} more cell(s) than the header's "
                        f"{len(header)} columns ({extra[:3]}): the columns would be misread"
                    )
                rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatalistError(f"{path}: cannot read CSV ({e})") from e
    return header, rows


def raise_row_errors(path: Path, errors: list[str]) -> None:
    if errors:
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DatalistError(f"{path}: {len(errors)} bad row(s):\n  {listed}{more}")


def parse_int(value: str, what: str) -> int:
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


def parse_float(value: str, what: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} {value!r} is not finite")
    return f


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators) when inside it, else absolute."""
    for p, b in ((Path(os.path.abspath(path)), Path(os.path.abspath(base))), (path.resolve(), base.resolve())):
        try:
            return p.relative_to(b).as_posix()
        except ValueError:
            continue
    return str(Path(os.path.abspath(path)))


# --------------------------------------------------------------------------------------------- LUNA16
