"""Clinical features in a datalist: their declaration, the checks on their values, and their raw encoding.

A datalist declares its features at the top level and gives values per entry::

    {"features": {"age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
                  "smoker": {"type": "binary"},
                  "sex": {"type": "categorical", "values": ["F", "M"]}},
     "training": [{"image": "...", "label": 1, "features": {"age": 63, "smoker": true, "sex": null}}, ...]}

A missing value is absent or ``null``. Values are checked strictly: a string for a numeric, NaN, an undeclared
name or a category that was not declared is an error naming the entry and the feature, never a silently wrong
number.

The *raw encoding* of one entry is a float32 vector ``(C,)`` laid out by :attr:`FeatureSpec.columns`: one column per
numeric or binary feature, one per category (one-hot) for a categorical feature, NaN where the value is missing.
It carries no statistics: standardisation and (conditional) imputation are learnt on the training split and live in
the network (:class:`volcnn.networks.tabular.FeatureNormalizer`), so they travel in its checkpoint and the packaged
bundle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.io.datalist import DatalistError, read_datalist_json

__all__ = [
    "COVARIANCE_SHRINKAGE",
    "FEATURE_TYPES",
    "FeatureDecl",
    "FeatureError",
    "FeatureSpec",
    "attach_features",
    "declaration",
    "feature_matrix",
    "fit_feature_stats",
    "load_section",
    "parse_feature_spec",
    "read_feature_spec",
    "read_features_csv",
    "training_stats",
]

FEATURE_TYPES = ("numeric", "binary", "categorical")
_BINARY_WORDS = {"0": 0.0, "1": 1.0, "false": 0.0, "true": 1.0, "no": 0.0, "yes": 1.0}


class FeatureError(DatalistError):
    """A feature declaration or value is wrong; the message names the file, the entry and the feature."""


@dataclass(frozen=True)
class FeatureDecl:
    """One declared feature.

    Attributes:
        name: the feature's name (the key in each entry's ``features``).
        type: ``numeric``, ``binary`` or ``categorical``.
        unit: free text (numeric only), reported, never converted.
        values: the categories, in order (categorical only): they define the one-hot columns.
        min, max: inclusive bounds of a numeric value, when declared.
    """

    name: str
    type: str
    unit: str | None = None
    values: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None

    @property
    def width(self) -> int:
        """Number of raw columns: one, or one per category."""
        return len(self.values) if self.type == "categorical" else 1

    def to_json(self) -> dict[str, Any]:
        """The declaration as written in a datalist."""
        out: dict[str, Any] = {"type": self.type}
        if self.unit is not None:
            out["unit"] = self.unit
        if self.type == "categorical":
            out["values"] = list(self.values)
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


@dataclass(frozen=True)
class FeatureSpec:
    """The declared features of a datalist, in declaration order, and the raw column layout they give."""

    decls: tuple[FeatureDecl, ...]
    _slices: dict[str, slice] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        start = 0
        for d in self.decls:
            self._slices[d.name] = slice(start, start + d.width)
            start += d.width

    @property
    def names(self) -> list[str]:
        """Feature names in declaration order."""
        return [d.name for d in self.decls]

    @property
    def columns(self) -> list[str]:
        """Raw column names ``(C,)``: ``name`` or ``name=category``."""
        return [
            d.name if d.type != "categorical" else f"{d.name}={v}" for d in self.decls for v in (d.values or [None])
        ]

    @property
    def n_columns(self) -> int:
        """C, the length of a raw encoding."""
        return sum(d.width for d in self.decls)

    def column_slice(self, name: str) -> slice:
        """The raw columns of feature ``name``."""
        return self._slices[name]

    def column_groups(self) -> list[int]:
        """For each raw column ``(C,)``, the index of its feature in :attr:`decls`."""
        return [i for i, d in enumerate(self.decls) for _ in range(d.width)]

    def numeric_columns(self) -> list[bool]:
        """For each raw column ``(C,)``, whether it holds a numeric feature (standardised; others are 0/1)."""
        return [d.type == "numeric" for d in self.decls for _ in range(d.width)]

    def to_json(self) -> dict[str, Any]:
        """The top-level ``features`` declaration."""
        return {d.name: d.to_json() for d in self.decls}

    def check(self, values: Any, where: str) -> list[str]:
        """Problems of one entry's ``features`` value (a dict, or None / absent for all missing), one line each."""
        if values is None:
            return []
        if not isinstance(values, Mapping):
            return [f"{where}: 'features' must be an object of name: value, got {type(values).__name__}"]
        problems = [
            f"{where}: feature {name!r} is not declared (declared: {', '.join(self.names)})"
            for name in values
            if name not in self._slices
        ]
        for d in self.decls:
            try:
                _column_values(d, values.get(d.name))
            except ValueError as e:
                problems.append(f"{where}: feature {d.name!r}: {e}")
        return problems

    def encode(self, values: Mapping[str, Any] | None, where: str) -> np.ndarray:
        """Raw encoding ``(C,)`` float32 of one entry's features (NaN where missing).

        Raises:
            FeatureError: naming ``where`` and the feature, for every problem :meth:`check` finds.
        """
        problems = self.check(values, where)
        if problems:
            raise FeatureError("\n".join(problems))
        out = np.full(self.n_columns, np.nan, dtype=np.float32)
        for d in self.decls:
            out[self._slices[d.name]] = _column_values(d, (values or {}).get(d.name))
        return out

    def missing(self, values: Mapping[str, Any] | None) -> list[str]:
        """Names of the declared features without a value in ``values``."""
        return [d.name for d in self.decls if (values or {}).get(d.name) is None]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _column_values(d: FeatureDecl, v: Any) -> np.ndarray:
    """The raw columns ``(width,)`` of value ``v`` of feature ``d``; ValueError saying what is wrong."""
    if v is None:
        return np.full(d.width, np.nan, dtype=np.float32)
    if isinstance(v, float) and math.isnan(v):
        raise ValueError("NaN is not a value; leave the feature out or write null for a missing value")
    if d.type == "numeric":
        if not _is_number(v):
            raise ValueError(f"{v!r} is not a number (type numeric)")
        if not math.isfinite(v):
            raise ValueError(f"{v!r} is not a finite number")
        if (d.min is not None and v < d.min) or (d.max is not None and v > d.max):
            raise ValueError(f"{v!r} is outside the declared range [{d.min}, {d.max}]")
        return np.array([v], dtype=np.float32)
    if d.type == "binary":
        if isinstance(v, bool) or (_is_number(v) and v in (0, 1)):
            return np.array([float(v)], dtype=np.float32)
        raise ValueError(f"{v!r} is not binary (true/false or 0/1)")
    hits = [i for i, c in enumerate(d.values) if type(c) is type(v) and c == v]
    if not hits:
        raise ValueError(f"{v!r} is not one of the declared values {list(d.values)}")
    onehot = np.zeros(d.width, dtype=np.float32)
    onehot[hits[0]] = 1.0
    return onehot


