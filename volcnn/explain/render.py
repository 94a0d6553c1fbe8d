"""A PNG of a finding's saliency: axial, coronal and sagittal slices through the finding, CT in grey with the
saliency overlaid, rendered with matplotlib (``Figure`` + Agg canvas, no pyplot, no change of global state).

Slices are shown in the radiological convention: patient right on the viewer's left (axial, coronal), anterior
on the left (sagittal), anterior / superior at the top; axes are millimetres from the finding, so anisotropic
voxels keep their true proportions. The CT and the saliency are brought to RAS voxel order first (axis flips and
permutations only; an oblique scan is shown along its nearest axes).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from volcnn.core.geometry import as_affine, world_to_voxel

__all__ = ["SALIENCY_CMAP", "render_explanation_png", "to_ras"]

#: matplotlib colormap of the saliency overlay
SALIENCY_CMAP = "jet"
#: saliency below this is not drawn (the CT shows through)
_SALIENCY_FLOOR = 0.1
_OVERLAY_ALPHA = 0.35
# per view: the fixed RAS axis, the (horizontal, vertical) axes, and the labels (left, right, top, bottom)
_VIEWS = (
    ("axial", 2, (0, 1), ("R", "L", "A", "P")),
    ("coronal", 1, (0, 2), ("R", "L", "S", "I")),
    ("sagittal", 0, (1, 2), ("A", "P", "S", "I")),
)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip / permute ``array`` ``(X, Y, Z)`` so that its axes run along R, A, S (nearest axes when oblique).

    Returns:
        ``(array_ras, affine_ras)``; ``affine_ras`` maps the new indices to the same world points.
    """
    ornt = nib.orientations.io_orientation(as_affine(affine))
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    out = nib.orientations.apply_orientation(np.asarray(array), transform)
    new_affine = as_affine(affine) @ nib.orientations.inv_ornt_aff(transform, np.asarray(array).shape)
    return np.ascontiguousarray(out), new_affine


def render_explanation_png(
    ct: np.ndarray,
    saliency: np.ndarray,
    affine: np.ndarray,
    center_ras_mm: Sequence[float] | np.ndarray,
    *,
    title: str = "",
    subtitle: str = "",
    fov_mm: float | Sequence[float] | None = None,
    ct_range: tuple[float, float] | None = None,
    dpi: int = 100,
) -> bytes:
    """Three orthogonal slices through ``center_ras_mm``, saliency over the CT, a marker at the finding.

    Args:
        ct: ``(X, Y, Z)`` intensities (windowed [0, 1], or HU).
        saliency: ``(X, Y, Z)`` in [0, 1] on the same grid.
        affine: ``(4, 4)`` index -> world RAS mm of that grid (any orientation).
        center_ras_mm: the finding, world RAS mm.
        title: figure title (e.g. the probability); ``subtitle``: a second, smaller line.
        fov_mm: side of the square field of view around the finding, mm (per view axis or one value);
            None shows whole slices.
        ct_range: grey-level range; default [0, 1] for windowed data, else the lung window [-1000, 400] HU.
        dpi: resolution.

    Returns:
        The PNG file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ct = np.asarray(ct, dtype=np.float32)
    saliency = np.asarray(saliency, dtype=np.float32)
    if ct.ndim != 3 or ct.shape != saliency.shape:
        raise ValueError(f"ct {ct.shape} and saliency {saliency.shape} must be the same 3D shape")
    ct_ras, aff = to_ras(ct, affine)
    sal_ras, _ = to_ras(saliency, affine)
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    shape = np.asarray(ct_ras.shape)
    cont = world_to_voxel(aff, np.asarray(center_ras_mm, dtype=np.float64))
    voxel = np.clip(np.rint(cont), 0, shape - 1).astype(int)
    if ct_range is None:
        finite = ct_ras[np.isfinite(ct_ras)]
        windowed = finite.size == 0 or (float(finite.min()) >= -0.01 and float(finite.max()) <= 1.01)
        ct_range = (0.0, 1.0) if windowed else (-1000.0, 400.0)
    fov = None if fov_mm is None else np.broadcast_to(np.asarray(fov_mm, dtype=np.float64), (3,))

    fig = Figure(figsize=(11.0, 4.2), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    overlay = None
    for ax, (name, fixed, (h, v), labels) in zip(axes, _VIEWS, strict=True):
        index: list[int | slice] = [slice(None)] * 3
        index[fixed] = int(voxel[fixed])
        plane, sal = ct_ras[tuple(index)], sal_ras[tuple(index)]  # (n_h, n_v): remaining axes in order h < v
        # millimetres from the slice's voxel through the finding; pixel edges half a voxel out
        extent = (
            (-voxel[h] - 0.5) * spacing[h],
            (shape[h] - voxel[h] - 0.5) * spacing[h],
            (-voxel[v] - 0.5) * spacing[v],
            (shape[v] - voxel[v] - 0.5) * spacing[v],
        )
        ax.set_facecolor("black")  # beyond the scan
        ax.imshow(plane.T, cmap="gray", vmin=ct_range[0], vmax=ct_range[1], origin="lower", extent=extent)
        overlay = ax.imshow(
            np.ma.masked_less(sal.T, _SALIENCY_FLOOR),
            cmap=SALIENCY_CMAP,
            vmin=0.0,
            vmax=1.0,
            alpha=_OVERLAY_ALPHA,
            origin="lower",
            extent=extent,
            interpolation="nearest",
        )
        mark = ((cont[h] - voxel[h]) * spacing[h], (cont[v] - voxel[v]) * spacing[v])
        ax.plot(*mark, marker="+", color="lime", markersize=14, markeredgewidth=1.5)
        ax.plot(*mark, marker="o", color="lime", markersize=22, fillstyle="none", markeredgewidth=1.0)
        if fov is not None:
            ax.set_xlim(fov[h] / 2, -fov[h] / 2)
            ax.set_ylim(-fov[v] / 2, fov[v] / 2)
        else:
            ax.set_xlim(extent[1], extent[0])  # radiological: R (axial, coronal) / A (sagittal) on the left
            ax.set_ylim(extent[2], extent[3])
        ax.set_aspect("equal")
        ax.set_title(f"{name} ({'xyz'[fixed]} = {int(voxel[fixed])})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("mm", fontsize=7)
        for text, pos, align in zip(
            labels,
            ((0.02, 0.5), (0.98, 0.5), (0.5, 0.98), (0.5, 0.02)),
            (("left", "center"), ("right", "center"), ("center", "top"), ("center", "bottom")),
            strict=True,
        ):
            ax.text(*pos, text, transform=ax.transAxes, color="yellow", fontsize=9, ha=align[0], va=align[1])
    if overlay is not None:
        fig.colorbar(overlay, ax=list(axes), shrink=0.8, label="saliency")
    if title or subtitle:
        fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
