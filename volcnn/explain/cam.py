"""Saliency of one finding: Grad-CAM, Grad-CAM++ or occlusion sensitivity on the patch the classifier saw.

The patch is cut the way whole-volume inference cuts its windows (:func:`~volcnn.inference.iter_window_batches`,
the centring of :class:`~volcnn.transforms.WorldPatchCrop`): voxel ``size // 2`` of the patch is the preprocessed
voxel nearest the finding, so the probability explained is the one the heat map recorded there. Patches reaching
beyond the scan are padded by replicating its border voxels, as inference does (``padding="constant"`` pads with
air instead, as training crops do).

The methods are MONAI's (:class:`monai.visualize.GradCAM`, :class:`~monai.visualize.GradCAMpp`,
:class:`~monai.visualize.OcclusionSensitivity`), run with these choices:

* The score explained is the **log-odds** of ``class_index``, ``l_c - logsumexp(l_k, k != c)`` (``l_1 - l_0`` for
  two classes), not the softmax probability: its gradient does not vanish when the probability saturates at 1.
* Grad-CAM's default layer is the last convolutional block of the network's trunk whose output still has at least
  :data:`MIN_CAM_GRID` cells along every axis at this patch size (a 1x1x1 map carries no location): for MONAI's
  ResNets (stride-2 stem) ``layer4``, else ``layer3``, ``layer2``, ``layer1``; for DenseNet121
  ``class_layers.relu`` (the ReLU after the final norm), else ``features.denseblock3``, ``denseblock2``,
  ``denseblock1``; for ``seed_cnn3d`` ``features.4`` (the ReLU of its last conv); for any other network its last
  ``Conv3d``. At 32^3 that is ``layer2`` (4^3 cells), ``features.denseblock2`` (4^3) and ``features.4`` (16^3); at
  64^3 ``layer3`` and ``features.denseblock3``. :func:`candidate_layers` lists them; ``target_layer`` overrides.
* Grad-CAM's layer-resolution map is put on the patch by linear interpolation between the receptive-field centres
  of the layer's cells (:mod:`volcnn.explain.cell_geometry`, measured once per explainer), not by MONAI's default
  upsampler, which assumes the cells tile the patch evenly and so misplaces the map: stretched 1.6x for
  ``valid_cnn3d`` (5.4 voxels off at the edges at 32^3), half a cell (3.5 voxels) for the ResNets' ``layer2``, 1.5
  voxels for DenseNet121's ``features.denseblock2``.
  Voxels beyond the outermost cell centres take the edge cell's value.
* Occlusion sensitivity occludes with MONAI's Gaussian mask (the centre of the mask becomes 0, air after the HU
  window); the saliency of a voxel is how much the log-odds drop when the region around it is occluded.
* Every saliency is clipped at 0 (only evidence *for* ``class_index``) and divided by its maximum, so it lies in
  [0, 1]; a patch with no positive evidence gives all zeros.

MONAI's hooks are put on a private copy of the network, whose in-place activations are switched off (an in-place
op on a hooked output breaks the backward hooks): the caller's network gets no hooks and is not modified.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn

from volcnn.core.geometry import as_affine, world_to_voxel
from volcnn.explain.cell_geometry import CellGeometry, cell_upsampler, layer_cell_geometry
from volcnn.networks.ensemble import EnsembleClassifier
from volcnn.networks.families import cam_layers
from volcnn.networks.introspect import in_channels as network_in_channels
from volcnn.networks.introspect import unwrap
from volcnn.transforms.crop import WorldPatchCrop

__all__ = [
    "EXPLAIN_METHODS",
    "MIN_CAM_GRID",
    "PADDING_MODES",
    "Explainer",
    "Explanation",
    "candidate_layers",
    "crop_patch",
    "default_target_layer",
    "explain_finding",
    "log_odds",
]

#: explanation methods: MONAI Grad-CAM, Grad-CAM++ and occlusion sensitivity
EXPLAIN_METHODS = ("gradcam", "gradcampp", "occlusion")
#: a default Grad-CAM layer has at least this many cells along every axis at the patch size
MIN_CAM_GRID = 4
#: how a patch reaching beyond the volume is completed: as inference does (``replicate``) or with air (``constant``)
PADDING_MODES = ("replicate", "constant")


@dataclass
class Explanation:
    """The saliency of one finding on its patch.

    Unpacks as ``saliency, patch_affine = explanation``.

    Attributes:
        saliency: float32 ``(px, py, pz)`` in [0, 1] on the patch grid; high = evidence for ``class_index``.
        patch_affine: float64 ``(4, 4)`` patch voxel index -> world RAS mm.
        probability: the classifier's probability of ``class_index`` for the patch.
        method: one of :data:`EXPLAIN_METHODS`.
        target_layer: the Grad-CAM layer (None for occlusion).
        class_index: the class explained.
        center_ras_mm: the finding, world RAS mm ``(3,)``.
    """

    saliency: np.ndarray
    patch_affine: np.ndarray
    probability: float
    method: str
    target_layer: str | None
    class_index: int
    center_ras_mm: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.saliency
        yield self.patch_affine


def log_odds(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    """Log-odds of ``class_index`` under a softmax: ``l_c - logsumexp(l_k, k != c)``; the logit itself when K is 1.

    Args:
        logits: ``(B, K)``.
        class_index: ``c`` in ``[0, K)``.

    Returns:
        ``(B,)``; ``sigmoid`` of it is the softmax probability of ``c`` (for K = 1, the sigmoid probability).
    """
    if logits.ndim != 2 or not 0 <= class_index < logits.shape[1]:
        raise ValueError(f"expected logits (B, K) with K > {class_index}, got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return logits[:, 0]
    others = torch.cat([logits[:, :class_index], logits[:, class_index + 1 :]], dim=1)
    return logits[:, class_index] - torch.logsumexp(others, dim=1)


class _LogOddsHooks(ModelWithHooks):
    """MONAI's hooked model, scoring a class by its log-odds instead of its raw logit."""

    def class_score(self, logits: torch.Tensor, class_idx: int) -> torch.Tensor:
        return log_odds(logits, int(class_idx))


