"""Writing explanations: the saliency on the input's own voxel grid (NIfTI) and a PNG of three slices, per finding.

``OUT/NAME_METHOD.nii.gz`` has exactly the input CT's shape and affine (whatever its orientation: RAS, LPS,
permuted, oblique), the saliency in [0, 1] inside the explained patch and 0 outside it, so it overlays the scan in
any viewer. ``OUT/NAME_METHOD.png`` shows axial, coronal and sagittal slices through the finding
(:func:`~volcnn.explain.render.render_explanation_png`). Both are written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from volcnn.core.atomic import atomic_write_bytes
from volcnn.core.geometry import as_affine, translate, voxel_to_world, world_to_voxel
from volcnn.explain.cam import Explainer
from volcnn.explain.render import render_explanation_png
from volcnn.io.types import Volume
from volcnn.io.volume import load_volume
from volcnn.io.writer import write_nifti
from volcnn.transforms.resample import resample_to_grid
from volcnn.transforms.volume_cache import preprocess_volume

__all__ = ["METHOD_LABELS", "explain_findings", "paste_to_grid", "write_explanation"]

logger = logging.getLogger(__name__)

#: human-readable method names for titles
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "occlusion": "occlusion sensitivity"}


def paste_to_grid(
    saliency: np.ndarray, patch_affine: np.ndarray, out_shape: Sequence[int], out_affine: np.ndarray
) -> np.ndarray:
    """Resample a patch's values onto another voxel grid through world coordinates, 0 outside the patch.

    The patch is given a one-voxel border of zeros, then resampled trilinearly
    (:func:`~volcnn.transforms.resample_to_grid`) over the output voxels within its bounding box only, so the cost
    does not grow with the size of the output grid and values fall to 0 within one patch voxel of its edge.

    Args:
        saliency: ``(px, py, pz)``.
        patch_affine: ``(4, 4)`` patch index -> world mm.
        out_shape: output ``(X, Y, Z)``.
        out_affine: ``(4, 4)`` output index -> world mm (any orientation).

    Returns:
        float32 ``out_shape``.
    """
    sal = np.asarray(saliency, dtype=np.float32)
    if sal.ndim != 3:
        raise ValueError(f"expected a 3D patch, got shape {sal.shape}")
    shape = np.asarray([int(s) for s in out_shape])
    out = np.zeros(tuple(shape.tolist()), dtype=np.float32)
    padded = np.pad(sal, 1)
    padded_affine = as_affine(patch_affine) @ translate([-1.0, -1.0, -1.0])
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in padded.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    where = world_to_voxel(out_affine, voxel_to_world(padded_affine, corners))
    lo = np.clip(np.floor(where.min(axis=0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(where.max(axis=0)).astype(int) + 1, 0, shape)
    if np.any(hi <= lo):
        return out  # the patch lies outside the output grid
    sub = resample_to_grid(padded, padded_affine, (hi - lo).tolist(), as_affine(out_affine) @ translate(lo))
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = sub
    return out


def _display_grid(image: Any, input_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z), affine)`` of a display image: a MetaTensor ``(1, X, Y, Z)`` / ``(X, Y, Z)`` with its
    affine, or an array on the input's grid."""
    affine = as_affine(image.affine) if isinstance(image, MetaTensor) else as_affine(input_affine)
    if isinstance(image, torch.Tensor):
        array = image.detach().as_subclass(torch.Tensor).float().cpu().numpy()
    else:
        array = np.asarray(image, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a display image (1, X, Y, Z) or (X, Y, Z), got shape {array.shape}")
    return array, affine


def write_explanation(
    saliency: np.ndarray,
    patch_affine: np.ndarray,
    input_shape: Sequence[int],
    input_affine: np.ndarray,
    image_for_display: torch.Tensor | np.ndarray,
    out_dir: str | os.PathLike[str],
    name: str,
    *,
    method: str = "gradcam",
    center_ras_mm: Sequence[float] | np.ndarray | None = None,
    probability: float | None = None,
    target_layer: str | None = None,
    fov_mm: float | None = None,
) -> dict[str, Path]:
    """Write ``OUT/NAME_METHOD.nii.gz`` (saliency on the input's grid) and ``OUT/NAME_METHOD.png``, atomically.

    Args:
        saliency: ``(px, py, pz)`` in [0, 1] on the patch (:func:`~volcnn.explain.explain_finding`).
        patch_affine: ``(4, 4)`` patch index -> world RAS mm.
        input_shape: the input CT's ``(X, Y, Z)``.
        input_affine: the input CT's ``(4, 4)`` index -> world RAS mm (:attr:`volcnn.io.Volume.affine`).
        image_for_display: the CT shown under the saliency: the preprocessed MetaTensor ``(1, X, Y, Z)`` (its
            own affine is used), or an array ``(X, Y, Z)`` on the input's grid (HU or windowed).
        out_dir: output folder (created).
        name: file-name stem, e.g. ``finding01``.
        method: the method's name, used in the file names and the title.
        center_ras_mm: the finding, world RAS mm (marker and slice position); default: the patch centre.
        probability: the finding's probability, shown in the title.
        target_layer: the Grad-CAM layer, shown in the title.
        fov_mm: side of the PNG's field of view in mm; default three times the patch's largest side.

    Returns:
        ``{"nifti": path, "png": path}``.
    """
    sal = np.asarray(saliency, dtype=np.float32)
    patch_affine = as_affine(patch_affine)
    out = Path(out_dir)
    paths = {"nifti": out / f"{name}_{method}.nii.gz", "png": out / f"{name}_{method}.png"}
    on_input = paste_to_grid(sal, patch_affine, input_shape, input_affine)
    write_nifti(paths["nifti"], on_input, as_affine(input_affine))

    ct, ct_affine = _display_grid(image_for_display, input_affine)
    on_display = on_input if ct.shape == tuple(on_input.shape) and np.allclose(ct_affine, input_affine) else None
    if on_display is None:
        on_display = paste_to_grid(sal, patch_affine, ct.shape, ct_affine)
    if center_ras_mm is None:
        center_ras_mm = voxel_to_world(patch_affine, np.asarray(sal.shape) // 2)
    patch_mm = np.asarray(sal.shape) * np.sqrt((patch_affine[:3, :3] ** 2).sum(axis=0))
    label = METHOD_LABELS.get(method, method) + (f" ({target_layer})" if target_layer else "")
    title = f"{name}: {label}" + (f"   p = {probability:.3f}" if probability is not None else "")
    c = np.asarray(center_ras_mm, dtype=np.float64)
    png = render_explanation_png(
        ct,
        on_display,
        ct_affine,
        c,
        title=title,
        subtitle=f"finding at RAS ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm",
        fov_mm=float(fov_mm) if fov_mm is not None else 3.0 * float(patch_mm.max()),
    )
    atomic_write_bytes(paths["png"], png)
    return paths


def _setting(settings: Any, key: str, default: Any = None, required: bool = False) -> Any:
    """``settings[key]`` of a mapping or ``settings.key`` of an object (a runner), ``default`` when absent."""
    value = settings.get(key, default) if isinstance(settings, Mapping) else getattr(settings, key, default)
    if value is None and required:
        raise ValueError(f"settings lack {key!r} (give a runner, or a mapping with patch_size, pixdim, hu_window)")
    return value


def explain_findings(
    image: str | os.PathLike[str] | Volume,
    network: nn.Module,
    settings: Any,
    findings: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    top: int = 1,
    method: str = "gradcam",
    *,
    target_layer: str | None = None,
    preprocessed: MetaTensor | None = None,
    input_grid: tuple[Sequence[int], np.ndarray] | None = None,
    scale_images: Mapping[float, MetaTensor] | None = None,
) -> list[dict[str, Any]]:
    """Explain the ``top`` most probable findings of one case; write their NIfTI and PNG into ``out_dir``.

    Args:
        image: the input CT: a path (NIfTI, MetaImage, DICOM folder) or a loaded :class:`~volcnn.io.Volume`.
        network: the classifier (not modified).
        settings: an :class:`~volcnn.inference.InferenceRunner`, or a mapping, giving ``patch_size`` and
            optionally ``pixdim`` (default 1 mm), ``intensity`` (default ``hu``), ``hu_window`` (default [-1000,
            400]), ``class_index`` (default 1) and ``device`` (default: the network's).
        findings: ``findings.json``'s ``findings``: ``[{"center_ras_mm": [x, y, z], "probability": p}, ...]``.
        out_dir: output folder, e.g. the case folder.
        top: how many findings, most probable first.
        method: ``"gradcam"``, ``"gradcampp"`` or ``"occlusion"``.
        target_layer: Grad-CAM layer (default per network, see :mod:`volcnn.explain.cam`).
        preprocessed: the preprocessed MetaTensor ``(1, X, Y, Z)`` when the caller already has it (skips
            preprocessing again).
        input_grid: ``(shape, affine)`` of the input CT when the caller already has them; with ``preprocessed``
            the input is not read at all (``image`` then only names it).
        scale_images: the preprocessed image of each coarser scale of a multi-scale heat map
            (:mod:`volcnn.inference.scales`): a finding with a ``scale`` found there is explained on the window the
            classifier saw at that scale.

    Returns:
        One dict per explained finding: ``{"rank", "name", "center_ras_mm", "probability", "patch_probability",
        "method", "target_layer", "class_index", "nifti", "png"}``; ``rank`` is the finding's 1-based position in
        ``findings`` and ``nifti`` / ``png`` are the file names within ``out_dir``. Empty when there are no
        findings or ``top`` is 0.
    """
    chosen = sorted(enumerate(findings), key=lambda f: -float(f[1].get("probability", 0.0)))[: max(0, int(top))]
    patch_size = tuple(int(p) for p in _setting(settings, "patch_size", required=True))
    pixdim = _setting(settings, "pixdim", (1.0, 1.0, 1.0), required=True)
    hu_window = _setting(settings, "hu_window", (-1000.0, 400.0), required=True)
    intensity = str(_setting(settings, "intensity", "hu", required=True))
    class_index = int(_setting(settings, "class_index", 1, required=True))
    device = _setting(settings, "device")
    explainer = Explainer(
        network, patch_size, method=method, class_index=class_index, target_layer=target_layer, device=device
    )
    if not chosen:
        return []
    volume: Volume | None = None
    if preprocessed is None or input_grid is None:
        volume = image if isinstance(image, Volume) else load_volume(image)
    if input_grid is not None:
        shape, affine = tuple(int(s) for s in input_grid[0]), as_affine(input_grid[1])
    else:
        assert volume is not None
        shape, affine = tuple(int(s) for s in volume.array.shape), volume.affine.copy()
    if preprocessed is not None:
        prepared = preprocessed
    else:
        assert volume is not None
        prepared = preprocess_volume(volume, pixdim, hu_window, intensity)
    del volume
    results: list[dict[str, Any]] = []
    for index, finding in chosen:
        rank = index + 1
        name = f"finding{rank:02d}"
        center = [float(v) for v in finding["center_ras_mm"]]
        window_image = (scale_images or {}).get(float(finding.get("scale", 1.0)), prepared)
        explanation = explainer.explain(window_image, center)
        probability = finding.get("probability")
        paths = write_explanation(
            explanation.saliency,
            explanation.patch_affine,
            shape,
            affine,
            prepared,
            out_dir,
            name,
            method=method,
            center_ras_mm=center,
            probability=float(probability) if probability is not None else explanation.probability,
            target_layer=explanation.target_layer,
        )
        results.append(
            {
                "rank": rank,
                "name": name,
                "center_ras_mm": center,
                "probability": None if probability is None else float(probability),
                "patch_probability": round(explanation.probability, 4),
                "method": method,
                "target_layer": explanation.target_layer,
                "class_index": class_index,
                "nifti": paths["nifti"].name,
                "png": paths["png"].name,
            }
        )
        logger.debug("explained %s at %s mm (%s): %s", name, center, method, paths["png"])
    return results
