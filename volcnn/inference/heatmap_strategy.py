"""How a heat map is made for one preprocessed volume: densely where the network allows and agrees with its
windows, window by window otherwise.

A network whose family splits into trunk and pooling head (:func:`~volcnn.inference.dense_split.split_classifier`)
gets a dense map (:func:`~volcnn.inference.dense_heatmap`: the trunk once per tile, only inside the body mask). The
dense map of a network that relies on its patches' zero padding differs from what the network says about each
window, so every dense map is checked against the window reference at a few points, and ``method="auto"`` falls
back to the window method when they differ by more than ``dense_tolerance`` (and keeps to windows for the rest of
the run: the disagreement comes from the network, not from the volume).

With ``flips`` (test-time augmentation) the map is the mean of four: the volume as it is and mirrored along each
axis, each mirrored map flipped back. The volume is first extended (replicating its last voxels, which is what
every window reaching beyond it sees anyway) to ``(g - 1) * step + 1`` voxels per axis, so that mirroring maps the
heat-map grid onto itself point for point; the check against windows runs on the unmirrored map only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.core.geometry import as_affine
from volcnn.inference.body_mask import body_mask
from volcnn.inference.dense import DEFAULT_TILE_MB, dense_heatmap, dense_window_difference
from volcnn.inference.dense_split import SplitClassifier, split_classifier
from volcnn.inference.heatmap import classifier_heatmap, heatmap_grid, select_windows
from volcnn.networks.ensemble import EnsembleClassifier
from volcnn.networks.introspect import unwrap

__all__ = ["HEATMAP_METHODS", "HeatmapStrategy", "grid_step"]

logger = logging.getLogger(__name__)

HEATMAP_METHODS = ("auto", "dense", "window")


def grid_step(image: torch.Tensor, heat_affine: np.ndarray) -> list[int]:
    """Voxels between heat-map grid points per axis: ``heat_affine = image.affine @ diag(step, 1)``."""
    affine = as_affine(image.affine) if hasattr(image, "affine") else np.eye(4)
    return [int(v) for v in np.rint(np.linalg.solve(affine, as_affine(heat_affine)).diagonal()[:3])]


class HeatmapStrategy:
    """Makes the heat map of a preprocessed ``(1, X, Y, Z)`` volume by the method asked for.

    Args:
        network: classifier ``(B, 1, *patch_size)`` -> logits ``(B, K)``, already on ``device`` in eval mode.
        patch_size: the network's input size in voxels.
        hu_window: the preprocessing's HU window (for the body mask).
        stride_mm: grid step in mm.
        batch_size: windows per forward pass of the window method and the dense check.
        device: where the network runs.
        class_index: the softmax channel mapped.
        skip_air: the window method skips windows centred on air, the dense method everything outside the body.
        method: ``"auto"``, ``"dense"`` (always; a disagreement is only logged) or ``"window"``.
        dense_check_points: grid points at which a dense map is compared with windows (0: no check).
        dense_tolerance: largest probability difference at those points for ``"auto"`` to keep the dense map.
        dense_halo: context per dense tile (see :func:`~volcnn.inference.plan_dense`).
        tile_mb: memory budget of one dense tile.
        progress: tqdm bars.
        flips: average the map over the volume mirrored along each axis (4 maps; see the module docstring).

    Raises:
        ValueError: an unknown ``method``, or ``method="dense"`` for a network that cannot be split.
    """

    def __init__(
        self,
        network: nn.Module,
        patch_size: Sequence[int],
        *,
        hu_window: Sequence[float] = (-1000.0, 400.0),
        stride_mm: float = 4.0,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        class_index: int = 1,
        skip_air: bool = True,
        method: str = "auto",
        dense_check_points: int = 32,
        dense_tolerance: float = 0.05,
        dense_halo: int | str = "window",
        tile_mb: float = DEFAULT_TILE_MB,
        progress: bool = False,
        flips: bool = False,
    ) -> None:
        if method not in HEATMAP_METHODS:
            raise ValueError(f"unknown heat-map method {method!r}; choose one of {', '.join(HEATMAP_METHODS)}")
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.stride_mm = float(stride_mm)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.class_index = int(class_index)
        self.skip_air = bool(skip_air)
        self.method = method
        self.dense_check_points = int(dense_check_points)
        self.dense_tolerance = float(dense_tolerance)
        self.dense_halo = dense_halo
        self.tile_mb = float(tile_mb)
        self.progress = bool(progress)
        self.flips = bool(flips)
        #: ``(network, split)`` whose dense maps are averaged: the network itself, or each member of an ensemble
        #: (an ensemble's probability is its members' mean, so its dense map is the mean of theirs)
        self.dense_parts: list[tuple[nn.Module, SplitClassifier]] = []
        if method != "window":
            members = _members(network)
            try:
                self.dense_parts = [(member, split_classifier(member)) for member in members]
            except ValueError as e:
                if method == "dense":
                    raise ValueError(f"method 'dense': {e}") from e
                logger.info("heat maps window by window: %s", e)
        if self.split is not None:
            logger.info(
                "heat maps dense: the %s trunk once per tile (stride %s) %s, checked against windows at %d points%s",
                type(network).__name__ + (f" members' ({len(self.dense_parts)})" if len(self.dense_parts) > 1 else ""),
                self.split.total_stride,
                "inside the body mask" if self.skip_air else "over the whole volume",
                self.dense_check_points,
                " (window method where they differ)" if method == "auto" else "",
            )

    @property
    def split(self) -> SplitClassifier | None:
        """The (first) network's trunk/head split when the heat map is made densely, else None (window method)."""
        return self.dense_parts[0][1] if self.dense_parts else None

    def __call__(self, image: torch.Tensor, case: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Heat map of a preprocessed ``(1, X, Y, Z)`` image.

        Returns:
            ``(heat, heat_affine, how)``: float32 ``(nx, ny, nz)``, float64 ``(4, 4)`` grid -> world RAS mm, and for
            ``findings.json`` ``{"method", "grid_step_vox"}`` plus, for a checked dense map,
            ``"check": {"points", "max_abs_diff", "tolerance"}`` (``"dense_check"`` after a fallback), and
            ``"flips": ["x", "y", "z"]`` with test-time flips.
        """
        heat, heat_affine, how = self._one(image, case, check=True)
        if not self.flips:
            return heat, heat_affine, how
        extended = _extend_to_grid(image, how["grid_step_vox"], heat.shape)
        maps = [heat.astype(np.float64)]
        for axis in range(3):
            mirrored = _with_affine(torch.flip(extended, dims=[axis + 1]), image)
            flipped, _, _ = self._one(mirrored, case, check=False)
            maps.append(np.flip(flipped, axis=axis).astype(np.float64))
        how["flips"] = ["x", "y", "z"]
        return np.mean(maps, axis=0).astype(np.float32), heat_affine, how

    def _one(self, image: torch.Tensor, case: str, check: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The map of one (possibly mirrored) image by the current method; the dense check only when ``check``."""
        if self.split is None:
            heat, heat_affine = self.window_heatmap(image)
            return heat, heat_affine, {"method": "window", "grid_step_vox": grid_step(image, heat_affine)}
        start = time.perf_counter()
        mask = body_mask(image, hu_window=self.hu_window) if self.skip_air else None
        t_mask = time.perf_counter() - start
        maps = []
        for member, split in self.dense_parts:
            heat, heat_affine = dense_heatmap(
                image,
                member,
                self.patch_size,
                stride_mm=self.stride_mm,
                device=self.device,
                class_index=self.class_index,
                mask=mask,
                halo=self.dense_halo,
                tile_mb=self.tile_mb,
                split=split,
                progress=self.progress,
            )
            maps.append(heat)
        if len(maps) > 1:  # an ensemble: the mean of its members' probabilities, as its forward pass gives
            heat = np.mean(np.stack(maps), axis=0, dtype=np.float64).astype(np.float32)
        how: dict[str, Any] = {"method": "dense", "grid_step_vox": grid_step(image, heat_affine)}
        t_dense = time.perf_counter() - start - t_mask
        logger.debug("%s: body mask %.2f s, dense heat map %.2f s", case, t_mask, t_dense)
        if check and self.dense_check_points > 0:
            heat, heat_affine, how = self._check(image, case, heat, heat_affine, how, mask)
        return heat, heat_affine, how

    def _check(
        self,
        image: torch.Tensor,
        case: str,
        heat: np.ndarray,
        heat_affine: np.ndarray,
        how: dict[str, Any],
        mask: np.ndarray | torch.Tensor | None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Compare the dense map with windows; under ``"auto"``, fall back to windows when they differ."""
        start = time.perf_counter()
        evaluated = None
        if mask is not None:
            centres = heatmap_grid(image.shape[1:], how["grid_step_vox"])[1]
            evaluated = select_windows(image, centres, skip_air=False, mask=mask).reshape(heat.shape)
        diff, n = dense_window_difference(
            image,
            self.network,
            heat,
            heat_affine,
            self.patch_size,
            evaluated=evaluated,
            n_points=self.dense_check_points,
            batch_size=self.batch_size,
            device=self.device,
            class_index=self.class_index,
        )
        how["check"] = {"points": n, "max_abs_diff": round(diff, 4), "tolerance": self.dense_tolerance}
        logger.debug("%s: dense check %.2f s, largest difference %.4f", case, time.perf_counter() - start, diff)
        if diff <= self.dense_tolerance:
            return heat, heat_affine, how
        fallback = self.method == "auto"
        logger.warning(
            "%s: the dense heat map differs from window-by-window evaluation by up to %.3f (tolerance %.3f) "
            "at %d points: the network depends on its patches' zero padding; %s",
            *(case, diff, self.dense_tolerance, n),
            "using the window method (method 'window' skips the dense attempt)"
            if fallback
            else "keeping the dense map (method 'dense')",
        )
        if not fallback:
            return heat, heat_affine, how
        heat, heat_affine = self.window_heatmap(image)
        # the disagreement comes from the network's padding, not from this CT: later cases go straight to windows
        # instead of paying for a dense map and its check again
        self.dense_parts = []
        logger.warning("the remaining cases of this run use the window method")
        return (
            heat,
            heat_affine,
            {"method": "window", "dense_check": how["check"], "grid_step_vox": grid_step(image, heat_affine)},
        )

    def window_heatmap(self, image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The window-by-window heat map (the reference) of a preprocessed image."""
        return classifier_heatmap(
            image,
            self.network,
            self.patch_size,
            batch_size=self.batch_size,
            device=self.device,
            class_index=self.class_index,
            progress=self.progress,
            stride_mm=self.stride_mm,
            skip_air=self.skip_air,
        )


def _with_affine(data: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``data`` as a MetaTensor with ``like``'s affine (only the voxel size is read from it downstream)."""
    from monai.data import MetaTensor

    out = MetaTensor(data.as_subclass(torch.Tensor) if isinstance(data, MetaTensor) else data)
    if hasattr(like, "affine"):
        out.affine = like.affine
    return out


def _extend_to_grid(image: torch.Tensor, step: list[int], grid_shape: tuple[int, ...]) -> torch.Tensor:
    """``image`` ``(C, X, Y, Z)`` extended at the far end of each axis, by replicating its last voxels, to
    ``(g - 1) * step + 1`` voxels, so that mirroring the volume mirrors its heat-map grid onto itself."""
    data = image.as_subclass(torch.Tensor) if hasattr(image, "as_subclass") else image
    pads: list[int] = []
    for a in (2, 1, 0):  # F.pad lists the last axis first
        target = (int(grid_shape[a]) - 1) * int(step[a]) + 1
        pads += [0, max(0, target - int(data.shape[a + 1]))]
    if not any(pads):
        return data
    return torch.nn.functional.pad(data[None], pads, mode="replicate")[0]


def _members(network: nn.Module) -> list[nn.Module]:
    """The members of an :class:`~volcnn.networks.EnsembleClassifier` (wrappers removed), else ``[network]``."""
    net = unwrap(network)
    return list(net.members) if isinstance(net, EnsembleClassifier) else [network]