def _decl(name: Any, body: Any, where: str) -> FeatureDecl:
    if not isinstance(name, str) or not name:
        raise FeatureError(f"{where}: feature names are non-empty strings, got {name!r}")
    if not isinstance(body, Mapping):
        raise FeatureError(f"{where}: feature {name!r}: a declaration is an object with 'type', got {body!r}")
    kind = body.get("type")
    if kind not in FEATURE_TYPES:
        raise FeatureError(f"{where}: feature {name!r}: type must be one of {list(FEATURE_TYPES)}, got {kind!r}")
    unknown = sorted(set(body) - {"type", "unit", "values", "min", "max", "description"})
    if unknown:
        raise FeatureError(f"{where}: feature {name!r}: unknown key(s) {unknown}")
    values: tuple[Any, ...] = ()
    if kind == "categorical":
        raw = body.get("values")
        if not isinstance(raw, list) or len(raw) < 2 or len(set(map(repr, raw))) != len(raw):
            raise FeatureError(f"{where}: feature {name!r}: a categorical needs 'values', 2+ distinct, got {raw!r}")
        if not all(isinstance(c, str | int) and not isinstance(c, bool) for c in raw):
            raise FeatureError(f"{where}: feature {name!r}: categories are strings or integers, got {raw!r}")
        values = tuple(raw)
    elif "values" in body:
        raise FeatureError(f"{where}: feature {name!r}: 'values' is for categorical features")
    bounds = []
    for key in ("min", "max"):
        b = body.get(key)
        if b is not None and (kind != "numeric" or not _is_number(b) or not math.isfinite(b)):
            raise FeatureError(f"{where}: feature {name!r}: {key!r} is a finite number, for numeric features only")
        bounds.append(None if b is None else float(b))
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise FeatureError(f"{where}: feature {name!r}: min {bounds[0]} > max {bounds[1]}")
    unit = body.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise FeatureError(f"{where}: feature {name!r}: unit is a string, got {unit!r}")
    return FeatureDecl(name=name, type=str(kind), unit=unit, values=values, min=bounds[0], max=bounds[1])


