"""Datalists in the MONAI decathlon style (see DESIGN.md) with paths resolved and entries checked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from volcnn.core.errors import VolcnnError

__all__ = ["SECTIONS", "DatalistError", "load_datalist", "read_datalist_json"]

SECTIONS = ("training", "validation", "test")


class DatalistError(VolcnnError, ValueError):
    """A datalist (or a CSV it is built from) is malformed; the message names the file, the section and the entry
    (exit code 1)."""


def read_datalist_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a datalist JSON file, raising :class:`DatalistError` with the file name on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatalistError(f"{path}: cannot read datalist ({e})") from e
    if not isinstance(data, dict):
        raise DatalistError(f"{path}: a datalist is a JSON object with 'training'/'validation'/'test' lists")
    return data


def load_datalist(
    datalist: str | os.PathLike[str], section: str = "training", dataset_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Entries of one section with ``image`` made absolute (relative to ``dataset_dir``, else the JSON's folder).

    Every entry must have an ``image``; ``label`` is an int; ``center`` (optional) is three world RAS mm.
    An absent section gives an empty list.
    """
    path = Path(datalist)
    data = read_datalist_json(path)
    base = Path(dataset_dir) if dataset_dir is not None else path.parent
    entries = data.get(section, [])
    if not isinstance(entries, list):
        raise DatalistError(f"{path}: section {section!r} must be a list")
    out = []
    for i, item in enumerate(entries):
        where = f"{path}: {section}[{i}]"
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise DatalistError(f"{where}: each entry needs an 'image' path")
        entry = dict(item)
        image = Path(entry["image"]).expanduser()
        entry["image"] = str(image if image.is_absolute() else base / image)
        if "label" in entry:
            try:
                entry["label"] = int(entry["label"])
            except (TypeError, ValueError) as e:
                raise DatalistError(f"{where}: label {entry['label']!r} is not an integer") from e
        if entry.get("center") is not None:
            center = entry["center"]
            if not (isinstance(center, list | tuple) and len(center) == 3):
                raise DatalistError(f"{where}: center must be [x, y, z] in world RAS mm, got {center!r}")
            entry["center"] = [float(c) for c in center]
        else:
            entry.pop("center", None)
        out.append(entry)
    return out
