"""Explaining a whole-volume prediction (volume mode): one saliency map for the volume, on the input's own grid.

A model trained on whole volumes sees each CT fitted into one patch (:class:`~volcnn.transforms.FitVolume`), so its
evidence is explained on that fitted patch: the :class:`~volcnn.explain.Explainer` of a finding, asked about the
patch's own centre voxel, cuts the patch out of itself unchanged (same voxels, same affine) and explains the log-odds
of ``class_index`` for it. The map is then resampled trilinearly onto the input CT's grid through world coordinates
(:func:`~volcnn.transforms.resample_to_grid`; the fitted patch's affine is exact, so the map lies on the anatomy it
was computed from) and written as ``OUT/volume_<method>.nii.gz`` with exactly the input's shape and affine, plus
``OUT/volume_<method>.png``: axial, coronal and sagittal slices of the whole scan through the map's peak
(:func:`~volcnn.explain.render_explanation_png`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from volcnn.core.atomic import atomic_write_bytes
from volcnn.core.geometry import as_affine, voxel_to_world
from volcnn.explain.cam import Explainer
from volcnn.explain.output import METHOD_LABELS
from volcnn.explain.render import render_explanation_png
from volcnn.io.writer import write_nifti
from volcnn.transforms.resample import resample_to_grid

__all__ = ["VOLUME_EXPLANATION_NAME", "explain_volume", "write_volume_explanation"]

#: file-name stem of a volume's explanation: ``volume_<method>.nii.gz`` / ``.png``
VOLUME_EXPLANATION_NAME = "volume"


def write_volume_explanation(
    saliency: np.ndarray,
    patch_affine: np.ndarray,
    ct: np.ndarray,
    input_affine: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    probability: float | None = None,
    target_layer: str | None = None,
) -> dict[str, Path]:
    """Write ``OUT/volume_<method>.nii.gz`` (the saliency on the input's grid) and ``OUT/volume_<method>.png``.

    Args:
        saliency: ``(px, py, pz)`` in [0, 1] on the fitted patch.
        patch_affine: ``(4, 4)`` patch index -> world RAS mm (the fitted patch's affine).
        ct: the input CT ``(X, Y, Z)`` on its own grid (HU), shown under the map; its shape is the NIfTI's.
        input_affine: the input's ``(4, 4)`` index -> world RAS mm.
        out_dir: the case folder.
        method: the method's name (file names, title).
        probability: the volume's probability, shown in the title.
        target_layer: the Grad-CAM layer, shown in the title.

    Returns:
        ``{"nifti": path, "png": path}``; both written atomically.
    """
    ct = np.asarray(ct)
    if ct.ndim != 3:
        raise ValueError(f"expected the input CT (X, Y, Z), got shape {ct.shape}")
    out = Path(out_dir)
    name = f"{VOLUME_EXPLANATION_NAME}_{method}"
    paths = {"nifti": out / f"{name}.nii.gz", "png": out / f"{name}.png"}
    affine = as_affine(input_affine)
    # the patch covers the whole volume (and the fit's padding): clamping at its border never reaches the scan
    on_input = resample_to_grid(np.asarray(saliency, dtype=np.float32), as_affine(patch_affine), ct.shape, affine)
    write_nifti(paths["nifti"], on_input, affine)
    peak = np.unravel_index(int(np.argmax(on_input)), on_input.shape) if on_input.max() > 0 else None
    centre = np.asarray(peak if peak is not None else (np.asarray(ct.shape) - 1) / 2.0, dtype=np.float64)
    world = voxel_to_world(affine, centre)
    label = METHOD_LABELS.get(method, method) + (f" ({target_layer})" if target_layer else "")
    title = f"whole volume: {label}" + (f"   p = {probability:.3f}" if probability is not None else "")
    where = "the map's peak" if peak is not None else "the volume's centre (no positive evidence)"
    png = render_explanation_png(
        ct,
        on_input,
        affine,
        world,
        title=title,
        subtitle=f"slices through {where} at RAS ({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm",
        fov_mm=None,
    )
    atomic_write_bytes(paths["png"], png)
    return paths


def explain_volume(
    patch: MetaTensor,
    network: nn.Module,
    ct: np.ndarray,
    input_affine: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    method: str = "gradcam",
    class_index: int = 1,
    target_layer: str | None = None,
    device: str | torch.device | None = None,
    probability: float | None = None,
) -> dict[str, Any]:
    """Explain the network's prediction for a fitted volume and write it on the input's grid.

    Args:
        patch: the fitted volume the network classified, MetaTensor ``(1, *patch_size)`` with its exact affine
            (:func:`~volcnn.transforms.evaluation_transforms` of an entry without ``center``).
        network: the classifier (not modified; the explainer works on a copy).
        ct: the input CT ``(X, Y, Z)`` on its own grid, for the NIfTI's shape and the PNG.
        input_affine: the input's ``(4, 4)`` index -> world RAS mm.
        out_dir: the case folder.
        method: one of :data:`~volcnn.explain.EXPLAIN_METHODS`.
        class_index: the class whose evidence is shown.
        target_layer: Grad-CAM layer (default per network, see :mod:`volcnn.explain.cam`).
        device: where the network runs (default: its parameters').
        probability: the volume's probability for the title (default: the explainer's own for the patch).

    Returns:
        ``{"name": "volume", "method", "target_layer", "class_index", "patch_probability", "nifti", "png"}``,
        ``nifti`` / ``png`` the file names within ``out_dir``.

    Raises:
        ValueError: ``patch`` is not ``(1, X, Y, Z)``, or an unknown method or layer (from :class:`Explainer`).
    """
    if patch.ndim != 4:
        raise ValueError(f"expected the fitted volume (C, X, Y, Z), got shape {tuple(patch.shape)}")
    size = tuple(int(s) for s in patch.shape[1:])
    explainer = Explainer(
        network, size, method=method, class_index=class_index, target_layer=target_layer, device=device
    )
    patch_affine = as_affine(patch.affine)
    # voxel size // 2 of the explained patch is the one nearest this point: the patch is cut out of itself whole
    explanation = explainer.explain(patch, voxel_to_world(patch_affine, np.asarray(size) // 2))
    paths = write_volume_explanation(
        explanation.saliency,
        explanation.patch_affine,
        ct,
        input_affine,
        out_dir,
        method=method,
        probability=explanation.probability if probability is None else probability,
        target_layer=explanation.target_layer,
    )
    return {
        "name": VOLUME_EXPLANATION_NAME,
        "method": method,
        "target_layer": explanation.target_layer,
        "class_index": int(class_index),
        "patch_probability": round(explanation.probability, 4),
        "nifti": paths["nifti"].name,
        "png": paths["png"].name,
    }