def parse_feature_spec(obj: Any, where: str = "features") -> FeatureSpec:
    """A :class:`FeatureSpec` from a ``features`` declaration: ``{name: {"type": ...}}`` (a datalist's form), or
    ``[{"name": ..., "type": ...}]`` (:func:`declaration`'s), in order.

    Raises:
        FeatureError: naming ``where`` and the feature, for an unknown type, a categorical without values, ...
    """
    if isinstance(obj, FeatureSpec):
        return obj
    if isinstance(obj, list) and obj and all(isinstance(d, Mapping) and "name" in d for d in obj):
        names = [d["name"] for d in obj]
        if len(set(map(str, names))) != len(names):
            raise FeatureError(f"{where}: feature names repeat: {names}")
        return FeatureSpec(tuple(_decl(d["name"], {k: v for k, v in d.items() if k != "name"}, where) for d in obj))
    if not isinstance(obj, Mapping) or not obj:
        raise FeatureError(f"{where}: 'features' declares at least one feature as {{name: {{'type': ...}}}}")
    return FeatureSpec(tuple(_decl(name, body, where) for name, body in obj.items()))


def read_feature_spec(datalist: str | os.PathLike[str]) -> FeatureSpec | None:
    """The datalist's declared features, or None when it declares none."""
    data = read_datalist_json(datalist)
    if data.get("features") is None:
        return None
    return parse_feature_spec(data["features"], f"{datalist}: features")


def attach_features(
    entries: Sequence[Mapping[str, Any]], spec: FeatureSpec | Mapping[str, Any], where: str = "datalist"
) -> list[dict[str, Any]]:
    """Copies of ``entries`` whose ``features`` is the raw encoding ``(C,)`` float32 (NaN where missing).

    All problems of all entries are collected and raised together.

    Raises:
        FeatureError: one line per problem, each naming the entry (``where[i]``, its image) and the feature.
    """
    spec = parse_feature_spec(spec)
    problems: list[str] = []
    out = []
    for i, e in enumerate(entries):
        label = f"{where}[{i}] ({Path(str(e.get('image', '?'))).name})"
        p = spec.check(e.get("features"), label)
        problems += p
        if not p:
            out.append({**e, "features": spec.encode(e.get("features"), label)})
    if problems:
        raise FeatureError("\n".join(problems))
    return out


