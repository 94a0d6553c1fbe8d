from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.conftest import blob_volume, make_affine
from volcnn.transforms import CropOrFitd, FitVolume, WorldPatchCrop, deterministic_transforms, voxel_to_world


def _meta(arr: np.ndarray, affine: np.ndarray) -> MetaTensor:
    t = MetaTensor(torch.as_tensor(arr, dtype=torch.float32)[None])
    t.affine = torch.as_tensor(affine, dtype=torch.float64)
    return t


def _centre_world(t: MetaTensor) -> np.ndarray:
    return voxel_to_world(t.affine, np.asarray(t.shape[1:]) // 2)


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_world_patch_crop_centres_on_point(flips):
    aff = make_affine((0.8, 0.8, 2.0), flips, origin=(10.0, -20.0, 5.0))
    img = _meta(np.random.default_rng(0).normal(size=(40, 50, 20)), aff)
    point = voxel_to_world(aff, [12.3, 30.6, 7.2])
    out = WorldPatchCrop((8, 8, 6))(img, point)
    assert out.shape == (1, 8, 8, 6)
    centre = _centre_world(out)
    # the patch centre voxel is the voxel nearest the point: within half a voxel on each axis
    assert np.all(np.abs(centre - point) <= 0.5 * np.array([0.8, 0.8, 2.0]) + 1e-6)
    # the content is the input's content at those voxels
    np.testing.assert_allclose(out[0, 4, 4, 3].item(), img[0, 12, 31, 7].item())


def test_world_patch_crop_pads_outside():
    aff = make_affine()
    img = _meta(np.ones((10, 10, 10)), aff)
    out = WorldPatchCrop((6, 6, 6), pad_value=0.0)(img, [0.0, 0.0, 0.0])
    assert out.shape == (1, 6, 6, 6)
    assert out[0, :3].sum() == 0 and out[0, 3:, 3:, 3:].min() == 1
    np.testing.assert_allclose(_centre_world(out), [0, 0, 0])
    far = WorldPatchCrop((4, 4, 4))(img, [500.0, 0.0, 0.0])
    assert far.shape == (1, 4, 4, 4) and float(far.abs().sum()) == 0.0


def test_crop_is_a_copy_not_a_view():
    img = _meta(np.zeros((30, 30, 30)), make_affine())
    out = WorldPatchCrop((4, 4, 4))(img, [15.0, 15.0, 15.0])
    out += 1
    assert float(img.sum()) == 0.0
    assert out.untyped_storage().nbytes() < img.untyped_storage().nbytes()


def test_fit_volume_keeps_aspect_and_geometry():
    aff = make_affine((1.0, 1.0, 2.0), origin=(-5.0, 3.0, 7.0))
    img = _meta(np.ones((64, 32, 16)), aff)
    out = FitVolume((16, 16, 16), (20, 20, 20))(img)
    assert out.shape == (1, 20, 20, 20)
    inside = (out[0] > 0.5).nonzero()
    extent = (inside.max(0).values - inside.min(0).values + 1).tolist()
    assert extent == [16, 8, 4]  # scale 1/4 on every axis
    # the world extent of the volume is preserved: first and last fitted voxel centres
    lo = inside.min(0).values.numpy()
    hi = inside.max(0).values.numpy()
    np.testing.assert_allclose(voxel_to_world(out.affine, lo), voxel_to_world(aff, [1.5, 1.5, 1.5]), atol=1e-6)
    np.testing.assert_allclose(voxel_to_world(out.affine, hi), voxel_to_world(aff, [61.5, 29.5, 13.5]), atol=1e-6)


def test_crop_or_fit_modes():
    img = _meta(np.ones((40, 40, 40)), make_affine())
    t = CropOrFitd("image", patch_size=(8, 8, 8), margin=2)
    cand = t({"image": img, "center": [20.0, 20.0, 20.0]})
    vol = t({"image": img})
    assert cand["image"].shape == vol["image"].shape == (1, 12, 12, 12)
    assert torch.equal(cand["center"], torch.tensor([20.0, 20.0, 20.0]))
    assert torch.isnan(vol["center"]).all()
    assert float(vol["image"][0, :2].sum()) == 0.0  # margin padded with air


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "permuted"])
def test_deterministic_chain_lands_on_world_point(nifti_factory, orientation):
    flips = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1), "permuted": (1, -1, 1)}[orientation]
    perm = (2, 0, 1) if orientation == "permuted" else (0, 1, 2)
    spacing = (0.7, 0.7, 1.5) if orientation != "permuted" else (1.5, 0.7, 0.7)
    shape = (70, 70, 30) if orientation != "permuted" else (30, 70, 70)
    aff = make_affine(spacing, flips, origin=(-30.0, 25.0, -60.0), perm=perm)
    target = voxel_to_world(aff, np.asarray(shape) * np.array([0.3, 0.6, 0.5]))
    path = nifti_factory(f"{orientation}.nii.gz", blob_volume(shape, aff, target, radius_mm=3.0), aff)
    out = deterministic_transforms(pixdim=(1.0, 1.0, 1.0), patch_size=(16, 16, 16), margin=4)(
        {"image": path, "label": 1, "center": target.tolist()}
    )
    img = out["image"]
    assert img.shape == (1, 24, 24, 24)
    assert np.allclose(np.diag(img.affine.numpy())[:3], [1.0, 1.0, 1.0])  # RAS at 1 mm
    # the bright sphere's centre of mass lies at the patch centre, in world coordinates
    w = img[0].numpy()
    w_bg = np.where(w > 0.5, w, 0)
    com = (np.indices(w.shape).reshape(3, -1) * w_bg.reshape(-1)).sum(1) / w_bg.sum()
    assert np.linalg.norm(voxel_to_world(img.affine, com) - target) < 1.0
    assert np.linalg.norm(_centre_world(img) - target) <= 0.87  # half a 1 mm voxel diagonal
