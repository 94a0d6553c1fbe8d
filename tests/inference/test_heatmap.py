"""Heat-map geometry (window centring, grid, affine) for both methods, resampling onto the input grid, peaks and
scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.conftest import make_affine
from tests.inference import GEOMETRIES, NODULE_RAS, BlobNet, CentreVoxelNet, nodule_scan, rotation_z
from tests.inference.dense_nets import DenseBlobNet, DenseCentreVoxelNet
from volcnn.inference import (
    classifier_heatmap,
    dense_heatmap,
    find_peaks,
    heatmap_grid,
    stride_from_mm,
    volume_score,
)
from volcnn.transforms import resample_to_grid, volume_transforms, voxel_to_world


def _heatmap(method, volume, patch, net_kind="centre", **kwargs):
    """The heat map of ``volume`` by ``method`` with the hand-made net of ``net_kind`` (its dense twin for "dense")."""
    if method == "window":
        net = CentreVoxelNet(patch) if net_kind == "centre" else BlobNet(patch)
        kwargs.setdefault("skip_air", False)
        return classifier_heatmap(volume, net, patch, batch_size=500, **kwargs)
    kwargs.pop("skip_air", None)
    net = DenseCentreVoxelNet(patch) if net_kind == "centre" else DenseBlobNet(patch)
    return dense_heatmap(volume, net, patch, **kwargs)


METHODS = ["window", "dense"]


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    t = MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None])
    t.affine = torch.as_tensor(affine, dtype=torch.float64)
    return t


def test_grid_covers_the_volume_from_voxel_zero():
    grid_shape, centres = heatmap_grid((10, 7, 1), (4, 3, 2))
    assert grid_shape == (4, 3, 1)  # x: 0 4 8 12 (12 >= 9), y: 0 3 6, z: 0
    assert centres.shape == (12, 3)
    assert centres.min(axis=0).tolist() == [0, 0, 0]
    assert centres.max(axis=0).tolist() == [12, 6, 0]
    assert heatmap_grid((9, 9, 9), (4, 4, 4))[0] == (3, 3, 3)  # 0 4 8: already reaches the last voxel
    assert stride_from_mm(4.0, (0.75, 1.0, 2.5)) == (5, 4, 2)
    assert stride_from_mm(1.0, (3.0, 3.0, 3.0)) == (1, 1, 1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("patch", [(8, 6, 5), (7, 7, 7), (4, 4, 4)])
def test_window_centre_is_voxel_size_over_2(patch, method):
    """At stride 1 the heat map peaks exactly on the bright voxel, also next to the border (padding)."""
    aff = make_affine((0.8, 1.0, 2.0), (-1, 1, 1), origin=(5.0, -3.0, 7.0))
    for bright in [(7, 11, 5), (0, 0, 0), (19, 15, 9)]:
        vol = np.zeros((20, 16, 10), dtype=np.float32)
        vol[bright] = 1.0
        heat, heat_aff = _heatmap(method, _meta(vol, aff), patch, stride_vox=1)
        assert heat.shape == vol.shape and heat.dtype == np.float32
        np.testing.assert_allclose(heat_aff, aff)
        assert np.unravel_index(np.argmax(heat), heat.shape) == bright
        assert heat[bright] > 0.99
        assert np.sort(heat.ravel())[-2] < 0.01


@pytest.mark.parametrize("method", METHODS)
def test_heat_affine_scales_by_stride(method):
    aff = rotation_z(30.0) @ make_affine((0.7, 0.7, 1.5), origin=(1.0, 2.0, 3.0))
    vol = np.full((21, 17, 9), 0.5, dtype=np.float32)
    heat, heat_aff = _heatmap(method, _meta(vol, aff), (4, 4, 4), stride_vox=(4, 3, 2))
    assert heat.shape == (6, 7, 5)
    np.testing.assert_allclose(heat_aff, aff @ np.diag([4.0, 3.0, 2.0, 1.0]))
    # default: stride_mm 4.0 at 0.7/0.7/1.5 mm -> (6, 6, 3) voxels
    _, heat_aff = _heatmap(method, _meta(vol, aff), (4, 4, 4))
    np.testing.assert_allclose(heat_aff, aff @ np.diag([6.0, 6.0, 3.0, 1.0]))


def test_air_windows_and_masked_windows_are_skipped():
    vol = np.zeros((12, 12, 12), dtype=np.float32)
    vol[4:8, 4:8, 4:8] = 1.0
    net = CentreVoxelNet((4, 4, 4))
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    heat, _ = classifier_heatmap(_meta(vol, np.eye(4)), net, (4, 4, 4), stride_vox=1, batch_size=1000)
    assert sum(calls) == 64  # only the windows centred on the non-air cube
    assert heat[vol == 0].max() == 0.0 and heat[vol == 1].min() > 0.99
    calls.clear()
    mask = np.zeros_like(vol, dtype=bool)
    mask[5, 5, 5] = True
    heat, _ = classifier_heatmap(_meta(vol, np.eye(4)), net, (4, 4, 4), stride_vox=1, mask=mask, skip_air=False)
    assert sum(calls) == 1 and heat.sum() == pytest.approx(heat[5, 5, 5])
    calls.clear()
    classifier_heatmap(_meta(vol, np.eye(4)), net, (4, 4, 4), stride_vox=1, batch_size=1000, skip_air=False)
    assert sum(calls) == vol.size


@pytest.mark.parametrize("method", METHODS)
def test_network_mode_is_restored(method):
    net = (BlobNet if method == "window" else DenseBlobNet)((4, 4, 4)).train()
    run = classifier_heatmap if method == "window" else dense_heatmap
    run(_meta(np.ones((6, 6, 6)), np.eye(4)), net, (4, 4, 4), stride_vox=2)
    assert net.training


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_heatmap_peak_at_planted_nodule(name, method, nifti_factory):
    """Preprocessing as in training, then the heat map: its maximum is at the nodule in world mm."""
    shape, aff = GEOMETRIES[name]
    path = nifti_factory(f"{name}.nii.gz", nodule_scan(shape, aff), aff)  # through the reader and the chain
    image = volume_transforms("image", (2.0, 2.0, 2.0))({"image": path})["image"]
    heat, heat_aff = _heatmap(method, image, (12, 12, 12), "blob", stride_mm=4.0, skip_air=True)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert heat[peak] > 0.9
    assert np.linalg.norm(voxel_to_world(heat_aff, peak) - NODULE_RAS) <= 4.0 * np.sqrt(3) / 2 + 2.0


def test_window_and_dense_maps_agree_on_a_scan():
    """The two methods on the same preprocessed scan and grid, with a net that pads nothing: the same map."""
    shape, aff = GEOMETRIES["oblique"]
    image = _meta(np.clip((nodule_scan(shape, aff) + 1000.0) / 1400.0, 0, 1), aff)
    window, window_aff = _heatmap("window", image, (12, 12, 12), "blob", stride_vox=3)
    dense, dense_aff = _heatmap("dense", image, (12, 12, 12), "blob", stride_vox=3)
    np.testing.assert_allclose(dense_aff, window_aff)
    assert np.abs(dense - window).max() < 1e-5 and window.max() > 0.9


def _world_grid(shape, affine):
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    return voxel_to_world(affine, idx).reshape(*shape, 3)


def _ramp(world):
    return 0.5 + 0.01 * world[..., 0] - 0.02 * world[..., 1] + 0.015 * world[..., 2]


OUT_GEOMETRIES = {
    "ras": make_affine((1.5, 1.5, 2.0), origin=(-20.0, -25.0, -15.0)),
    "lps": make_affine((0.7, 0.7, 1.25), (-1, -1, 1), origin=(10.0, 8.0, -15.0)),
    "permuted": make_affine((1.25, 0.9, 0.8), (1, -1, -1), origin=(10.0, 10.0, 12.0), perm=(2, 0, 1)),
    "oblique": rotation_z(25.0) @ make_affine((1.1, 0.9, 1.3), (-1, 1, 1), origin=(5.0, -10.0, -10.0)),
}


@pytest.mark.parametrize("name", sorted(OUT_GEOMETRIES))
def test_resample_reproduces_a_world_linear_ramp(name):
    """Trilinear interpolation is exact on a linear function: any axis mix-up or off-by-one shows."""
    heat_aff = rotation_z(-10.0) @ make_affine((4.0, 4.0, 4.0), origin=(-40.0, -40.0, -40.0))
    heat_shape = (21, 21, 21)
    heat = _ramp(_world_grid(heat_shape, heat_aff)).astype(np.float32)
    out_aff = OUT_GEOMETRIES[name]
    out_shape = (19, 23, 17)
    # the output grid must lie inside the heat grid for the ramp to continue (no clamping)
    inside = np.linalg.solve(heat_aff, np.c_[_world_grid(out_shape, out_aff).reshape(-1, 3), np.ones(19 * 23 * 17)].T)
    assert inside[:3].min() > 0 and inside[:3].max() < 20
    out = resample_to_grid(heat, heat_aff, out_shape, out_aff, slab_voxels=1000)  # several slabs
    assert out.shape == out_shape and out.dtype == np.float32
    np.testing.assert_allclose(out, _ramp(_world_grid(out_shape, out_aff)), atol=2e-5)


def test_resample_clamps_at_the_border():
    heat = np.zeros((3, 2, 2), dtype=np.float32)
    heat[2] = 1.0
    heat_aff = np.diag([10.0, 10.0, 10.0, 1.0])
    out = resample_to_grid(heat, heat_aff, (8, 1, 1), np.diag([5.0, 1.0, 1.0, 1.0]))
    # x = 0, 5, ..., 35 mm on a heat grid at 0, 10, 20 mm with values 0, 0, 1: ramp from 10 to 20, then clamped
    np.testing.assert_allclose(out[:, 0, 0], [0, 0, 0, 0.5, 1, 1, 1, 1], atol=1e-6)
    single = resample_to_grid(np.full((1, 1, 1), 0.25), np.eye(4), (2, 3, 4), np.eye(4))
    np.testing.assert_allclose(single, 0.25)


def _gaussian_heat(shape, centres, sigma=1.2, peak=0.9):
    idx = np.indices(shape).astype(np.float64)
    heat = np.zeros(shape)
    for c, p in zip(centres, peak if isinstance(peak, list) else [peak] * len(centres), strict=True):
        heat = np.maximum(heat, p * np.exp(-sum((idx[a] - c[a]) ** 2 for a in range(3)) / (2 * sigma**2)))
    return heat.astype(np.float32)


def test_peaks_sorted_suppressed_and_refined():
    aff = make_affine((4.0, 4.0, 4.0), (-1, 1, 1), origin=(100.0, 0.0, 0.0))
    centres = [(5.3, 6.0, 4.6), (15.0, 10.2, 8.0), (7.0, 8.0, 5.0)]  # the third is 2.66 cells = 10.6 mm from the first
    heat = _gaussian_heat((20, 16, 12), centres, peak=[0.8, 0.95, 0.7])
    found = find_peaks(heat, aff, threshold=0.5, min_distance_mm=12.0)
    # the 0.7 blob is within 12 mm of the 0.8 one: suppressed; the rest are sorted by probability
    assert [f["probability"] for f in found] == sorted((f["probability"] for f in found), reverse=True)
    assert len(found) == 2
    for f, c in zip(found, [centres[1], centres[0]], strict=True):
        assert np.linalg.norm(np.asarray(f["center_ras_mm"]) - voxel_to_world(aff, c)) < 0.6  # well under 4 mm
    assert len(find_peaks(heat, aff, threshold=0.5, min_distance_mm=5.0)) == 3
    assert len(find_peaks(heat, aff, threshold=0.9)) == 1
    assert len(find_peaks(heat, aff, threshold=0.5, min_distance_mm=5.0, max_findings=1)) == 1
    assert find_peaks(np.zeros((4, 4, 4)), aff) == []


def test_a_flat_topped_peak_is_placed_at_its_centre_not_at_its_noisy_maximum():
    """A trained classifier's map: p > 0.999 over a top about 1.6 cells wide, noise in the fourth decimal decides
    which grid point is highest. The finding lies at the top's centroid: within 0.35 cell of the true centre, on
    average under a third of the highest grid point's distance."""
    rng = np.random.default_rng(3)
    idx = np.indices((21, 21, 21)).astype(np.float64)
    errors, argmax_errors = [], []
    for _ in range(20):
        c = 10.0 + rng.uniform(-0.5, 0.5, 3)
        logit = 9.0 - 3.0 * sum((idx[a] - c[a]) ** 2 for a in range(3))
        heat = 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50))) + rng.normal(0.0, 2e-4, idx.shape[1:])
        (f,) = find_peaks(heat.astype(np.float32), np.eye(4), threshold=0.5, max_findings=1)
        errors.append(np.linalg.norm(np.asarray(f["center_ras_mm"]) - c))
        argmax_errors.append(np.linalg.norm(np.unravel_index(np.argmax(heat), heat.shape) - c))
    assert max(errors) < 0.35 and np.mean(errors) < np.mean(argmax_errors) / 3
    # a saddle keeps a neighbouring blob out of the centroid
    two = _gaussian_heat((20, 16, 12), [(5.3, 6.0, 4.6), (7.0, 8.0, 5.0)], peak=[0.8, 0.7])
    first = find_peaks(two, np.eye(4), threshold=0.5, min_distance_mm=0.5)[0]
    assert np.linalg.norm(np.asarray(first["center_ras_mm"]) - [5.3, 6.0, 4.6]) < 0.15


