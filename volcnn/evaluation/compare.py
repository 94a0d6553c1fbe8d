"""Side-by-side comparison of binary classification runs scored on the same samples (e.g. image-only,
clinical-only and fusion models): each run's ROC AUC with its bootstrap interval, the paired bootstrap interval
of every AUC difference, one ROC plot, and ``comparison.json`` / ``comparison.md`` / ``comparison.html``.

Inputs are the ``predictions.csv`` files of the bundle's evaluation (:func:`volcnn.evaluation.report.
write_classification_report`): one row per sample in datalist order, ``index,case,image,center_x,center_y,center_z,
label,prob,predicted,correct`` with ``prob`` = P(class 1). Runs are compared only when they scored the same samples:
same number of rows and, row by row, the same ``index``, ``case``, ``image``, centre and ``label``.

**Paired.** Every bootstrap replicate draws one set of rows and scores every run on it, so the interval of a
difference reflects how much the runs disagree, not the sampling variation they share: two correlated runs get a
difference interval several times narrower than the spread of two independent bootstraps.

**Resampling unit.** The resamples are :mod:`volcnn.evaluation.bootstrap`'s (a seeded ``torch.Generator``, draws in
its order) and each replicate's AUC is its vectorised ``_auc_resamples``:

* rows, drawn within each label (``roc_auc_ci``'s resamples: with the same ``seed`` and ``n_boot`` a run's
  interval is bit for bit the one of ``roc_auc_ci``, i.e. of ``metrics.json``), when there is no group column;
* groups (by default the ``case`` column: the CT scan the candidate comes from), when there is one: groups are
  drawn with replacement and bring all of their rows, because the nodules and candidates of one patient are
  correlated and a row bootstrap would give too narrow intervals. Groups are stratified by whether they hold a
  positive row (the number of positive-holding groups is the same in every replicate); a replicate with one
  class only has no AUC and is skipped (refused when more than half are). With one row per group this is the row
  bootstrap exactly.

The output says which (``bootstrap.unit``). Which run is "the best single one" is the caller's choice: every pair,
or every run against ``reference``, is reported.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from volcnn.core.atomic import atomic_write_json, atomic_write_text
from volcnn.core.errors import VolcnnError
from volcnn.evaluation._checks import TensorLike, as_labels, check_same_length, to_tensor
from volcnn.evaluation.bootstrap import (
    _CHUNK_ELEMENTS,
    _auc_resamples,
    _check_args,
    _percentile_interval,
    _resample_indices,
    _strata,
)
from volcnn.evaluation.classification import roc_auc, roc_points
from volcnn.evaluation.html import write_report_html
from volcnn.evaluation.plots import PathLike, plot_roc
from volcnn.io.datalist import DatalistError
from volcnn.io.datalist_split import MAX_LISTED, parse_float, parse_int, read_csv_rows

__all__ = [
    "CENTRE_ATOL_MM",
    "IDENTITY_COLUMNS",
    "Predictions",
    "PredictionsError",
    "compare_runs",
    "format_comparison",
    "paired_auc_resamples",
    "plot_roc_comparison",
    "read_predictions",
    "write_comparison",
]

logger = logging.getLogger(__name__)

IDENTITY_COLUMNS = ("index", "case", "image", "center_x", "center_y", "center_z")
"""Columns that must agree row by row between runs (those present in either file), besides ``label``."""
REQUIRED_COLUMNS = ("label", "prob")
"""Columns every predictions file must have."""
CENTRE_ATOL_MM = 1e-4
"""Centre coordinates (mm) of two runs agree when they differ by at most this much."""
_CENTRE_COLUMNS = ("center_x", "center_y", "center_z")


class PredictionsError(VolcnnError, ValueError):
    """A predictions file cannot be read or used, or two runs did not score the same samples; the message names
    the file(s) and the first problem. Exit code 1."""


@dataclass(frozen=True)
class Predictions:
    """The rows of one binary ``predictions.csv``.

    Attributes:
        path: the file.
        header: its column names.
        rows: N rows, column name -> cell text (stripped), in file order.
        lines: N line numbers of the rows in the file (1 is the header).
        probs: ``(N,)`` float64, the ``prob`` column (P(class 1)), finite.
        labels: ``(N,)`` int64, the ``label`` column, 0 or 1.
    """

    path: Path
    header: tuple[str, ...]
    rows: tuple[Mapping[str, str], ...]
    lines: tuple[int, ...]
    probs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read one binary ``predictions.csv`` (at least the columns ``label`` and ``prob``).

    Raises:
        PredictionsError: the file cannot be read, lacks ``label`` or ``prob`` (multi-class files, with
            ``prob_0..prob_{K-1}``, are named as such), has no rows, or has rows whose label is not 0/1 or whose
            ``prob`` is not a finite number (up to ``MAX_LISTED`` listed with their line numbers). The message
            starts with the path.
    """
    p = Path(path)
    try:
        header, rows = read_csv_rows(p, [])
    except DatalistError as e:
        raise PredictionsError(str(e)) from e
    if "prob" not in header and any(h.startswith("prob_") for h in header):
        raise PredictionsError(
            f"{p}: multi-class predictions (prob_0, prob_1, ...); only binary runs (a 'prob' column) can be compared"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise PredictionsError(f"{p}: missing column(s) {missing}; header is {header}; not a volcnn predictions.csv?")
    if not rows:
        raise PredictionsError(f"{p}: no rows")
    probs: list[float] = []
    labels: list[int] = []
    errors: list[str] = []
    for line, row in rows:
        try:
            label = parse_int(row["label"], "label")
            if label not in (0, 1):
                raise ValueError(f"label {label} is not 0 or 1 (binary runs only)")
            prob = parse_float(row["prob"], "prob")
        except ValueError as e:
            errors.append(f"line {line}: {e}")
            continue
        labels.append(label)
        probs.append(prob)
    if errors:
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise PredictionsError(f"{p}: {len(errors)} bad row(s):\n  {listed}{more}")
    return Predictions(
        path=p,
        header=tuple(header),
        rows=tuple(row for _, row in rows),
        lines=tuple(line for line, _ in rows),
        probs=torch.tensor(probs, dtype=torch.float64),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def _same_cell(column: str, a: str, b: str) -> bool:
    if a == b:
        return True
    if column in _CENTRE_COLUMNS:
        try:
            return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=CENTRE_ATOL_MM)
        except ValueError:
            return False
    return False


def _check_same_samples(preds: Mapping[str, Predictions], extra: Sequence[str] = ()) -> list[str]:
    """Refuse runs that did not score the same samples; returns the columns compared (``label`` last)."""
    names = list(preds)
    first = preds[names[0]]
    wanted = [*IDENTITY_COLUMNS, *(c for c in extra if c not in IDENTITY_COLUMNS and c not in REQUIRED_COLUMNS)]
    columns = [c for c in wanted if any(c in p.header for p in preds.values())]
    for name in names[1:]:
        other = preds[name]
        where = f"{first.path} (run {names[0]!r}) and {other.path} (run {name!r}) did not score the same samples"
        if len(other) != len(first):
            raise PredictionsError(f"{where}: {len(first)} rows against {len(other)}")
        only = [c for c in columns if (c in first.header) != (c in other.header)]
        if only:
            raise PredictionsError(f"{where}: column(s) {only} are in one file only")
        labels_a, labels_b = first.labels.tolist(), other.labels.tolist()
        for i, (row_a, row_b) in enumerate(zip(first.rows, other.rows, strict=True)):
            differing = [(c, row_a.get(c, ""), row_b.get(c, "")) for c in columns]
            differing = [(c, a, b) for c, a, b in differing if not _same_cell(c, a, b)]
            if labels_a[i] != labels_b[i]:
                differing.append(("label", str(labels_a[i]), str(labels_b[i])))
            if differing:
                c, a, b = differing[0]
                raise PredictionsError(
                    f"{where}: first difference at row {i} (line {first.lines[i]} and line {other.lines[i]}), "
                    f"column {c!r}: {a!r} against {b!r}"
                )
    return [*columns, "label"]


def _group_ids(pred: Predictions, column: str) -> tuple[torch.Tensor, int, int]:
    """Group of every row, int64 ``(N,)`` numbered in order of first appearance; the number of groups G; the number
    of rows with an empty ``column`` cell (each its own group)."""
    keys: list[tuple[str, object]] = []
    for i, row in enumerate(pred.rows):
        value = row.get(column, "")
        keys.append(("value", value) if value else ("row", i))
    seen: dict[tuple[str, object], int] = {}
    ids = [seen.setdefault(key, len(seen)) for key in keys]  # first-seen order: one row per group is the row bootstrap
    blank = sum(1 for kind, _ in keys if kind == "row")
    return torch.tensor(ids, dtype=torch.int64), len(seen), blank


def _resamples(
    labels: torch.Tensor, groups: torch.Tensor | None, n_boot: int, generator: torch.Generator
) -> Iterator[list[torch.Tensor]]:
    """Bootstrap row indices in chunks, ``n_boot`` replicates in all: each chunk a list of int64 ``(b, M)`` tensors
    (one row per replicate, M rows drawn), as ``_auc_resamples`` takes them.

    Without ``groups``: ``roc_auc_ci``'s label-stratified resamples, one ``(b, N)`` tensor per chunk. With
    ``groups`` (``(N,)`` ids in ``[0, G)``): G groups drawn per replicate, stratified by whether a group holds a
    positive, every drawn group contributing all of its rows; replicates then differ in their number of rows, so
    each is a ``(1, M_i)`` tensor.
    """
    n = labels.numel()
    if groups is None:
        for idx in _resample_indices(n, _strata(labels, n), n_boot, generator):
            yield [idx]
        return
    n_groups = int(groups.max()) + 1
    order = torch.argsort(groups, stable=True)  # rows grouped, each group's rows in file order
    sizes = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    has_positive = (torch.bincount(groups, weights=labels.to(torch.float64), minlength=n_groups) > 0).to(torch.int64)
    per_chunk = max(1, _CHUNK_ELEMENTS // n)  # replicates whose rows are built at once (bounds memory)
    for draws in _resample_indices(n_groups, _strata(has_positive, n_groups), n_boot, generator):
        for lo in range(0, draws.shape[0], per_chunk):
            d = draws[lo : lo + per_chunk].reshape(-1)
            lengths = sizes[d]
            totals = lengths.view(-1, n_groups).sum(dim=1)
            first = torch.repeat_interleave(starts[d], lengths)
            offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
                torch.cumsum(lengths, 0) - lengths, lengths
            )
            rows = order[first + offset]
            yield [r.view(1, -1) for r in torch.split(rows, totals.tolist())]


def paired_auc_resamples(
    scores: TensorLike,
    labels: TensorLike,
    *,
    groups: TensorLike | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> torch.Tensor:
    """ROC AUC of every run on the same bootstrap replicates, float64 ``(R, n_boot)``.

    Replicate ``b`` of every run is computed on the same resampled rows (paired), so ``out[i] - out[j]`` is the
    bootstrap distribution of the AUC difference of runs i and j. NaN where a replicate has one class only
    (possible with ``groups`` only).

    Args:
        scores: ``(R, N)`` real scores of R runs on the same N samples.
        labels: ``(N,)`` 0/1 labels with both classes present.
        groups: optional ``(N,)`` integer group ids (e.g. one per patient): whole groups are resampled, stratified
            by whether a group holds a positive; without it rows are resampled within each label, as
            ``roc_auc_ci`` does (same ``seed`` and ``n_boot``: the same replicates).
        n_boot: replicates, a positive integer.
        seed: seed of the ``torch.Generator``.

    Raises:
        ValueError: for invalid input, one class only, or bad ``n_boot``.
    """
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    s = to_tensor(scores, "scores").to(torch.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must have shape (R, N) with R >= 1, got shape {tuple(s.shape)}")
    y = as_labels(labels, num_classes=2)
    n = check_same_length(**{"scores[0]": s[0], "labels": y})
    if not 0 < int(y.sum()) < n:
        raise ValueError(f"ROC AUC needs both classes, but all {n} labels are {int(y[0])}")
    g: torch.Tensor | None = None
    if groups is not None:
        g = to_tensor(groups, "groups")
        if g.ndim != 1 or g.dtype.is_floating_point or g.dtype == torch.bool:
            raise ValueError(f"groups must be (N,) integer ids, got shape {tuple(g.shape)} and dtype {g.dtype}")
        check_same_length(groups=g, labels=y)
        _, g = torch.unique(g, return_inverse=True)
    generator = torch.Generator().manual_seed(int(seed))
    out = torch.empty(s.shape[0], int(n_boot), dtype=torch.float64)
    col = 0
    for chunk in _resamples(y, g, int(n_boot), generator):
        b = sum(idx.shape[0] for idx in chunk)
        for r in range(s.shape[0]):
            out[r, col : col + b] = _auc_resamples(s[r], y, iter(chunk))
        col += b
    return out


def _interval(values: torch.Tensor, level: float, what: str) -> tuple[list[float], int]:
    """``[lo, hi]`` percentile interval of the finite ``values`` and their number; refused when over half failed."""
    ok = torch.isfinite(values)
    n_ok, n = int(ok.sum()), values.numel()
    if (n - n_ok) * 2 > n:
        raise PredictionsError(
            f"bootstrap of {what} failed: {n - n_ok} of {n} resamples had one class only; "
            "too few positive (or negative) groups to resample"
        )
    if n_ok < n:
        logger.warning("bootstrap of %s: skipped %d of %d resamples with one class only", what, n - n_ok, n)
    lo, hi = _percentile_interval(values[ok], level)
    return [lo, hi], n_ok


def compare_runs(
    runs: Mapping[str, str | os.PathLike[str]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    reference: str | None = None,
    group_by: str | None = "case",
) -> dict[str, Any]:
    """Compare runs that scored the same samples: AUC and bootstrap CI per run, paired CI of AUC differences.

    Args:
        runs: run name -> its ``predictions.csv`` (binary), at least two; the order is kept in the output.
        n_boot: bootstrap replicates, shared by every run (paired).
        seed: bootstrap seed.
        level: confidence level of every interval, in ``(0, 1)``.
        reference: a run name: compare every other run with it (``run - reference``). ``None``: every pair, the
            later-listed run minus the earlier one.
        group_by: column whose rows are resampled together (``case``: the CT scan); used when the files have it
            (rows with an empty cell are their own group). ``None``, or a column the files lack: rows are
            resampled within each label.

    Returns:
        A JSON-serialisable dict (finite floats):

        * ``num_samples``, ``num_positive``, ``num_negative``; ``matched_on``: the columns compared row by row;
        * ``bootstrap``: ``n_boot``, ``seed``, ``level``, ``paired`` (True), ``unit`` (``"case"``-like group column
          name or ``"row"``), ``group_column``, ``num_groups``, ``rows_without_group``, ``stratified_by``,
          ``description`` (one sentence);
        * ``runs``: a list, in the order of ``runs``, of ``{"name", "predictions", "auc", "auc_ci": [lo, hi],
          "valid_resamples", "roc": {"fpr", "tpr", "thresholds"}}`` (the curve of ``roc_points``, collinear points
          dropped);
        * ``reference``; ``differences``: a list of ``{"run", "baseline", "label" ("run − baseline"), "diff"
          (AUC of run minus AUC of baseline, on all samples), "ci": [lo, hi], "share_le_zero" (share of
          replicates whose difference is <= 0), "p_two_sided" (``min(1, 2 min(share <= 0, share >= 0))``),
          "valid_resamples"}``.

    Raises:
        PredictionsError: an unreadable or malformed file, runs that did not score the same samples (naming both
            files and the first differing row), labels of one class only, or a bootstrap that failed.
        ValueError: fewer than two runs, an empty name, an unknown ``reference``, bad ``n_boot``/``level``.
    """
    _check_args(n_boot, level)
    names = [str(name) for name in runs]
    if len(names) < 2:
        raise ValueError(f"comparing needs at least two runs, got {len(names)}")
    if any(not name for name in names):
        raise ValueError("run names must not be empty")
    if reference is not None and reference not in runs:
        raise ValueError(f"reference {reference!r} is not one of the runs {names}")
    preds = {str(name): read_predictions(path) for name, path in runs.items()}
    matched = _check_same_samples(preds, [group_by] if group_by else [])
    first = preds[names[0]]
    y = first.labels
    n, n_pos = len(first), int(y.sum())
    if not 0 < n_pos < n:
        raise PredictionsError(f"{first.path}: ROC AUC needs both classes, but all {n} labels are {int(y[0])}")

    groups: torch.Tensor | None = None
    n_groups: int | None = None
    blank: int | None = None
    grouped = group_by is not None and group_by in first.header
    if group_by is not None and grouped:
        groups, n_groups, blank = _group_ids(first, group_by)
    scores = torch.stack([preds[name].probs for name in names])
    reps = paired_auc_resamples(scores, y, groups=groups, n_boot=n_boot, seed=seed)
    if grouped:
        unit, stratified = str(group_by), f"whether a {group_by} holds a positive row"
        description = (
            f"{n_boot} paired bootstrap replicates of the {n_groups} {group_by}s (every row of a drawn {group_by} "
            f"comes along), stratified by {stratified}; seed {seed}; {100 * level:g}% percentile intervals"
        )
    else:
        unit, stratified = "row", "label"
        why = "" if group_by is None else f" (no {group_by!r} column)"
        description = (
            f"{n_boot} paired bootstrap replicates of the {n} rows{why}, stratified by label; seed {seed}; "
            f"{100 * level:g}% percentile intervals"
        )

    runs_out: list[dict[str, Any]] = []
    index = {name: i for i, name in enumerate(names)}
    aucs: dict[str, float] = {}
    for i, name in enumerate(names):
        aucs[name] = roc_auc(preds[name].probs, y)
        ci, n_ok = _interval(reps[i], level, f"run {name!r}")
        runs_out.append(
            {
                "name": name,
                "predictions": str(preds[name].path),
                "auc": aucs[name],
                "auc_ci": ci,
                "valid_resamples": n_ok,
                "roc": roc_points(preds[name].probs, y),
            }
        )
    if reference is not None:
        pairs = [(name, reference) for name in names if name != reference]
    else:
        pairs = [(names[j], names[i]) for i in range(len(names)) for j in range(i + 1, len(names))]
    differences: list[dict[str, Any]] = []
    for run, baseline in pairs:
        d = reps[index[run]] - reps[index[baseline]]
        ci, n_ok = _interval(d, level, f"{run} \u2212 {baseline}")
        d = d[torch.isfinite(d)]
        le, ge = float((d <= 0).double().mean()), float((d >= 0).double().mean())
        differences.append(
            {
                "run": run,
                "baseline": baseline,
                "label": f"{run} \u2212 {baseline}",
                "diff": aucs[run] - aucs[baseline],
                "ci": ci,
                "share_le_zero": le,
                "p_two_sided": min(1.0, 2.0 * min(le, ge)),
                "valid_resamples": n_ok,
            }
        )
    return {
        "num_samples": n,
        "num_positive": n_pos,
        "num_negative": n - n_pos,
        "matched_on": matched,
        "bootstrap": {
            "n_boot": int(n_boot),
            "seed": int(seed),
            "level": float(level),
            "paired": True,
            "unit": unit,
            "group_column": group_by if grouped else None,
            "num_groups": n_groups,
            "rows_without_group": blank,
            "stratified_by": stratified,
            "description": description,
        },
        "runs": runs_out,
        "reference": reference,
        "differences": differences,
    }


def _is_result(obj: object) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("runs"), list) and "differences" in obj


def plot_roc_comparison(
    result: Mapping[str, Any] | Mapping[str, str | os.PathLike[str]], path: PathLike, *, title: str | None = None
) -> Path:
    """One ROC plot with a curve per run, its AUC and CI in the legend, written atomically as PNG to ``path``.

    Args:
        result: the dict of :func:`compare_runs`, or a mapping run name -> ``predictions.csv`` (compared first
            with :func:`compare_runs`'s defaults).
        path: the PNG (a 5 x 5 in figure at :data:`volcnn.evaluation.plots.DPI`; folders created).
        title: the plot title (default: ``ROC comparison (N samples, P positive)``).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    res: Mapping[str, Any] = result if _is_result(result) else compare_runs(result)  # type: ignore[arg-type]
    level = float(res["bootstrap"]["level"])
    curves: dict[str, tuple[list[float], list[float]]] = {}
    aucs: dict[str, float | None] = {}
    cis: dict[str, tuple[float, float] | None] = {}
    for run in res["runs"]:
        label = str(run["name"])
        lo, hi = run["auc_ci"]
        if not math.isclose(level, 0.95):  # plot_roc's legend says "95% CI": put other levels in the name
            label = f"{label}, {100 * level:g}% CI {lo:.3f}\u2013{hi:.3f}"
        else:
            cis[label] = (lo, hi)
        curves[label] = (run["roc"]["fpr"], run["roc"]["tpr"])
        aucs[label] = run["auc"]
    heading = title if title is not None else (
        f"ROC comparison ({res['num_samples']} samples, {res['num_positive']} positive)"
    )  # fmt: skip
    return plot_roc(curves, path, aucs=aucs, ci=cis, title=heading)


def _md(text: object) -> str:
    return str(text).replace("|", "\\|")


def _p(value: float, n_valid: int) -> str:
    return f"< {1 / n_valid:.2g}" if value == 0 else f"{value:.3f}"


def format_comparison(result: Mapping[str, Any]) -> str:
    """The two tables of a :func:`compare_runs` result as Markdown: AUC [CI] per run, paired differences [CI]."""
    pct = f"{100 * float(result['bootstrap']['level']):g}%"
    lines = [f"| run | AUC | {pct} CI | predictions |", "|---|---|---|---|"]
    for run in result["runs"]:
        lo, hi = run["auc_ci"]
        lines.append(f"| {_md(run['name'])} | {run['auc']:.3f} | [{lo:.3f}, {hi:.3f}] | {_md(run['predictions'])} |")
    lines += [
        "",
        f"| paired difference | \u0394AUC | {pct} CI | share \u2264 0 | p (two-sided) |",
        "|---|---|---|---|---|",
    ]
    for d in result["differences"]:
        lo, hi = d["ci"]
        n_valid = int(d["valid_resamples"])
        lines.append(
            f"| {_md(d['label'])} | {d['diff']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {d['share_le_zero']:.3f} | "
            f"{_p(d['p_two_sided'], n_valid)} |"
        )
    return "\n".join(lines) + "\n"


def _markdown(result: Mapping[str, Any], png: str) -> str:
    boot = result["bootstrap"]
    n_runs = len(result["runs"])
    return (
        f"# Comparison of {n_runs} runs\n\n"
        f"{result['num_samples']} samples ({result['num_positive']} positive, {result['num_negative']} negative), "
        f"scored by every run (rows matched on {', '.join(result['matched_on'])}).\n\n"
        f"Bootstrap: {boot['description']}. A difference is the AUC of the first run minus that of the second, "
        "computed on the same resampled samples in every replicate; \u201cshare \u2264 0\u201d is the share of "
        "replicates in which the first run was not better.\n\n"
        f"{format_comparison(result)}\n"
        f"![ROC curves]({png})\n"
    )


def _html(result: Mapping[str, Any], path: Path, png: Path) -> None:
    boot = result["bootstrap"]
    pct = f"{100 * float(boot['level']):g}%"
    summary = {
        "samples": result["num_samples"],
        "positive": result["num_positive"],
        "negative": result["num_negative"],
        "rows matched on": ", ".join(result["matched_on"]),
        "bootstrap": boot["description"],
    }
    per_run = {
        r["name"]: {"AUC": r["auc"], f"{pct} CI": r["auc_ci"], "predictions": r["predictions"]} for r in result["runs"]
    }
    columns = ["paired difference", "\u0394AUC", f"{pct} CI low", f"{pct} CI high", "share \u2264 0", "p (two-sided)"]
    rows = [
        [d["label"], d["diff"], d["ci"][0], d["ci"][1], d["share_le_zero"], d["p_two_sided"]]
        for d in result["differences"]
    ]
    write_report_html(
        path,
        title=f"volcnn comparison of {len(result['runs'])} runs",
        summary=summary,
        sections=[("AUC per run", per_run)],
        images=[("ROC curves", png)],
        table=(columns, rows),
        notes=["A difference is the AUC of the first run minus that of the second, on the same resampled samples."],
    )


def write_comparison(
    out_dir: str | os.PathLike[str],
    runs: Mapping[str, str | os.PathLike[str]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    reference: str | None = None,
    group_by: str | None = "case",
) -> dict[str, Any]:
    """Compare ``runs`` (see :func:`compare_runs`) and write, atomically, into ``out_dir`` (created):

    * ``comparison.json``: the :func:`compare_runs` result plus ``files``;
    * ``roc_comparison.png``: :func:`plot_roc_comparison`;
    * ``comparison.md``: the tables of :func:`format_comparison` with a short explanation and the plot;
    * ``comparison.html``: the same as a self-contained page (:func:`volcnn.evaluation.html.write_report_html`).

    Returns:
        The ``comparison.json`` payload.

    Raises:
        PredictionsError, ValueError: as :func:`compare_runs` (nothing is written).
        OSError: the outputs cannot be written.
    """
    result = compare_runs(runs, n_boot=n_boot, seed=seed, level=level, reference=reference, group_by=group_by)
    out = Path(out_dir)
    files = {
        "json": "comparison.json",
        "roc": "roc_comparison.png",
        "markdown": "comparison.md",
        "html": "comparison.html",
    }
    result["files"] = files
    png = plot_roc_comparison(result, out / files["roc"])
    atomic_write_text(out / files["markdown"], _markdown(result, files["roc"]))
    _html(result, out / files["html"], png)
    atomic_write_json(out / files["json"], result)
    logger.info("comparison of %d runs written to %s", len(result["runs"]), out)
    return result
