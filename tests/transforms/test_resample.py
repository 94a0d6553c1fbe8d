"""``ResampleToSpacing(d)`` against MONAI's ``Spacing(d)``: same grid (shape, affine), same trilinear values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, Spacing, Spacingd

from tests.conftest import make_affine
from volcnn.io.reader import LoadVolumed
from volcnn.transforms import ResampleToSpacing, ResampleToSpacingd, volume_transforms
from volcnn.transforms.intensity import HUWindowd
from volcnn.transforms.resample import resample_linear, spacing_geometry


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles in degrees."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(spacing, rotation=(0.0, 0.0, 0.0), shear=0.0, flips=(1, 1, 1), origin=(3.5, -7.25, 12.0)) -> np.ndarray:
    lin = np.diag(np.asarray(spacing, dtype=float) * np.asarray(flips, dtype=float))
    if shear:
        s = np.eye(3)
        s[0, 1], s[1, 2] = shear, -0.5 * shear
        lin = s @ lin
    aff = np.eye(4)
    aff[:3, :3] = _rotation(rotation) @ lin
    aff[:3, 3] = origin
    return aff


# (spatial shape, affine, pixdim): RAS-diagonal, anisotropic, non-integer ratios, up- and downsampling, oblique,
# sheared, flipped, a spacing within MONAI's 1e-3 tolerance of pixdim, an unchanged grid, a single slice
CASES = {
    "ct_like": ((20, 22, 15), _affine((0.7, 0.7, 1.25)), (1.0, 1.0, 1.0)),
    "z_already_1mm": ((20, 22, 15), _affine((0.7, 0.7, 1.0)), (1.0, 1.0, 1.0)),
    "anisotropic_pixdim": ((21, 17, 9), _affine((0.63, 0.81, 2.5)), (1.3, 0.9, 1.7)),
    "upsample_x2": ((9, 8, 7), _affine((2.0, 2.0, 2.0)), (1.0, 1.0, 1.0)),
    "downsample_x2_exact": ((16, 12, 10), _affine((0.5, 0.5, 0.5)), (1.0, 1.0, 1.0)),
    "oblique": ((16, 18, 12), _affine((0.8, 0.8, 1.5), rotation=(10, -20, 35)), (1.0, 1.0, 1.0)),
    "oblique_same_spacing": ((12, 10, 8), _affine((1.0, 1.0, 1.0), rotation=(10, -20, 35)), (1.0, 1.0, 1.0)),
    "sheared": ((16, 18, 12), _affine((0.8, 0.9, 1.5), shear=0.2), (1.0, 1.0, 1.0)),
    "oblique_sheared": ((16, 18, 12), _affine((0.8, 0.9, 1.5), rotation=(5, 0, 30), shear=-0.3), (1.2, 1.0, 1.0)),
    "lps": ((16, 18, 12), _affine((0.8, 0.9, 1.5), flips=(-1, -1, 1)), (1.0, 1.0, 1.0)),
    "within_tolerance": ((10, 11, 12), _affine((1.0004, 0.9996, 0.75)), (1.0, 1.0, 1.0)),
    "unchanged": ((10, 11, 12), _affine((1.0, 1.0, 1.0)), (1.0, 1.0, 1.0)),
    "single_slice": ((16, 18, 1), _affine((0.8, 0.9, 1.5)), (1.0, 1.0, 1.0)),
}


def _volume(shape, affine, seed=0, channels=1, dtype=torch.float32) -> MetaTensor:
    data = np.random.default_rng(seed).normal(0.0, 300.0, (channels, *shape))
    return MetaTensor(torch.as_tensor(data).to(dtype), affine=torch.as_tensor(affine, dtype=torch.float64))


def _spacingd(pixdim) -> Spacing:
    return Spacing(pixdim=pixdim, mode="bilinear", dtype=np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_grid_matches_spacing(case):
    shape, affine, pixdim = CASES[case]
    img = _volume(shape, affine)
    ref = _spacingd(pixdim)(img)
    out = ResampleToSpacing(pixdim)(img)
    assert tuple(out.shape) == tuple(ref.shape)
    np.testing.assert_allclose(out.affine.numpy(), ref.affine.numpy(), rtol=0, atol=1e-6)
    geo = spacing_geometry(shape, affine, pixdim)
    assert geo.shape == tuple(ref.shape[1:])
    np.testing.assert_allclose(geo.affine, ref.affine.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_values_match_spacing(case):
    shape, affine, pixdim = CASES[case]
    img = _volume(shape, affine, seed=1)
    ref = _spacingd(pixdim)(img).as_tensor()
    out = ResampleToSpacing(pixdim, slab_voxels=97)(img)  # several slabs
    assert out.dtype == torch.float32
    # values of sd 300 (|x| up to ~1200): MONAI samples through float32 normalised coordinates, hence ~1e-3
    torch.testing.assert_close(out.as_tensor(), ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", ["ct_like", "anisotropic_pixdim", "oblique", "sheared", "lps", "upsample_x2"])
def test_linear_field_is_exact_with_border_clamping(case):
    """A field linear in world mm is reproduced exactly where sampled inside; outside, the nearest face value."""
    shape, affine, pixdim = CASES[case]
    coef, const = np.array([3.0, -2.0, 0.5]), 40.0
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    field = ((idx @ affine[:3, :3].T + affine[:3, 3]) @ coef + const).reshape(shape)
    img = MetaTensor(torch.as_tensor(field[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    out = ResampleToSpacing(pixdim)(img)
    geo = spacing_geometry(shape, affine, pixdim)
    j = np.indices(geo.shape).reshape(3, -1).T.astype(np.float64)
    p = np.clip(j @ geo.xform[:3, :3].T + geo.xform[:3, 3], 0.0, np.asarray(shape) - 1.0)  # border padding
    expected = ((p @ affine[:3, :3].T + affine[:3, 3]) @ coef + const).reshape(geo.shape)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=2e-3)
    inside = np.all((p > 0) & (p < np.asarray(shape) - 1), axis=1).reshape(geo.shape)
    assert inside.any()


def test_unchanged_grid_is_returned_without_copy():
    shape, affine, pixdim = CASES["within_tolerance"]
    img = _volume(shape, affine)
    ref = _spacingd(pixdim)(img)
    out = ResampleToSpacing(pixdim)(img)
    assert tuple(out.shape) == tuple(ref.shape)
    np.testing.assert_allclose(out.affine.numpy(), ref.affine.numpy(), atol=1e-6)
    torch.testing.assert_close(out.as_tensor(), ref.as_tensor(), rtol=0, atol=1e-2)
    _, affine1, _ = CASES["unchanged"]
    img1 = _volume(shape, affine1)
    out1 = ResampleToSpacing(pixdim)(img1)
    assert out1.data_ptr() == img1.data_ptr()  # no copy, no interpolation
    assert torch.equal(out1.affine, img1.affine)
    as_int = _volume(shape, affine1, dtype=torch.int16)
    out_int = ResampleToSpacing(pixdim)(as_int)
    assert out_int.dtype == torch.float32 and torch.equal(out_int.as_tensor(), as_int.as_tensor().float())


def test_integer_input_and_channels_match_spacing():
    shape, affine, pixdim = CASES["oblique"]
    img = _volume(shape, affine, seed=2, channels=2, dtype=torch.int16)
    ref = _spacingd(pixdim)(img)
    out = ResampleToSpacing(pixdim, slab_voxels=50)(img)
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(ref.shape)
    torch.testing.assert_close(out.as_tensor(), ref.as_tensor(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", ["ct_like", "sheared"])
def test_slab_size_does_not_change_the_result(case):
    shape, affine, pixdim = CASES[case]
    img = _volume(shape, affine, seed=3)
    geo = spacing_geometry(shape, affine, pixdim)
    whole = resample_linear(img, geo.xform, geo.shape, slab_voxels=10**9)
    for slab in (1, 37, 500):
        part = resample_linear(img, geo.xform, geo.shape, slab_voxels=slab)
        if case == "sheared":  # grid_sample over each slab's own bounding box: float32 rounding differs
            torch.testing.assert_close(part, whole, rtol=0, atol=2e-3)
        else:
            assert torch.equal(part, whole)


@pytest.mark.parametrize("case", ["ct_like", "anisotropic_pixdim", "upsample_x2", "lps", "single_slice"])
def test_torch_kernels_match_numpy_kernels(case):
    """The torch kernels (used off the CPU) give the numpy kernels' values; int16 input too."""
    shape, affine, pixdim = CASES[case]
    geo = spacing_geometry(shape, affine, pixdim)
    for dtype in (torch.float32, torch.int16):
        img = _volume(shape, affine, seed=6, channels=2, dtype=dtype)
        a = resample_linear(img, geo.xform, geo.shape, slab_voxels=64, kernels="numpy", workers=2)
        b = resample_linear(img, geo.xform, geo.shape, slab_voxels=64, kernels="torch")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", ["anisotropic_pixdim", "sheared"])