def test_saturated_plateau_reports_its_middle():
    heat = np.zeros((11, 11, 11), dtype=np.float32)
    heat[3:8, 4:7, 2:9] = 1.0  # a saturated block: middle at (5, 5, 5)
    heat[2, 5, 5] = heat[8, 5, 5] = 0.5
    (f,) = find_peaks(heat, np.eye(4), threshold=0.5, min_distance_mm=20.0)
    np.testing.assert_allclose(f["center_ras_mm"], [5.0, 5.0, 5.0], atol=0.51)


def test_volume_scores():
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    heat = _gaussian_heat((20, 20, 20), [(4, 4, 4), (15, 15, 15)], peak=[0.6, 0.5], sigma=0.8)
    assert volume_score(heat, "max") == pytest.approx(0.6, abs=1e-6)
    # each blob counts once although it covers several grid points
    assert volume_score(heat, "topk_mean", k=2, heat_affine=aff) == pytest.approx(0.55, abs=1e-6)
    assert volume_score(heat, "topk_mean", k=4, heat_affine=aff) == pytest.approx(1.1 / 4, abs=1e-6)
    assert volume_score(heat, "noisy_or", k=5, heat_affine=aff) == pytest.approx(1 - 0.4 * 0.5, abs=1e-6)
    assert volume_score(np.zeros((3, 3, 3)), "noisy_or") == 0.0
    with pytest.raises(ValueError, match="unknown score method"):
        volume_score(heat, "mean")
