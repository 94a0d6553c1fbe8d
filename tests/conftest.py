"""Shared fixtures: tiny synthetic NIfTI volumes with known geometry."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from volcnn.io import write_nifti

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def make_affine(spacing=(1.0, 1.0, 1.0), flips=(1, 1, 1), origin=(0.0, 0.0, 0.0), perm=(0, 1, 2)) -> np.ndarray:
    """Affine whose array axis ``i`` runs along world axis ``perm[i]`` with sign ``flips[i]``."""
    aff = np.zeros((4, 4))
    for i, (axis, sign, sp) in enumerate(zip(perm, flips, spacing, strict=True)):
        aff[axis, i] = sign * sp
    aff[:3, 3] = origin
    aff[3, 3] = 1.0
    return aff


def blob_volume(shape, affine, center_world, radius_mm=4.0, background=-850.0, value=40.0, noise=0.0, seed=0):
    """HU volume ``shape`` with a sphere of ``value`` HU at ``center_world`` (RAS mm)."""
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    dist = np.linalg.norm(world - np.asarray(center_world), axis=1).reshape(shape)
    arr = np.full(shape, background, dtype=np.float32)
    arr[dist <= radius_mm] = value
    if noise:
        arr += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    return arr.astype(np.int16)


@pytest.fixture
def nifti_factory(tmp_path: Path):
    """``make(name, array, affine) -> path`` writing a NIfTI into the test's tmp folder."""

    def make(name: str, array: np.ndarray, affine: np.ndarray) -> str:
        path = tmp_path / name
        write_nifti(path, array, affine)
        return str(path)

    return make


def _determinism_guard():
    import torch

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


# Bundle runs in process (``seed_everything(deterministic=True)``) switch deterministic algorithms on for the whole
# process; put the setting back so that one test's (or one module fixture's) mode never changes another's behaviour.
_restore_torch_determinism = pytest.fixture(autouse=True)(_determinism_guard)
_restore_torch_determinism_per_module = pytest.fixture(autouse=True, scope="module")(_determinism_guard)
