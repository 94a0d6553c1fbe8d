"""Evaluation plots (ROC, confusion matrix, reliability diagram) rendered to PNG.

Figures are built with :class:`matplotlib.figure.Figure` and :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`
directly, never through ``pyplot``: the user's global backend and pyplot's figure registry are left untouched, and a
figure is freed as soon as it is rendered. The PNG is rendered into memory first and then written atomically, so a
failure leaves any previous file in place.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from volcnn.core.atomic import atomic_write_bytes

__all__ = ["DPI", "plot_calibration", "plot_confusion", "plot_roc"]

DPI = 120
"""Resolution of every PNG written here (a 5 x 5 in figure is 600 x 600 px)."""

PathLike = str | os.PathLike[str]


def _plain(text: object) -> str:
    """``text`` as a string that matplotlib draws literally (``$`` would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def _new_figure(width: float, height: float) -> Figure:
    """A free-standing figure with an Agg canvas attached (no pyplot, no global state)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    """Render ``fig`` to PNG bytes, free it, and write the bytes atomically to ``path``."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    finally:
        fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _as_1d(values: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _finite(value: object) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and math.isfinite(float(value))


def _roc_label(name: str, auc: float | None, ci: tuple[float, float] | None) -> str:
    label = _plain(name)
    parts: list[str] = []
    if auc is not None:
        parts.append(f"AUC = {float(auc):.3f}" if _finite(auc) else "AUC = n/a")
    if ci is not None and len(ci) == 2 and _finite(ci[0]) and _finite(ci[1]):
        parts.append(f"95% CI {float(ci[0]):.3f}\u2013{float(ci[1]):.3f}")
    return f"{label} ({', '.join(parts)})" if parts else label


def plot_roc(
    curves: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]],
    path: PathLike,
    *,
    aucs: Mapping[str, float | None] | None = None,
    ci: Mapping[str, tuple[float, float] | None] | None = None,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
    title: str = "ROC",
) -> Path:
    """Plot ROC curves, one line per entry of ``curves`` (``name -> (fpr, tpr)``), and write a PNG to ``path``.

    The legend shows each curve's AUC and 95% CI where ``aucs`` / ``ci`` give them (a missing or ``None`` entry
    is left out, a NaN AUC reads "n/a"). ``operating_points`` marks ``name -> (fpr, tpr)`` of the chosen threshold
    in the colour of that curve. Non-finite points of a curve are dropped. Axes are square, 0..1, with the
    chance diagonal. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    aucs = aucs or {}
    ci = ci or {}
    operating_points = operating_points or {}
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    colours: dict[str, str] = {}
    for i, (name, (fpr_in, tpr_in)) in enumerate(curves.items()):
        fpr, tpr = _as_1d(fpr_in, f"fpr of {name!r}"), _as_1d(tpr_in, f"tpr of {name!r}")
        if fpr.shape != tpr.shape:
            raise ValueError(f"curve {name!r}: fpr has {fpr.size} points but tpr has {tpr.size}")
        keep = np.isfinite(fpr) & np.isfinite(tpr)
        colour = f"C{i % 10}"
        colours[name] = colour
        ax.plot(fpr[keep], tpr[keep], color=colour, linewidth=1.8, label=_roc_label(name, aucs.get(name), ci.get(name)))
    labelled = False
    for name, point in operating_points.items():
        if len(point) != 2 or not (_finite(point[0]) and _finite(point[1])):
            continue
        ax.plot(
            [float(point[0])],
            [float(point[1])],
            marker="o",
            markersize=8,
            linestyle="none",
            markerfacecolor=colours.get(name, "black"),
            markeredgecolor="black",
            label=None if labelled else "operating point",
            zorder=5,
        )
        labelled = True
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 \u2212 specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(_plain(title))
    ax.grid(True, linewidth=0.5, alpha=0.4)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(
    matrix: npt.ArrayLike,
    class_names: Sequence[str],
    path: PathLike,
    *,
    title: str = "Confusion matrix",
    normalize: bool = False,
) -> Path:
    """Draw a confusion matrix heat-map (rows = true class, columns = predicted) and write a PNG to ``path``.

    Each cell shows its count and its percentage of the row (true class). With ``normalize`` the colours show the
    row fraction instead of the raw count, and the percentage is printed first. Text is white on dark cells.
    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    mat = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {mat.shape}")
    if mat.shape[0] != n:
        raise ValueError(f"confusion matrix is {mat.shape[0]}x{mat.shape[1]} but {n} class names were given")
    row_sum = mat.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(row_sum > 0, mat / np.where(row_sum > 0, row_sum, 1.0), np.nan)
    shown = np.nan_to_num(frac) if normalize else mat
    vmax = 1.0 if normalize else max(float(np.nanmax(mat)) if mat.size else 0.0, 1.0)
    norm = Normalize(vmin=0.0, vmax=vmax)
    cmap = colormaps["Blues"]

    side = min(12.0, max(5.0, 0.9 * n + 3.0))
    fig = _new_figure(side + 0.8, side)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, shrink=0.8)
    cbar.set_label("fraction of true class" if normalize else "count")
    integral = bool(np.all(np.isfinite(mat)) and np.all(mat == np.round(mat)))
    fontsize = float(np.clip(13.0 * (side - 2.5) / max(n, 1), 6.0, 12.0))  # ~18% of a cell's height
    for r in range(n):
        for c in range(n):
            value = mat[r, c]
            count = str(int(value)) if integral else f"{value:.4g}"
            pct = "\u2014" if math.isnan(frac[r, c]) else f"{100.0 * frac[r, c]:.1f}%"
            text = f"{pct}\n(n={count})" if normalize else f"{count}\n{pct}"
            red, green, blue, _ = cmap(norm(shown[r, c]))
            luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
            ax.text(
                c,
                r,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if luminance < 0.5 else "black",
            )
    labels = [_plain(name) for name in class_names]
    long_labels = max((len(label) for label in labels), default=0) > 6
    ax.set_xticks(range(n), labels, rotation=45 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(_plain(title))
    return _save(fig, path)


def plot_calibration(
    mean_confidence: npt.ArrayLike,
    observed_frequency: npt.ArrayLike,
    count: npt.ArrayLike,
    path: PathLike,
    *,
    ece: float | None = None,
    title: str = "Calibration",
) -> Path:
    """Draw a reliability diagram with a histogram of bin counts below it, and write a PNG to ``path``.

    The three arrays hold one value per confidence bin; bins are taken as equal-width over [0, 1]. Bins with
    count 0 or a non-finite mean are skipped in the diagram (their counts still show as 0 in the histogram).
    ``ece``, when given, is shown in the title. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    conf = _as_1d(mean_confidence, "mean_confidence")
    freq = _as_1d(observed_frequency, "observed_frequency")
    counts = _as_1d(count, "count")
    if not (conf.size == freq.size == counts.size):
        raise ValueError(
            f"mean_confidence, observed_frequency and count must have the same length, "
            f"got {conf.size}, {freq.size}, {counts.size}"
        )
    n_bins = conf.size
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / n_bins if n_bins else 1.0
    counts_shown = np.where(np.isfinite(counts), counts, 0.0)
    keep = np.isfinite(conf) & np.isfinite(freq) & (counts_shown > 0)

    fig = _new_figure(5.0, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    top.bar(
        centres[keep],
        freq[keep],
        width=width,
        color="C0",
        alpha=0.25,
        edgecolor="C0",
        linewidth=0.5,
        label="observed frequency (bin)",
    )
    top.plot(conf[keep], freq[keep], marker="o", color="C0", linewidth=1.5, label="model (mean confidence)")
    top.set_xlim(0.0, 1.0)
    top.set_ylim(0.0, 1.0)
    top.set_ylabel("Observed frequency")
    top.grid(True, linewidth=0.5, alpha=0.4)
    top.legend(loc="upper left", fontsize="small")
    heading = _plain(title)
    if ece is not None:
        heading += f" (ECE = {float(ece):.4f})" if _finite(ece) else " (ECE = n/a)"
    top.set_title(heading)

    bottom.bar(centres, counts_shown, width=width, color="0.5", edgecolor="0.3", linewidth=0.5)
    bottom.set_xlim(0.0, 1.0)
    bottom.set_xlabel("Mean predicted confidence")
    bottom.set_ylabel("Count")
    bottom.grid(True, axis="y", linewidth=0.5, alpha=0.4)
    return _save(fig, path)