def test_memory_layout_does_not_change_the_result(case):
    """Work follows the input's memory order (Fortran-ordered or permuted views too); values and shape do not."""
    shape, affine, pixdim = CASES[case]
    img = _volume(shape, affine, seed=7)
    geo = spacing_geometry(shape, affine, pixdim)
    ref = resample_linear(img, geo.xform, geo.shape, slab_voxels=64)
    assert ref.is_contiguous()
    fortran = torch.from_numpy(np.asfortranarray(img.as_tensor()[0].numpy()))[None]
    odd = img.as_tensor().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for x in (fortran, odd):
        assert torch.equal(x, img.as_tensor())
        out = resample_linear(x, geo.xform, geo.shape, slab_voxels=64)
        assert tuple(out.shape) == tuple(ref.shape)
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)  # float32 rounding: axes in another order


def test_separable_and_general_paths_agree():
    """A non-diagonal ``xform`` goes through ``grid_sample``; a diagonal one through 1-D passes: same values."""
    shape, affine, pixdim = CASES["anisotropic_pixdim"]
    img = _volume(shape, affine, seed=4)
    geo = spacing_geometry(shape, affine, pixdim)
    tilted = geo.xform.copy()
    tilted[0, 1] = 1e-3  # moves sampling points by up to ~0.015 voxels: general path
    sep = resample_linear(img, geo.xform, geo.shape)
    gen = resample_linear(img, tilted, geo.shape)
    tilted[0, 1] = 0.0
    assert torch.equal(resample_linear(img, tilted, geo.shape), sep)
    assert float((sep - gen).abs().max()) < 0.05 * 300 * 4  # close, and not identical
    assert not torch.equal(sep, gen)


