"""BatchRandAugment against the per-sample MONAI chain it replaces (``augmentation_transforms``).

The geometry is checked operation by operation (flips, 90-degree rotations, integer translations: exact) and all
together (affine with random rotation, scale and translation, then flips, rot90 and the centre crop, against
MONAI's ``RandAffine`` -> ``Flip`` -> ``Rotate90`` -> ``CenterSpatialCrop`` with the same parameters). MONAI resamples
in float64, BatchRandAugment in float32: they agree to a few 1e-6 on [0, 1] images.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, Compose, Flip, RandAffine, Rotate90
from monai.utils import set_determinism

from volcnn.transforms import AugmentParams, BatchRandAugment, augmentation_transforms
from volcnn.transforms.batch_augment import geometry_matrices

PATCH = (16, 16, 16)
SHAPE = (24, 22, 23)  # non-cubic and mixed parity, so centre and crop offsets differ per axis


def _params(b: int, **fields) -> AugmentParams:
    return dataclasses.replace(AugmentParams.identity(b), **{k: np.asarray(v) for k, v in fields.items()})


def _monai(x: torch.Tensor, p: AugmentParams, i: int, patch=PATCH) -> torch.Tensor:
    """Sample ``i`` of ``p`` through MONAI's own transforms (the chain of ``augmentation_transforms``)."""
    chain = []
    if p.affine[i]:
        chain.append(
            RandAffine(
                prob=1.0,
                rotate_range=[(a, a) for a in p.angles[i]],
                scale_range=[(s - 1, s - 1) for s in p.scales[i]],
                translate_range=[(t, t) for t in p.shifts[i]],
                mode="bilinear",
                padding_mode="border",
            )
        )
    axes = [a for a in range(3) if p.flips[i][a]]
    if axes:
        chain.append(Flip(spatial_axis=axes))
    if p.rot90[i]:
        chain.append(Rotate90(int(p.rot90[i]), spatial_axes=(0, 1)))
    chain.append(CenterSpatialCrop(patch))
    out = Compose(chain)(x)
    return out.as_tensor() if isinstance(out, MetaTensor) else out


def _batch(b: int = 4, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, 1, *shape), generator=torch.Generator().manual_seed(seed))


def test_flips_only_are_exact():
    x = _batch(8)
    flips = [[i & 1, i & 2, i & 4] for i in range(8)]
    p = _params(8, flips=np.asarray(flips, bool))
    out = BatchRandAugment(PATCH)(x, p)
    for i in range(8):
        assert torch.equal(out[i], _monai(x[i], p, i))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_only_is_exact(k):
    x = _batch(2)
    p = _params(2, rot90=[k, k], flips=[[False, False, False], [True, False, True]])
    out = BatchRandAugment(PATCH)(x, p)
    for i in range(2):
        assert torch.equal(out[i], _monai(x[i], p, i))


