"""The FROC curve of a nodule detector rendered to PNG, LUNA16 style.

Like :mod:`volcnn.evaluation.plots`, the figure is built on an Agg canvas without ``pyplot`` and written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.ticker import FixedLocator, NullLocator

from volcnn.evaluation.froc import LUNA16_FP_RATES
from volcnn.evaluation.plots import PathLike, _as_1d, _new_figure, _plain, _save

__all__ = ["FROC_MAX_FPS", "FROC_MIN_FPS", "plot_froc"]

FROC_MIN_FPS = 0.125
"""Left end of the FP axis (FPs per scan)."""
FROC_MAX_FPS = 8.0
"""Right end of the FP axis (FPs per scan)."""
_TICK_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")  # one per LUNA16 rate


def plot_froc(
    fps_per_scan: npt.ArrayLike,
    sensitivity: npt.ArrayLike,
    path: PathLike,
    *,
    cpm: float | None = None,
    operating_points: Mapping[float, float] | Mapping[str, float] | None = None,
    title: str = "FROC",
) -> Path:
    """Draw a FROC curve (sensitivity against average FPs per scan) and write a PNG to ``path``.

    The x axis is logarithmic (base 2) from 1/8 to 8 FPs per scan, ticked at the seven LUNA16 rates. The curve is
    drawn as the LUNA16 script draws it: the sensitivity interpolated linearly in FPs per scan between the given
    points, starting from the origin ``(0, 0)`` (so it reads the same values as
    :func:`volcnn.evaluation.froc.sensitivity_at`). ``operating_points`` (``rate -> sensitivity``, keys as numbers
    or as the strings of :func:`volcnn.evaluation.froc.rate_key`) are marked and labelled; ``cpm`` goes in the
    title (non-finite reads "n/a"). Returns ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the two arrays differ in length, are not 1-D, or ``fps_per_scan`` decreases.
    """
    fps, sens = _as_1d(fps_per_scan, "fps_per_scan"), _as_1d(sensitivity, "sensitivity")
    if fps.shape != sens.shape:
        raise ValueError(f"fps_per_scan has {fps.size} points but sensitivity has {sens.size}")
    keep = np.isfinite(fps) & np.isfinite(sens)
    fps, sens = fps[keep], sens[keep]
    if np.any(np.diff(fps) < 0):
        raise ValueError("fps_per_scan must be non-decreasing (thresholds in descending order)")
    grid = np.geomspace(FROC_MIN_FPS, FROC_MAX_FPS, 600)
    curve = np.interp(grid, np.r_[0.0, fps], np.r_[0.0, sens])

    fig = _new_figure(6.0, 4.8)
    ax = fig.add_subplot()
    ax.plot(grid, curve, color="C0", linewidth=1.8, label="FROC")
    points = sorted((float(k), float(v)) for k, v in (operating_points or {}).items())
    points = [(r, s) for r, s in points if math.isfinite(r) and math.isfinite(s) and r > 0]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", linestyle="none", color="C1", markeredgecolor="black", label="LUNA16 rates")
        for x, y in points:  # labels at the axis ends lean inwards so that they stay inside the axes
            align = "left" if x <= FROC_MIN_FPS else "right" if x >= FROC_MAX_FPS else "center"
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 7), ha=align, fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_MIN_FPS, FROC_MAX_FPS)
    ax.set_ylim(0.0, 1.05)
    ax.xaxis.set_major_locator(FixedLocator(list(LUNA16_FP_RATES)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(list(_TICK_LABELS))
    ax.set_yticks(np.linspace(0.0, 1.0, 11))
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    heading = _plain(title)
    if cpm is not None:
        heading += f" (CPM = {float(cpm):.3f})" if math.isfinite(float(cpm)) else " (CPM = n/a)"
    ax.set_title(heading)
    ax.grid(True, which="both", linewidth=0.5, alpha=0.4)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)
