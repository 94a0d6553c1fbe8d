"""Orthogonal-slice views of 3-D patches with their label and predicted probability, rendered with matplotlib
(Agg canvas, no pyplot) for TensorBoard image summaries and reports."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PatchView", "patch_view", "render_patch_grid"]

_SLICE_NAMES = ("axial (D/2)", "coronal (H/2)", "sagittal (W/2)")


@dataclass
class PatchView:
    """One validation sample kept for the image summary: three 2-D slices, the label and the predicted probability."""

    slices: tuple[np.ndarray, np.ndarray, np.ndarray]  # (H, W), (D, W), (D, H)
    label: int | None
    prob: float | None
    pred_class: int | None  # set only with more than two classes

    def title(self) -> str:
        text = f"label={self.label if self.label is not None else '?'}"
        if self.prob is not None:
            text += f"  p={self.prob:.2f}"
            if self.pred_class is not None:
                text += f" (class {self.pred_class})"
        return text


def _to_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().as_subclass(torch.Tensor)  # drop MetaTensor metadata
    if isinstance(value, np.ndarray | np.generic | numbers.Number):
        return torch.as_tensor(np.asarray(value))
    return None


def patch_view(sample: Mapping[str, Any]) -> PatchView | None:
    """Central slices of channel 0 of ``sample["image"]`` (``(C, D, H, W)`` or ``(D, H, W)``), label and probability.

    ``sample["pred"]`` is taken as class probabilities ``(K,)`` (the bundles apply softmax in postprocessing): the
    probability shown is that of class 1 for ``K == 2``, of the only output for ``K == 1`` and of the predicted class
    for ``K > 2``. ``sample["label"]`` may be one-hot ``(K,)`` or a scalar / one-element tensor.

    None when there is no image, or nothing to show: a constant patch (as the zero placeholder that a clinical-only
    model gets instead of the CT, :class:`~volcnn.transforms.placeholder.PlaceholderImaged`).
    """
    image = _to_tensor(sample.get("image"))
    if image is None or image.ndim not in (3, 4):
        return None
    vol = image[0] if image.ndim == 4 else image
    if vol.numel() == 0 or bool(vol.max() == vol.min()):
        return None
    d, h, w = (int(s) for s in vol.shape)
    slices = tuple(s.float().cpu().numpy() for s in (vol[d // 2], vol[:, h // 2], vol[:, :, w // 2]))

    label: int | None = None
    lab = _to_tensor(sample.get("label"))
    if lab is not None and lab.numel() > 0:
        label = int(lab.reshape(-1).argmax()) if lab.numel() > 1 else int(round(float(lab.reshape(-1)[0])))

    prob: float | None = None
    pred_class: int | None = None
    pred = _to_tensor(sample.get("pred"))
    if pred is not None and pred.numel() > 0:
        p = pred.float().reshape(-1).cpu()
        if p.numel() == 1:
            prob = float(p[0])
        elif p.numel() == 2:
            prob = float(p[1])
        else:
            pred_class = int(p.argmax())
            prob = float(p[pred_class])
    return PatchView(slices=slices, label=label, prob=prob, pred_class=pred_class)  # type: ignore[arg-type]


def render_patch_grid(patches: Sequence[PatchView], dpi: int = 80) -> np.ndarray:
    """Draw the patches as a grid (one row per sample, three slice columns) and return it as a ``(3, H, W)`` uint8.

    Uses ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, no change of the global backend. Slices are
    shown with a grey colormap over ``[0, 1]`` (the inputs are windowed to that range).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(patches)
    fig = Figure(figsize=(6.0, 2.2 * n), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    subfigs = fig.subfigures(n, 1, squeeze=False)
    for row, patch in enumerate(patches):
        sub = subfigs[row, 0]
        sub.suptitle(patch.title(), fontsize=10)
        axes = sub.subplots(1, 3, squeeze=False)[0]
        for col, (ax, img) in enumerate(zip(axes, patch.slices, strict=True)):
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(_SLICE_NAMES[col], fontsize=8)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))