@pytest.mark.parametrize("shift", [(2.0, -3.0, 1.0), (0.0, 0.0, -4.0), (-9.0, 7.0, 0.0)])
def test_integer_translation_is_exact(shift):
    """Integer shifts read whole voxels (the last one runs past the border, where border padding repeats it)."""
    x = _batch(1)
    p = _params(1, affine=[True], shifts=[shift])
    out = BatchRandAugment(PATCH)(x, p)
    assert torch.equal(out[0], _monai(x[0], p, 0))
    if shift == (2.0, -3.0, 1.0):
        start = [s // 2 - q // 2 for s, q in zip(SHAPE, PATCH, strict=True)]
        ref = x[0, :, start[0] + 2 : start[0] + 18, start[1] - 3 : start[1] + 13, start[2] + 1 : start[2] + 17]
        assert torch.equal(out[0], ref)


def test_half_voxel_translation_interpolates_linearly():
    x = _batch(1)
    p = _params(1, affine=[True], shifts=[(0.5, 0.0, 0.0)])
    out = BatchRandAugment(PATCH)(x, p)
    s = [n // 2 - q // 2 for n, q in zip(SHAPE, PATCH, strict=True)]
    crop = x[0, :, s[0] : s[0] + 17, s[1] : s[1] + 16, s[2] : s[2] + 16]
    torch.testing.assert_close(out[0], 0.5 * (crop[:, :-1] + crop[:, 1:]), atol=5e-6, rtol=0)  # float32 grid


def test_random_geometry_matches_the_monai_chain():
    """Rotation, scale, translation, flips and rot90 all drawn at random, on 16 samples."""
    aug = BatchRandAugment(PATCH, prob=1.0, rotate_deg=20.0, scale=0.15, translate_vox=3.0)
    aug.set_random_state(seed=5)
    x = _batch(16, seed=1)
    flips = [[(5 * i) & 1, (5 * i) & 2, (5 * i) & 4] for i in range(16)]  # every rot90 with several flip patterns
    p = dataclasses.replace(
        aug.sample_params(16), noise_std=np.zeros(16), offsets=np.zeros(16), rot90=np.arange(16) % 4,
        flips=np.asarray(flips, bool),
    )  # fmt: skip
    assert p.affine.all() and np.abs(p.angles).min() > 0
    out = aug(x, p)
    for i in range(16):
        torch.testing.assert_close(out[i], _monai(x[i], p, i), atol=2e-5, rtol=0)


def test_rotation_moves_an_off_centre_blob_like_monai():
    """A bright blob off the centre, rotated 15 degrees about each axis in turn: its centroid lands where MONAI's
    RandAffine puts it (to 0.05 voxel), and it really moved (by more than a voxel)."""
    shape = (32, 32, 32)
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
    centre = torch.tensor([21.0, 12.0, 18.0]).view(3, 1, 1, 1)
    x = torch.exp(-((idx - centre) ** 2).sum(0) / (2 * 2.0**2))[None, None]

    def centroid(img: torch.Tensor) -> torch.Tensor:
        w = img[0] / img[0].sum()
        return torch.stack([(w * idx[a]).sum() for a in range(3)])

    before = centroid(x[0])
    for axis in range(3):
        angles = np.zeros(3)
        angles[axis] = np.deg2rad(15.0)
        p = _params(1, affine=[True], angles=[angles])
        ours = BatchRandAugment(shape)(x, p)[0]
        theirs = _monai(x[0], p, 0, patch=shape)
        torch.testing.assert_close(centroid(ours), centroid(theirs), atol=0.05, rtol=0)
        assert float((centroid(ours) - before).norm()) > 1.0


def test_noise_and_intensity_shift():
    x = _batch(3)
    p = _params(3, noise_std=[0.0, 0.05, 0.0], offsets=[0.0, 0.0, -0.04])
    out = BatchRandAugment(PATCH)(x, p)
    plain = BatchRandAugment(PATCH)(x, AugmentParams.identity(3))
    assert torch.equal(out[0], plain[0])
    assert torch.allclose(out[2], plain[2] - 0.04, atol=1e-7)
    noise = out[1] - plain[1]
    assert abs(float(noise.mean())) < 0.005 and float(noise.std()) == pytest.approx(0.05, rel=0.05)
    again = BatchRandAugment(PATCH)(x, p)
    assert torch.equal(out, again)  # the noise comes from params.noise_seed only


def test_same_seed_same_output_different_seed_different():
    x = _batch(8)
    a, b, c = BatchRandAugment(PATCH), BatchRandAugment(PATCH), BatchRandAugment(PATCH)
    a.set_random_state(seed=3)
    b.set_random_state(seed=3)
    c.set_random_state(seed=4)
    for _ in range(3):  # several calls: the stream, not only the first draw
        oa, ob, oc = a(x), b(x), c(x)
        assert torch.equal(oa, ob)
        assert not torch.equal(oa, oc)


def test_seeded_by_set_determinism():
    set_determinism(seed=12)
    try:
        first = BatchRandAugment(PATCH).sample_params(4)
        set_determinism(seed=12)
        second = BatchRandAugment(PATCH).sample_params(4)
    finally:
        set_determinism(seed=None)
    assert np.array_equal(first.angles, second.angles) and first.noise_seed == second.noise_seed


def test_parameter_distribution_matches_the_monai_chain_arguments():
    aug = BatchRandAugment(PATCH)
    aug.set_random_state(seed=0)
    p = aug.sample_params(20000)
    rad = np.deg2rad(15.0)
    assert p.affine.mean() == pytest.approx(0.5, abs=0.02)
    assert np.abs(p.angles).max() <= rad and np.abs(p.angles).max() > 0.99 * rad
    assert np.all(np.abs(p.scales - 1) <= 0.1) and np.all(np.abs(p.shifts) <= 4.0)
    assert p.flips.mean(axis=0) == pytest.approx([0.5, 0.5, 0.5], abs=0.02)
    assert (p.rot90 > 0).mean() == pytest.approx(0.5, abs=0.02)
    assert np.bincount(p.rot90, minlength=4)[1:] / (p.rot90 > 0).sum() == pytest.approx([1 / 3] * 3, abs=0.02)
    assert (p.noise_std > 0).mean() == pytest.approx(0.2, abs=0.02) and p.noise_std.max() <= 0.02
    assert (p.offsets != 0).mean() == pytest.approx(0.3, abs=0.02) and np.abs(p.offsets).max() <= 0.05
    # the MONAI chain it mirrors, built with the same arguments
    chain = augmentation_transforms(PATCH)
    assert chain.transforms[0].rand_affine.rand_affine_grid.rotate_range == (rad, rad, rad)
    assert chain.transforms[6].prob == 0.2 and chain.transforms[7].prob == 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shape_device_and_dtype(dtype):
    aug = BatchRandAugment(PATCH, prob=1.0)
    x = _batch(4).to(dtype)
    out = aug(x)
    assert out.shape == (4, 1, *PATCH) and out.dtype == dtype and out.device == x.device
    ref = aug(x.float(), aug.params)  # half precision is resampled in float32, only the result is rounded
    torch.testing.assert_close(out.float(), ref, atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-5,
                               rtol=0)  # fmt: skip


def test_metatensor_input_gives_a_plain_tensor():
    x = MetaTensor(_batch(2))
    out = BatchRandAugment(PATCH)(x)
    assert type(out) is torch.Tensor and out.shape == (2, 1, *PATCH)


def test_multichannel_batch_uses_one_geometry_per_sample():
    x = _batch(2).repeat(1, 3, 1, 1, 1)
    out = BatchRandAugment(PATCH, prob=1.0, noise_prob=0.0, shift_prob=0.0)(x)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_refuses_inputs_it_cannot_crop():
    aug = BatchRandAugment(PATCH)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        aug(_batch(1, shape=(15, 20, 20)), AugmentParams.identity(1))
    with pytest.raises(ValueError, match="smaller than patch_size"):  # rot90 swaps axes 0 and 1
        aug(_batch(1, shape=(20, 15, 20)), _params(1, rot90=[1]))
    with pytest.raises(ValueError, match="float batch"):
        aug(torch.zeros(1, 1, 20, 20, 20, dtype=torch.int16))


def test_geometry_matrix_of_the_identity_is_the_centre_crop():
    m = geometry_matrices(AugmentParams.identity(1), (44, 45, 40), (32, 32, 32))[0]
    expected = np.eye(4)
    expected[:3, 3] = [22 - 16, 22 - 16, 20 - 16]  # MONAI's CenterSpatialCrop: size // 2 - patch // 2
    assert np.array_equal(m, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    aug = BatchRandAugment(PATCH)
    aug.set_random_state(seed=2)
    x = _batch(16)
    p = dataclasses.replace(aug.sample_params(16), noise_std=np.zeros(16))  # noise: CUDA draws differ from CPU
    cpu, gpu = aug(x, p), aug(x.cuda(), p)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug(x.cuda().half(), p).float().cpu(), cpu, atol=2e-3, rtol=0)