def feature_matrix(entries: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Stack the raw encodings of entries prepared by :func:`attach_features` into ``(N, C)`` float32."""
    rows = [np.asarray(e["features"], dtype=np.float32) for e in entries]
    if not rows:
        raise FeatureError("no entries to learn feature statistics from")
    return np.stack(rows)


#: Shrinkage of the features' covariance towards its diagonal before it is inverted (:func:`fit_feature_stats`):
#: keeps the precision finite for collinear columns (the categories of one feature, a constant column) and damps
#: correlations estimated from a few hundred patients.
COVARIANCE_SHRINKAGE = 0.05


def fit_feature_stats(spec: FeatureSpec | Mapping[str, Any], raw: np.ndarray) -> dict[str, Any]:
    """Imputation and scaling learnt from the training entries' raw encodings ``raw`` ``(N, C)``.

    Returns:
        ``{"mean": (C,), "std": (C,), "precision": (C, C)}``: ``mean`` is the training mean (the prevalence of a
        binary or a category); ``std`` is the training standard deviation for numeric columns (1 where constant) and
        1 for 0/1 columns. A network subtracts ``mean`` and divides by ``std``. ``precision`` is the inverse of the
        standardised columns' covariance (each pair estimated on the entries where both are present, shrunk by
        :data:`COVARIANCE_SHRINKAGE` towards the diagonal): a missing column is imputed by its conditional mean
        given the entry's present columns, ``-P_mm^-1 P_mo z_o`` (the training mean when nothing correlates).

    Raises:
        FeatureError: a feature without a single value in the training entries (nothing to learn from).
    """
    spec = parse_feature_spec(spec)
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != spec.n_columns:
        raise FeatureError(f"raw features have shape {raw.shape}, expected (N, {spec.n_columns})")
    present = ~np.isnan(raw)
    empty = [d.name for d in spec.decls if not present[:, spec.column_slice(d.name)].any()]
    if empty:
        raise FeatureError(f"feature(s) {empty} have no value in any training entry: nothing to learn them from")
    count = present.sum(axis=0)
    mean = np.where(present, raw, 0.0).sum(axis=0) / np.maximum(count, 1)
    var = np.where(present, (raw - mean) ** 2, 0.0).sum(axis=0) / np.maximum(count, 1)
    std = np.sqrt(var)
    numeric = np.asarray(spec.numeric_columns())
    std = np.where(numeric & (std > 1e-6), std, 1.0)
    z = np.where(present, (raw - mean) / std, 0.0)
    return {
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "precision": [[float(v) for v in row] for row in _precision(z, present)],
    }


def _precision(z: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Inverse of the pairwise-complete covariance of ``z`` ``(N, C)`` (0 where missing), shrunk towards its
    diagonal, with every eigenvalue at least 1e-3 of the largest (one-hot columns are collinear); a constant column
    gets variance 1 and no correlation."""
    both = present.T.astype(np.float64) @ present.astype(np.float64)  # (C, C) entries with both columns
    cov = (z.T @ z) / np.maximum(both, 1.0)
    cov = np.where(both >= 2, cov, 0.0)  # a pair never seen together: no correlation learnt
    dead = np.diag(cov) < 1e-8  # a constant column: nothing to learn from or about it
    cov[dead, :] = 0.0
    cov[:, dead] = 0.0
    cov[dead, dead] = 1.0
    diag = np.diag(np.diag(cov))
    cov = (1.0 - COVARIANCE_SHRINKAGE) * cov + COVARIANCE_SHRINKAGE * diag
    w, v = np.linalg.eigh((cov + cov.T) / 2.0)
    w = np.maximum(w, max(float(w.max()), 1e-6) * 1e-3)
    return (v / w) @ v.T


def _csv_value(d: FeatureDecl, text: str) -> Any:
    """A CSV cell as the JSON value it stands for (empty: missing); ValueError when it cannot be one."""
    t = text.strip()
    if t == "":
        return None
    if t.lower() in ("nan", "-nan"):
        return float("nan")
    if d.type == "numeric":
        try:
            return float(t)
        except ValueError as e:
            raise ValueError(f"{t!r} is not a number (type numeric)") from e
    if d.type == "binary":
        if t.lower() not in _BINARY_WORDS:
            raise ValueError(f"{t!r} is not binary (0/1, true/false, yes/no)")
        return int(_BINARY_WORDS[t.lower()])
    for c in d.values:
        if str(c) == t:
            return c
    raise ValueError(f"{t!r} is not one of the declared values {list(d.values)}")


