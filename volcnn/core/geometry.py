"""Voxel <-> world conversions for 4x4 affines (voxel index -> world RAS mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["as_affine", "world_to_voxel", "voxel_to_world", "translate", "scale_affine"]


def as_affine(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 numpy ``(4, 4)`` copy of ``affine``."""
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().numpy()
    out = np.asarray(affine, dtype=np.float64)
    if out.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {out.shape}")
    return out.copy()


def world_to_voxel(affine: np.ndarray | torch.Tensor, points: Sequence[float] | np.ndarray) -> np.ndarray:
    """World mm ``(..., 3)`` -> continuous voxel indices ``(..., 3)`` under ``affine``."""
    pts = np.asarray(points, dtype=np.float64)
    inv = np.linalg.inv(as_affine(affine))
    return pts @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(affine: np.ndarray | torch.Tensor, indices: Sequence[float] | np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(..., 3)`` -> world mm ``(..., 3)`` under ``affine``."""
    idx = np.asarray(indices, dtype=np.float64)
    aff = as_affine(affine)
    return idx @ aff[:3, :3].T + aff[:3, 3]


def translate(offset: Sequence[float] | np.ndarray) -> np.ndarray:
    """The ``(4, 4)`` voxel-space translation by ``offset`` voxels."""
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset, dtype=np.float64)
    return t


def scale_affine(in_shape: Sequence[int] | np.ndarray, out_shape: Sequence[int] | np.ndarray) -> np.ndarray:
    """Voxel map from an ``out_shape`` grid to an ``in_shape`` grid covering the same extent (pixel-centre aligned)."""
    factor = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    m = np.diag([*factor, 1.0])
    m[:3, 3] = 0.5 * factor - 0.5
    return m
