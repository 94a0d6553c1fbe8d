"""Per-case predictions as CSV, written atomically with full float precision."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from volcnn.core.atomic import atomic_write_text

__all__ = ["format_csv_value", "write_predictions_csv"]


def _plain(value: object) -> object:
    """Numpy scalars and arrays as the equivalent Python objects (exact: float32 widens to float64 losslessly)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonable(value: object) -> object:
    value = _plain(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def format_csv_value(value: object) -> str:
    """One CSV cell: ``None`` -> empty, floats via ``repr`` (round-trips exactly), containers as JSON."""
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_jsonable(value))
    return str(value)


def write_predictions_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, object]],
    columns: Sequence[str] | None = None,
) -> Path:
    """Write ``rows`` (one mapping per case) as CSV to ``path`` atomically; returns ``path`` as a Path.

    The header is ``columns`` when given (keys of a row outside it are left out), else the union of the rows' keys
    in first-seen order. A key missing from a row is an empty cell. Floats (numpy scalars included) are written
    with ``repr`` so ``float(cell)`` gives back the same value; ``None`` is an empty cell; lists, tuples, arrays
    and dicts are written as JSON.
    """
    if columns is None:
        header: list[str] = []
        seen: set[str] = set()
        for row in rows:
            for key in row:
                name = str(key)
                if name not in seen:
                    seen.add(name)
                    header.append(name)
    else:
        header = [str(c) for c in columns]
        if len(set(header)) != len(header):
            raise ValueError(f"duplicate column names in {header}")
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    if header:  # with no columns at all there is nothing to write: the file is left empty
        writer.writerow(header)
        for row in rows:
            cells = {str(k): v for k, v in row.items()}
            writer.writerow([format_csv_value(cells.get(name)) for name in header])
    atomic_write_text(path, buf.getvalue())
    return Path(path)