def read_features_csv(
    path: str | os.PathLike[str],
    spec: FeatureSpec | Mapping[str, Any],
    key: str = "case",
    bad_rows: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-case feature values from a CSV with a ``key`` column and one column per feature (empty: missing).

    Columns not declared in ``spec`` are refused (a misspelt feature would otherwise be silently missing);
    a declared feature without a column is missing for every case.

    Args:
        path: the CSV.
        spec: the declared features.
        key: the column naming the case.
        bad_rows: when given, a row with bad values is left out and its problems go here (``{case: message}``)
            instead of being raised, so that a batch can still run its other cases.

    Returns:
        ``{case: {feature: value}}`` with values checked as in a datalist.

    Raises:
        FeatureError: unreadable CSV, no ``key`` column, duplicate cases, undeclared columns, bad values (one line
            each, naming the line and the feature).
    """
    from volcnn.io.datalist_split import read_csv_rows

    spec = parse_feature_spec(spec)
    path = Path(path)
    try:
        header, rows = read_csv_rows(path, [key])
    except DatalistError as e:
        raise FeatureError(str(e)) from e
    if not rows:
        raise FeatureError(f"{path}: no rows (expected a header with '{key}' and feature columns, then rows)")
    unknown = [h for h in header if h != key and h not in spec.names]
    if unknown:
        raise FeatureError(f"{path}: column(s) {unknown} are not declared features (declared: {spec.names})")
    out: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for line, row in rows:
        case = row.get(key, "")
        if not case:
            problems.append(f"{path}: line {line}: empty '{key}'")
            continue
        if case in out:
            problems.append(f"{path}: line {line}: case {case!r} appears twice")
            continue
        values: dict[str, Any] = {}
        row_problems = []
        for d in spec.decls:
            if d.name in row:
                try:
                    values[d.name] = _csv_value(d, row[d.name] or "")
                except ValueError as e:
                    row_problems.append(f"{path}: line {line} (case {case}): feature {d.name!r}: {e}")
        row_problems += spec.check(values, f"{path}: line {line} (case {case})")
        if row_problems and bad_rows is not None:
            bad_rows[case] = "\n".join(row_problems)
            continue
        problems += row_problems
        out[case] = values
    if problems:
        raise FeatureError("\n".join(problems))
    return out


def load_section(
    datalist: str | os.PathLike[str],
    section: str,
    dataset_dir: str | os.PathLike[str] | None,
    features: FeatureSpec | Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`volcnn.io.load_datalist`'s entries of ``section``, with ``features`` as the raw encoding ``(C,)`` when
    ``features`` (the declaration) is given; without it (an image model), the entries without their ``features``
    (values an image model does not read, and that could not be batched)."""
    from volcnn.io.datalist import load_datalist

    entries = load_datalist(datalist, section, dataset_dir)
    if features is None:
        return [{k: v for k, v in e.items() if k != "features"} for e in entries]
    return attach_features(entries, features, f"{datalist}: {section}")


def training_stats(
    features: FeatureSpec | Mapping[str, Any] | None, entries: Sequence[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """:func:`fit_feature_stats` over the training ``entries`` (from :func:`load_section`), or None without
    declared features. Only the entries given are read: the bundle passes the training section alone."""
    if features is None:
        return None
    return fit_feature_stats(features, feature_matrix(entries))


def declaration(features: FeatureSpec | Mapping[str, Any] | Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """The declaration of ``features`` as a list ``[{"name": ..., "type": ...}, ...]`` (as recorded in ``run.json``
    and packaged bundles), or None. A list, not an object: JSON written with sorted keys would otherwise reorder
    the features, and their order is the raw column layout the weights were trained on."""
    return None if features is None else [{"name": d.name, **d.to_json()} for d in parse_feature_spec(features).decls]