def candidate_layers(network: nn.Module) -> list[str]:
    """The Grad-CAM layers preferred for ``network``, deepest first: its family's (MONAI ResNet, DenseNet,
    ``seed_cnn3d``; see :func:`volcnn.networks.cam_layers`), else its ``Conv3d`` modules, last first."""
    return cam_layers(network)


def _layer_names(network: nn.Module) -> list[str]:
    return [name for name, _ in unwrap(network).named_modules() if name]


def _unknown_layer(network: nn.Module, layer: str) -> ValueError:
    names = _layer_names(network)
    shown = ", ".join(names[:200]) + (f", ... ({len(names) - 200} more)" if len(names) > 200 else "")
    return ValueError(
        f"unknown target layer {layer!r}; suggested: {', '.join(candidate_layers(network)) or '(none)'}; "
        f"layers of this network: {shown}"
    )


def _output_shapes(network: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """Output shapes of the modules ``names`` in one forward pass of ``x``, in the order they ran."""
    modules = dict(network.named_modules())
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def _record(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and name not in {n for n, _ in seen}:
                seen.append((name, tuple(out.shape)))

        return _record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(x)
    finally:
        network.train(was_training)
        for h in handles:
            h.remove()
    return seen


def default_target_layer(network: nn.Module, patch_size: Sequence[int], in_channels: int | None = None) -> str:
    """The Grad-CAM layer used when none is named: the deepest of :func:`candidate_layers` whose output has at
    least :data:`MIN_CAM_GRID` cells along every axis for a ``patch_size`` input (the one with the largest grid when
    none has); found with one forward pass of zeros.

    Raises:
        ValueError: when the network has no candidate layer with a 3D output (name one with ``target_layer``).
    """
    net = unwrap(network)
    names = candidate_layers(net)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    channels = in_channels if in_channels is not None else network_in_channels(net, default=1)
    x = torch.zeros((1, channels, *(int(p) for p in patch_size)), device=device)
    shapes = [(n, s) for n, s in _output_shapes(net, names, x) if len(s) == 5]
    if not shapes:
        raise ValueError(
            f"no convolutional layer with a 3D output found for Grad-CAM; name one with target_layer "
            f"(layers of this network: {', '.join(_layer_names(net))})"
        )
    deep_first = list(reversed(shapes))  # execution order, deepest first
    for name, shape in deep_first:
        if min(shape[2:]) >= MIN_CAM_GRID:
            return name
    return max(deep_first, key=lambda ns: int(np.prod(ns[1][2:])))[0]


def crop_patch(
    image: torch.Tensor,
    center_ras_mm: Sequence[float] | np.ndarray,
    patch_size: Sequence[int],
    padding: str = "replicate",
) -> tuple[torch.Tensor, np.ndarray]:
    """The patch of ``patch_size`` voxels centred on a world point, as inference windows are cut.

    Args:
        image: preprocessed MetaTensor ``(C, X, Y, Z)`` with its affine (a plain tensor: identity affine).
        center_ras_mm: world RAS mm ``(3,)``; voxel ``size // 2`` of the patch is the voxel nearest it.
        patch_size: ``(px, py, pz)``.
        padding: ``"replicate"`` (border voxels, the window :func:`~volcnn.inference.iter_window_batches` cuts) or
            ``"constant"`` (0 = air, as :class:`~volcnn.transforms.WorldPatchCrop` in training).

    Returns:
        ``(patch, patch_affine)``: float32 ``(C, px, py, pz)`` plain tensor and float64 ``(4, 4)`` patch index ->
        world RAS mm (the affine :class:`~volcnn.transforms.WorldPatchCrop` gives).
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}")
    if image.ndim != 4:
        raise ValueError(f"expected a preprocessed volume (C, X, Y, Z), got shape {tuple(image.shape)}")
    size = [int(p) for p in patch_size]
    affine = as_affine(image.affine) if isinstance(image, MetaTensor) else np.eye(4)
    voxel = np.rint(world_to_voxel(affine, np.asarray(center_ras_mm, dtype=np.float64))).astype(np.int64)
    if np.any(voxel < 0) or np.any(voxel >= np.asarray(image.shape[1:])):
        raise ValueError(
            f"finding at {list(center_ras_mm)} mm (voxel {voxel.tolist()}) lies outside the preprocessed image "
            f"{list(image.shape[1:])}"
        )
    crop = WorldPatchCrop(size)(image, [float(c) for c in center_ras_mm])
    patch_affine = as_affine(crop.affine)
    if padding == "constant":
        return torch.as_tensor(crop, dtype=torch.float32).as_subclass(torch.Tensor), patch_affine
    # the window iter_window_batches cuts, padding only the part of the volume it needs
    shape = np.asarray(image.shape[1:])
    start = voxel - np.asarray(size) // 2
    end = start + np.asarray(size)
    a, b = np.clip(start, 0, shape), np.clip(end, 0, shape)
    data = torch.as_tensor(image).as_subclass(torch.Tensor)
    window = data[:, a[0] : b[0], a[1] : b[1], a[2] : b[2]].to(torch.float32)
    lo, hi = a - start, end - b
    if lo.any() or hi.any():
        pads: list[int] = []
        for axis in (2, 1, 0):  # F.pad lists the last dimension first
            pads += [int(lo[axis]), int(hi[axis])]
        window = F.pad(window[None], pads, mode="replicate")[0]
    return window.clone(), patch_affine


class Explainer:
    """Saliency maps of findings for one network; builds MONAI's explainer once for many findings.

    For Grad-CAM the target layer's :class:`~volcnn.explain.cell_geometry.CellGeometry` (``cell_geometry``) is
    measured here, once (a NaN probe of copies of the network on the CPU, cached by architecture; see
    :func:`~volcnn.explain.cell_geometry.layer_cell_geometry`), and puts every map on the patch.

    Args:
        network: classifier ``(B, C, *patch_size)`` -> logits ``(B, K)``; it is copied, never modified.
        patch_size: the network's input size ``(px, py, pz)`` in preprocessed voxels.
        method: one of :data:`EXPLAIN_METHODS`.
        class_index: the class whose evidence is shown (1 = nodule).
        target_layer: Grad-CAM layer name (``model.named_modules()``); default :func:`default_target_layer`.
            Only for ``gradcam`` / ``gradcampp``.
        device: where the network runs; default: the device of its parameters.
        padding: see :func:`crop_patch`.
        mask_size: occlusion mask in voxels (int or per axis); default a quarter of the patch, at least 2.
        overlap: overlap of successive occlusion masks, in [0, 1).
        batch_size: occluded patches per forward pass.

    Raises:
        ValueError: an unknown method, padding or layer (listing the known ones), or ``target_layer`` with
            occlusion.
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: Sequence[int],
        *,
        method: str = "gradcam",
        class_index: int = 1,
        target_layer: str | None = None,
        device: str | torch.device | None = None,
        padding: str = "replicate",
        mask_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        batch_size: int = 32,
    ) -> None:
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"unknown explanation method {method!r}; choose one of {', '.join(EXPLAIN_METHODS)}")
        if padding not in PADDING_MODES:
            raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}")
        if method == "occlusion" and target_layer is not None:
            raise ValueError("target_layer applies to Grad-CAM only (methods gradcam, gradcampp), not to occlusion")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes, got {patch_size}")
        self.method = method
        self.class_index = int(class_index)
        self.padding = padding
        source = unwrap(network)
        if device is None:
            param = next(source.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        # MONAI's hooks stay on the module they are put on and switch its in-place flag off: use a private copy
        with torch.inference_mode(False):  # a copy made under inference mode could not be differentiated
            self.network = copy.deepcopy(source).to(self.device).eval()
        for module in self.network.modules():  # an in-place op on a hooked output breaks the backward hooks
            if getattr(module, "inplace", False) is True:
                module.inplace = False  # type: ignore[assignment]
        self.target_layer: str | None = None
        #: where the Grad-CAM layer's cells sit on the patch (None for occlusion)
        self.cell_geometry: CellGeometry | None = None
        self._cam: GradCAM | None = None
        self._occlusion: OcclusionSensitivity | None = None
        self._cams: list[GradCAM] = []
        if method in ("gradcam", "gradcampp"):
            layers = _cam_layers(self.network, target_layer, self.patch_size)
            self.target_layer = layers[0] if len(layers) == 1 else "members.*." + layers[0].split(".", 2)[2]
            # before the hooks go on: the probe runs copies of the network (the members share an architecture)
            self.cell_geometry = layer_cell_geometry(self.network, layers[0], self.patch_size)
            cam_type = GradCAMpp if method == "gradcampp" else GradCAM
            for layer in layers:
                hooked = _LogOddsHooks(self.network, layer, register_forward=True, register_backward=True)
                self._cams.append(
                    cam_type(
                        hooked,  # type: ignore[arg-type]
                        layer,
                        upsampler=cell_upsampler(self.cell_geometry),
                        postprocessing=_identity,
                    )
                )
            self._cam = self._cams[0]
        else:
            if mask_size is None:
                mask = np.maximum(2, np.asarray(self.patch_size) // 4)
            else:
                mask = np.broadcast_to(np.asarray(mask_size, dtype=int), (3,))
            mask = np.minimum(np.maximum(mask, 1), self.patch_size)
            if not 0.0 <= overlap < 1.0:
                raise ValueError(f"overlap must be in [0, 1), got {overlap}")
            self.mask_size = tuple(int(m) for m in mask)
            self._occlusion = OcclusionSensitivity(
                self.network,
                mask_size=self.mask_size,
                n_batch=int(batch_size),
                verbose=False,
                mode="gaussian",
                overlap=float(overlap),
                activate=self._all_log_odds,
            )

    def _all_log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` logits -> ``(B, K)`` log-odds of every class (the occlusion map's channels)."""
        return torch.stack([log_odds(logits, k) for k in range(logits.shape[1])], dim=1)

    def explain(self, image: torch.Tensor, center_ras_mm: Sequence[float] | np.ndarray) -> Explanation:
        """Saliency of the finding at ``center_ras_mm`` in ``image``.

        Args:
            image: preprocessed MetaTensor ``(C, X, Y, Z)`` (RAS at the training ``pixdim``, windowed to [0, 1])
                with its affine.
            center_ras_mm: the finding, world RAS mm ``(3,)``.

        Returns:
            :class:`Explanation` (saliency ``(px, py, pz)`` in [0, 1] and the patch affine, probability, ...).
        """
        center = np.asarray(center_ras_mm, dtype=np.float64).reshape(3)
        patch, patch_affine = crop_patch(image, center, self.patch_size, self.padding)
        x = patch[None].to(self.device)  # (1, C, px, py, pz)
        # gradients are needed even when called under torch.inference_mode() / no_grad()
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()
            with torch.no_grad():
                score = float(log_odds(self.network(x).float(), self.class_index)[0])
            if self._cam is not None:
                x.requires_grad_(True)  # the backward hooks fire even for a network without trainable parameters
                try:  # an ensemble: the mean of its members' maps, each from the ensemble's own log-odds
                    raw = torch.stack([cam(x, class_idx=self.class_index)[0, 0].detach() for cam in self._cams]).mean(0)
                except RuntimeError as e:
                    if "BackwardHookFunction" not in str(e):
                        raise
                    raise ValueError(
                        f"Grad-CAM cannot hook layer {self.target_layer!r}: the network modifies its output in "
                        f"place; choose another layer (suggested: {', '.join(candidate_layers(self.network))})"
                    ) from e
                saliency = torch.clamp(raw.float(), min=0.0)
            else:
                assert self._occlusion is not None
                with torch.no_grad(), warnings.catch_warnings():
                    # MONAI 1.6 indexes with lists of slices, which torch deprecates (same result, a warning a call)
                    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
                    occluded, _ = self._occlusion(x)
                saliency = torch.clamp(score - occluded[0, self.class_index].float(), min=0.0)
        sal = saliency.as_subclass(torch.Tensor).cpu().numpy().astype(np.float32)
        top = float(sal.max()) if sal.size else 0.0
        sal = sal / top if top > 0 and np.isfinite(top) else np.zeros_like(sal)
        return Explanation(
            saliency=sal,
            patch_affine=patch_affine,
            probability=float(torch.sigmoid(torch.tensor(score))),
            method=self.method,
            target_layer=self.target_layer,
            class_index=self.class_index,
            center_ras_mm=center,
        )


def _cam_layers(network: nn.Module, target_layer: str | None, patch_size: Sequence[int]) -> list[str]:
    """The Grad-CAM layers of ``network``: ``[target_layer]`` (default :func:`default_target_layer`), or for an
    :class:`~volcnn.networks.EnsembleClassifier` the same layer in every member (``members.<i>.<layer>``, the
    default being the first member's :func:`default_target_layer`; a layer named inside one member, e.g.
    ``members.2.layer3``, explains that member only).

    Raises:
        ValueError: an unknown layer, listing the known ones.
    """
    names = set(_layer_names(network))
    members = getattr(unwrap(network), "members", None) if isinstance(unwrap(network), EnsembleClassifier) else None
    if members is not None:
        if target_layer is None:
            target_layer = default_target_layer(members[0], patch_size)
        if target_layer in names:
            return [target_layer]
        every = [f"members.{i}.{target_layer}" for i in range(len(members))]
        if all(name in names for name in every):
            return every
        raise _unknown_layer(network, target_layer)
    if target_layer is None:
        return [default_target_layer(network, patch_size)]
    if target_layer not in names:
        raise _unknown_layer(network, target_layer)
    return [target_layer]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def explain_finding(
    image: torch.Tensor,
    network: nn.Module,
    patch_size: Sequence[int],
    center_ras_mm: Sequence[float] | np.ndarray,
    *,
    method: str = "gradcam",
    class_index: int = 1,
    target_layer: str | None = None,
    device: str | torch.device | None = None,
    padding: str = "replicate",
    mask_size: int | Sequence[int] | None = None,
    overlap: float = 0.5,
) -> Explanation:
    """Saliency of one finding; ``saliency, patch_affine = explain_finding(...)``.

    Args:
        image: preprocessed MetaTensor ``(1, X, Y, Z)``: RAS at the training ``pixdim``, windowed to [0, 1],
            with its affine (as :func:`~volcnn.transforms.volume_transforms` gives).
        network: classifier ``(B, 1, *patch_size)`` -> logits ``(B, K)`` (not modified).
        patch_size: the network's input size in voxels.
        center_ras_mm: the finding, world RAS mm.
        method: ``"gradcam"`` (default), ``"gradcampp"`` or ``"occlusion"``.
        class_index: the class whose evidence is shown (1 = nodule).
        target_layer: Grad-CAM layer; default :func:`default_target_layer`.
        device, padding, mask_size, overlap: see :class:`Explainer`.

    Returns:
        :class:`Explanation`: ``saliency`` float32 ``(px, py, pz)`` in [0, 1] on the patch, ``patch_affine``
        ``(4, 4)`` patch index -> world RAS mm, and the patch's probability.
    """
    explainer = Explainer(
        network,
        patch_size,
        method=method,
        class_index=class_index,
        target_layer=target_layer,
        device=device,
        padding=padding,
        mask_size=mask_size,
        overlap=overlap,
    )
    return explainer.explain(image, center_ras_mm)
