"""Checking a whole datalist: images load, labels are declared, centres lie inside, no patient leaks, clinical
features are declared and well typed.

:func:`check_datalist` keeps going past every problem and lists them all in a :class:`CheckReport`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.geometry import world_to_voxel
from volcnn.io.datalist import read_datalist_json
from volcnn.io.datalist_split import SECTIONS, count_labels
from volcnn.io.features import FeatureError, FeatureSpec, parse_feature_spec
from volcnn.io.volume import load_volume

__all__ = ["CheckReport", "check_datalist"]

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """What :func:`check_datalist` found.

    Attributes:
        datalist: the checked file.
        dataset_dir: the folder relative image paths were resolved against.
        problems: one line per problem, each naming the section, the entry index and/or image, and the problem.
        counts: per section (and ``"total"``): ``entries``, ``patients``, ``images``, ``labels`` {label: n}; when
            the datalist declares features, also ``features_missing`` {feature: fraction of the section's entries
            without a value}.
        labels: the declared label names.
        features: the declared features that parsed, ``{name: declaration}`` (empty when none are declared).
        images_loaded: how many distinct images were loaded.
    """

    datalist: str
    dataset_dir: str
    problems: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    images_loaded: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def format(self) -> str:
        """A readable multi-line text: a counts table (sections x labels), the features' missing shares
        (features x sections) when features are declared, and the problems."""
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
        lines += self._format_features()
        lines.append(f"images loaded: {self.images_loaded}")
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def _format_features(self) -> list[str]:
        """The features x sections table of missing shares (percent), empty without declared features."""
        if not self.features:
            return []
        sections = [s for s, sec in self.counts.items() if "features_missing" in sec]
        cols = ["feature (missing %)", *sections]
        table = []
        for name, decl in self.features.items():
            kind = decl.get("type", "?") + (f", {decl['unit']}" if decl.get("unit") else "")
            shares = [self.counts[s]["features_missing"].get(name) for s in sections]
            table.append([f"{name} ({kind})", *("-" if v is None else f"{100 * v:.0f}%" for v in shares)])
        widths = [max(len(r[i]) for r in [cols, *table]) for i in range(len(cols))]
        return [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in [cols, *table]
        ]


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
    (or, without ``patient``, no image) appears in two sections. With a top-level ``features`` declaration
    (:mod:`volcnn.io.features`): each declared feature is well formed; each entry's ``features`` names only
    declared features with values of their type (no string for a numeric, no NaN, no undeclared category, no value
    outside a declared range); no declared feature is missing (absent or null) in every entry of a section. Without
    a declaration, an entry carrying ``features`` is a problem.

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
    declared = data.get("features") is not None
    spec, ignored = _feature_spec(data.get("features"), f"{path}: features", problems) if declared else (None, set())
    if spec is not None:
        report.features = spec.to_json()

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
            _check_entry_features(item, where, spec, ignored, declared, problems)
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
        report.counts[section] = count_labels(entries, report.labels)
        if spec is not None:
            report.counts[section]["features_missing"] = _missing_shares(entries, spec)
            for name, share in report.counts[section]["features_missing"].items():
                if share == 1.0:
                    problems.append(
                        f"{section}: feature {name!r} is missing (absent or null) in every entry of the section "
                        f"({len(entries)}): nothing to learn it from or evaluate it on"
                    )
    report.counts["total"] = count_labels([e for es in valid_entries.values() for e in es], report.labels)
    if spec is not None:
        report.counts["total"]["features_missing"] = _missing_shares(
            [e for es in valid_entries.values() for e in es], spec
        )
    logger.info("checked %s: %d problem(s)", path, len(problems))
    return report


def _feature_spec(decl: Any, where: str, problems: list[str]) -> tuple[FeatureSpec | None, set[str]]:
    """The declared features that parse, and the names whose declaration does not (one problem each).

    Values of the ignored names are not checked (their declaration is the problem); the spec is None when nothing
    parses.
    """
    try:
        return parse_feature_spec(decl, where), set()
    except FeatureError as e:
        if not isinstance(decl, Mapping) or not decl:
            problems.append(str(e))
            return None, set()
    good: dict[Any, Any] = {}
    for name, body in decl.items():
        try:
            parse_feature_spec({name: body}, where)
        except FeatureError as e:
            problems.append(str(e))
            continue
        good[name] = body
    bad = {str(n) for n in decl if n not in good}
    return (parse_feature_spec(good, where) if good else None), bad


def _check_entry_features(
    item: dict[str, Any],
    where: str,
    spec: FeatureSpec | None,
    ignored: set[str],
    declared: bool,
    problems: list[str],
) -> None:
    """Problems of one entry's ``features`` (one line each, naming the entry and the feature)."""
    values = item.get("features")
    if values is None:
        return
    if not declared:
        if not (isinstance(values, Mapping) and not values):
            problems.append(f"{where}: has 'features' but the datalist declares none (add a top-level 'features')")
        return
    if spec is None:
        return  # the declaration is the problem, already listed
    if isinstance(values, Mapping) and ignored:
        values = {k: v for k, v in values.items() if k not in ignored}
    problems.extend(spec.check(values, where))


def _missing_shares(entries: list[dict[str, Any]], spec: FeatureSpec) -> dict[str, float]:
    """Per declared feature, the share of ``entries`` without a value (absent or null; all when malformed); empty
    for no entries."""
    if not entries:
        return {}
    missing = dict.fromkeys(spec.names, 0)
    for e in entries:
        values = e.get("features")
        for name in spec.missing(values if isinstance(values, Mapping) else None):
            missing[name] += 1
    return {name: n / len(entries) for name, n in missing.items()}


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
