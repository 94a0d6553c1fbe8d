"""Helpers for the inference tests: a hand-made blob detector and synthetic scans with one planted nodule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tests.conftest import blob_volume, make_affine

#: world RAS mm of the planted nodule, deliberately off every grid
NODULE_RAS = (12.3, -20.7, 31.1)
NODULE_RADIUS_MM = 5.0


class BlobNet(nn.Module):
    """A deterministic "nodule detector": logit 1 = ``gain * (gaussian-weighted mean around voxel size//2 - offset)``.

    With lung at about 0.14 and soft tissue at 0.75 after the HU window [-1000, 400], the probability is high only
    when a bright blob sits at the window's centre voxel (``size // 2``, the training-patch convention), and it falls
    smoothly as the blob moves off centre. Logit 0 is 0.
    """

    def __init__(self, patch_size: Sequence[int], sigma: float = 2.0, gain: float = 40.0, offset: float = 0.25):
        super().__init__()
        centre = torch.tensor([p // 2 for p in patch_size], dtype=torch.float32)
        axes = [torch.arange(p, dtype=torch.float32) for p in patch_size]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        w = torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))
        self.register_buffer("weights", w / w.sum())
        self.gain, self.offset = gain, offset
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        m = (x[:, 0] * self.weights).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(m), self.gain * (m - self.offset)], dim=1)


class CentreVoxelNet(nn.Module):
    """Logit 1 = ``gain * (x[size//2] - 0.5)``: probability ~1 exactly when the window's centre voxel is bright."""

    def __init__(self, patch_size: Sequence[int], gain: float = 50.0):
        super().__init__()
        self.centre = tuple(p // 2 for p in patch_size)
        self.gain = gain
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, self.centre[0], self.centre[1], self.centre[2]]
        return torch.stack([torch.zeros_like(v), self.gain * (v - 0.5)], dim=1) + self.anchor


def rotation_z(deg: float) -> np.ndarray:
    """``(4, 4)`` rotation about the world z axis."""
    t = np.deg2rad(deg)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


#: input geometries, each containing NODULE_RAS with a margin: name -> (shape, affine)
GEOMETRIES: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {
    "ras": ((60, 60, 40), make_affine((1.5, 1.5, 2.0), origin=(-40.0, -60.0, -10.0))),
    "lps": ((60, 60, 40), make_affine((1.5, 1.5, 2.0), (-1, -1, 1), origin=(50.0, 30.0, -10.0))),
    "permuted": ((40, 60, 60), make_affine((2.0, 1.5, 1.5), (1, -1, -1), origin=(40.0, 10.0, 0.0), perm=(2, 0, 1))),
    "oblique": (
        (60, 60, 40),
        rotation_z(20.0) @ make_affine((1.5, 1.5, 2.0), (-1, 1, 1), origin=(40.0, -55.0, -10.0)),
    ),
}


def nodule_scan(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """int16 HU: lung (-800 HU) with air (-1000 HU) in the first and last 4 voxels of axis 0, one +50 HU nodule."""
    arr = blob_volume(shape, affine, NODULE_RAS, radius_mm=NODULE_RADIUS_MM, background=-800.0, value=50.0)
    arr[:4] = -1000
    arr[-4:] = -1000
    return arr