def test_meta_and_trace_follow_spacing():
    shape, affine, pixdim = CASES["ct_like"]
    img = _volume(shape, affine)
    img.meta["filename_or_obj"] = "x.nii.gz"
    ref = _spacingd(pixdim)(img)
    out = ResampleToSpacing(pixdim)(img)
    assert set(out.meta) == set(ref.meta)
    assert out.meta["filename_or_obj"] == "x.nii.gz"
    assert len(out.applied_operations) == len(ref.applied_operations) == 1
    assert out.applied_operations[-1]["class"] == "ResampleToSpacing"
    assert len(img.applied_operations) == 0  # the input is not modified


def test_inverse_returns_to_the_input_grid():
    shape, affine, pixdim = CASES["anisotropic_pixdim"]
    idx = np.indices(shape).astype(np.float64)
    smooth = (idx[0] * 2.0 - idx[1] + 0.5 * idx[2])[None]
    img = MetaTensor(torch.as_tensor(smooth, dtype=torch.float32), affine=torch.as_tensor(affine))
    t = ResampleToSpacingd("image", pixdim)
    fwd = t({"image": img})
    back = t.inverse(fwd)["image"]
    assert tuple(back.shape) == tuple(img.shape)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-6)
    inner = (slice(None), slice(1, -2), slice(1, -2), slice(1, -2))
    torch.testing.assert_close(back.as_tensor()[inner], img.as_tensor()[inner], rtol=0, atol=1e-3)
    assert len(back.applied_operations) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="pixdim"):
        ResampleToSpacing((1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="pixdim"):
        ResampleToSpacing((1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="channel-first"):
        ResampleToSpacing(1.0)(torch.zeros(4, 4, 4))
    assert np.array_equal(ResampleToSpacing(1.5).pixdim, [1.5, 1.5, 1.5])


@pytest.mark.parametrize("orientation", ["ras", "lps_permuted"])
def test_volume_transforms_matches_the_spacingd_chain(nifti_factory, orientation):
    """The whole preprocessing chain, through a NIfTI file: same grid and windowed values as with ``Spacingd``."""
    if orientation == "ras":
        affine = make_affine(spacing=(0.7, 0.75, 1.3), origin=(-10.0, 5.0, 2.0))
    else:
        affine = make_affine(spacing=(0.9, 0.65, 2.2), flips=(-1, -1, 1), perm=(1, 0, 2), origin=(8.0, -3.0, 1.0))
    shape = (23, 19, 11)
    hu = np.random.default_rng(5).normal(-300.0, 400.0, shape).astype(np.int16)
    path = nifti_factory(f"{orientation}.nii.gz", hu, affine)
    new = volume_transforms("image", (1.0, 1.0, 1.0), (-1000, 400))({"image": path})["image"]
    old_chain = Compose(
        [
            LoadVolumed("image"),
            EnsureChannelFirstd("image", channel_dim="no_channel"),
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd("image", pixdim=(1.0, 1.0, 1.0), mode="bilinear", dtype=np.float32),
            HUWindowd("image", (-1000, 400)),
        ]
    )
    old = old_chain({"image": path})["image"]
    assert isinstance(new, MetaTensor) and new.dtype == torch.float32
    assert tuple(new.shape) == tuple(old.shape)
    np.testing.assert_allclose(new.affine.numpy(), old.affine.numpy(), rtol=0, atol=1e-6)
    torch.testing.assert_close(new.as_tensor(), old.as_tensor(), rtol=0, atol=1e-5)  # 1e-5 of 1400 HU
    assert set(new.meta) == set(old.meta)
