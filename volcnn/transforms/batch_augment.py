"""The training augmentation as one batched operation on the device that holds the batch.

:class:`BatchRandAugment` draws the same distribution of augmentations as the per-sample MONAI chain
:func:`volcnn.transforms.chains.augmentation_transforms` (``RandAffine``, three ``RandFlip``, ``RandRotate90``,
``CenterSpatialCrop``, ``RandGaussianNoise``, ``RandShiftIntensity``), but composes each sample's geometry into
one matrix from output voxel index to input voxel index and resamples the whole batch at once: one sampling grid
and one ``F.grid_sample`` call (bilinear, border padding, ``align_corners=False`` with MONAI's centred
coordinates, so integer positions read exact voxels) for the samples that drew an affine, one exact gather for
the others (crop, flips and 90-degree rotations: no interpolation). Only the ``patch_size`` output is sampled, not
the full input followed by a crop.

Following TorchIO, the random part only samples parameters (:meth:`BatchRandAugment.sample_params`, numpy on
the CPU, from ``self.R``); :meth:`BatchRandAugment.apply` is deterministic given them. The Gaussian noise is drawn
on the batch's device by a ``torch.Generator`` seeded from ``self.R``, so ``self.R`` is the whole random state and
an exact resume only needs it (:mod:`volcnn.engines.rng_state` finds it like any MONAI ``Randomizable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Randomizable
from monai.utils import get_seed

__all__ = ["AugmentParams", "BatchRandAugment"]


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample augmentation parameters of one batch of ``B`` samples (numpy arrays, leading dimension ``B``).

    Attributes:
        affine: ``(B,)`` bool, whether the sample gets the affine (otherwise ``angles``, ``scales`` and ``shifts``
            are ignored).
        angles: ``(B, 3)`` radians about spatial axes 0, 1, 2, composed as MONAI's ``create_rotate`` (order
            ``"XYZ"``).
        scales: ``(B, 3)`` scale factors per axis (MONAI's ``scale_params``: > 1 zooms out).
        shifts: ``(B, 3)`` translation in voxels per axis (MONAI's ``translate_params``).
        flips: ``(B, 3)`` bool, flip along spatial axis 0, 1, 2 (after the affine).
        rot90: ``(B,)`` int in ``{0, 1, 2, 3}``, quarter turns in the plane of spatial axes (0, 1) (after the flips).
        noise_std: ``(B,)`` standard deviation of the additive Gaussian noise; 0 means no noise.
        offsets: ``(B,)`` additive intensity shift; 0 means none.
        noise_seed: seed of the ``torch.Generator`` that draws the noise.
    """

    affine: np.ndarray
    angles: np.ndarray
    scales: np.ndarray
    shifts: np.ndarray
    flips: np.ndarray
    rot90: np.ndarray
    noise_std: np.ndarray
    offsets: np.ndarray
    noise_seed: int = 0

    @classmethod
    def identity(cls, batch_size: int) -> AugmentParams:
        """Parameters that only centre-crop (useful to force single operations in tests)."""
        b = int(batch_size)
        return cls(
            affine=np.zeros(b, bool), angles=np.zeros((b, 3)), scales=np.ones((b, 3)), shifts=np.zeros((b, 3)),
            flips=np.zeros((b, 3), bool), rot90=np.zeros(b, np.int64), noise_std=np.zeros(b), offsets=np.zeros(b),
        )  # fmt: skip


def _eye(b: int) -> np.ndarray:
    return np.broadcast_to(np.eye(4), (b, 4, 4)).copy()


def _translate(t: np.ndarray) -> np.ndarray:
    m = _eye(len(t))
    m[:, :3, 3] = t
    return m


def _rotation(angles: np.ndarray) -> np.ndarray:
    """``(B, 4, 4)`` rotations ``Rx @ Ry @ Rz`` exactly as MONAI's ``create_rotate(3, angles)`` (order ``"XYZ"``)."""
    b = len(angles)
    c, s = np.cos(angles), np.sin(angles)
    rx, ry, rz = _eye(b), _eye(b), _eye(b)
    rx[:, 1, 1], rx[:, 1, 2], rx[:, 2, 1], rx[:, 2, 2] = c[:, 0], -s[:, 0], s[:, 0], c[:, 0]
    ry[:, 0, 0], ry[:, 0, 2], ry[:, 2, 0], ry[:, 2, 2] = c[:, 1], s[:, 1], -s[:, 1], c[:, 1]
    rz[:, 0, 0], rz[:, 0, 1], rz[:, 1, 0], rz[:, 1, 1] = c[:, 2], -s[:, 2], s[:, 2], c[:, 2]
    return rx @ ry @ rz


def _rot90_pull(k: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``(B, 4, 4)`` maps from an index of ``torch.rot90(x, k, dims=(0, 1))`` to the index of ``x`` it copies."""
    n0, n1 = shape[0] - 1, shape[1] - 1
    m = _eye(len(k))
    for kk, rows in (
        (1, ((0, 1, 0, 0), (-1, 0, 0, n1))),  # out[i, j] = x[j, n1 - i]
        (2, ((-1, 0, 0, n0), (0, -1, 0, n1))),  # out[i, j] = x[n0 - i, n1 - j]
        (3, ((0, -1, 0, n0), (1, 0, 0, 0))),  # out[i, j] = x[n0 - j, i]
    ):
        m[k == kk, :2] = rows
    return m


def geometry_matrices(params: AugmentParams, in_shape: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """Per-sample maps from output voxel index to input voxel index, in float64.

    The chain is MONAI's: affine about the input centre (output size = input size), flips, ``rot90`` in the
    (0, 1) plane, then ``CenterSpatialCrop`` (start ``size // 2 - patch // 2`` per axis). Reading it backwards
    from an output index gives ``M = affine @ flips @ rot90 @ crop``.

    Args:
        params: the batch's parameters.
        in_shape: spatial input shape ``(S0, S1, S2)``.
        patch_size: spatial output shape ``(P0, P1, P2)``.

    Returns:
        ``(B, 4, 4)`` homogeneous matrices acting on column vectors ``(i0, i1, i2, 1)``.
    """
    size = np.asarray(in_shape, dtype=np.float64)
    patch = np.asarray(patch_size, dtype=np.int64)
    b = len(params.rot90)
    k = np.asarray(params.rot90, dtype=np.int64) % 4
    rotated = np.broadcast_to(np.asarray(in_shape, dtype=np.int64), (b, 3)).copy()
    rotated[k % 2 == 1, :2] = rotated[k % 2 == 1, 1::-1]
    if (rotated < patch).any():
        raise ValueError(f"input spatial shape {tuple(in_shape)} (after 90-degree rotations) is smaller than "
                         f"patch_size {tuple(patch.tolist())}")  # fmt: skip
    crop = _translate((rotated // 2 - patch // 2).astype(np.float64))
    flips = _eye(b)
    f = np.asarray(params.flips, dtype=bool)
    for axis in range(3):
        flips[f[:, axis], axis, axis] = -1.0
        flips[f[:, axis], axis, 3] = size[axis] - 1
    m = flips @ _rot90_pull(k, in_shape) @ crop
    aff = np.asarray(params.affine, dtype=bool)
    if aff.any():
        centre = _translate(np.broadcast_to((size - 1) / 2, (int(aff.sum()), 3)))
        scale = _eye(int(aff.sum()))
        scale[:, [0, 1, 2], [0, 1, 2]] = np.asarray(params.scales, dtype=np.float64)[aff]
        a = _rotation(np.asarray(params.angles, np.float64)[aff]) @ _translate(np.asarray(params.shifts)[aff]) @ scale
        m[aff] = centre @ a @ np.linalg.inv(centre) @ m[aff]
    return m


def _sampling_grid(
    m: np.ndarray, in_shape: Sequence[int], patch_size: Sequence[int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``F.grid_sample`` grid ``(N, P0, P1, P2, 3)`` (align_corners=False; last dim (x, y, z) = axes 2, 1, 0) for the
    index maps ``m`` ``(N, 4, 4)``.

    Built as MONAI's ``Resample`` builds it: centred input coordinates from centred output coordinates (half
    integers, exact), then ``* 2 / S``; so an integer translation reads exact voxels. Elementwise products rather
    than a matmul (which ``F.affine_grid`` uses), so a TF32 matmul setting cannot round the coordinates.
    """
    s, p = np.asarray(in_shape, np.float64), np.asarray(patch_size, np.float64)
    centre_in, centre_out = np.eye(4), np.eye(4)
    centre_in[:3, 3], centre_out[:3, 3] = (s - 1) / 2, (p - 1) / 2
    centred = np.linalg.inv(centre_in) @ m @ centre_out  # centred output coordinate -> centred input coordinate
    rev = [2, 1, 0]  # grid_sample's (x, y, z) are the spatial axes reversed
    lin = torch.as_tensor(centred[:, rev, :3], dtype=dtype, device=device)  # (N, 3 out xyz, 3 in axes)
    shift = torch.as_tensor(centred[:, rev, 3], dtype=dtype, device=device)
    n = len(m)
    coords = [(torch.arange(int(q), device=device, dtype=dtype) - (q - 1) / 2) for q in p]
    grid = shift.view(n, 1, 1, 1, 3).expand(n, *(int(q) for q in p), 3).clone()
    for axis, shape in enumerate(((-1, 1, 1), (1, -1, 1), (1, 1, -1))):
        grid += coords[axis].view(1, *shape, 1) * lin[:, :, axis].view(n, 1, 1, 1, 3)
    return grid.mul_(torch.as_tensor(2 / s[rev], dtype=dtype, device=device))


class BatchRandAugment(Randomizable):
    """Random affine, flips, 90-degree rotations, centre crop, noise and intensity shift for a whole batch.

    Same distribution as :func:`volcnn.transforms.chains.augmentation_transforms` with the same arguments; the
    argument names follow it. Per sample: with ``prob`` an affine about the input centre (rotation
    ``U(±rotate_deg)`` about each axis, scale ``1 + U(±scale)`` and translation ``U(±translate_vox)`` voxels per
    axis); a flip along each spatial axis with ``flip_prob``; with ``rot90_prob`` a rotation by ``k`` in
    ``{1, 2, 3}`` quarter turns in the (0, 1) plane; the centre crop to ``patch_size``; with ``noise_prob``
    Gaussian noise of standard deviation ``U(0, noise_std)``; with ``shift_prob`` an intensity offset
    ``U(±intensity_shift)``.

    Call it on a batch already on its training device (see :class:`volcnn.engines.AugmentOnDevice`)::

        augment = BatchRandAugment(patch_size=(48, 48, 48))
        patches = augment(images)  # (B, C, 64, 64, 64) -> (B, C, 48, 48, 48), same device and dtype

    Half-precision input is resampled in float32 (a bf16 sampling grid would be off by up to a quarter voxel)
    and returned in its own dtype. A MetaTensor input is returned as a plain tensor: its geometry no longer
    applies.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        prob: float = 0.5,
        rotate_deg: float = 15.0,
        scale: float = 0.1,
        translate_vox: float = 4.0,
        flip_prob: float = 0.5,
        rot90_prob: float = 0.5,
        noise_prob: float = 0.2,
        noise_std: float = 0.02,
        shift_prob: float = 0.3,
        intensity_shift: float = 0.05,
    ) -> None:
        self.patch_size = tuple(int(s) for s in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        self.prob, self.flip_prob, self.rot90_prob = float(prob), float(flip_prob), float(rot90_prob)
        self.noise_prob, self.shift_prob = float(noise_prob), float(shift_prob)
        self.rotate_rad = float(np.deg2rad(rotate_deg))
        self.scale, self.translate_vox = float(scale), float(translate_vox)
        self.noise_std, self.intensity_shift = float(noise_std), float(intensity_shift)
        self.params: AugmentParams | None = None
        self.set_random_state(seed=get_seed())  # seeded by monai.utils.set_determinism, as MONAI's Compose is

    def sample_params(self, batch_size: int) -> AugmentParams:
        """Draw the parameters of ``batch_size`` samples from ``self.R``.

        Every call consumes the same amount of ``self.R`` for a given ``batch_size`` (every draw is made whether
        or not its transform is applied), so the stream of augmentations depends only on the seed.
        """
        b, r = int(batch_size), self.R
        affine = r.random_sample(b) < self.prob
        angles = r.uniform(-self.rotate_rad, self.rotate_rad, (b, 3))
        scales = 1.0 + r.uniform(-self.scale, self.scale, (b, 3))
        shifts = r.uniform(-self.translate_vox, self.translate_vox, (b, 3))
        flips = r.random_sample((b, 3)) < self.flip_prob
        rot90 = np.where(r.random_sample(b) < self.rot90_prob, r.randint(1, 4, b), 0)
        noise = np.where(r.random_sample(b) < self.noise_prob, r.uniform(0.0, self.noise_std, b), 0.0)
        offsets = np.where(r.random_sample(b) < self.shift_prob, r.uniform(-1, 1, b) * self.intensity_shift, 0.0)
        seed = int(r.randint(0, 2**31 - 1))
        return AugmentParams(affine, angles, scales, shifts, flips, rot90, noise, offsets, seed)

    def randomize(self, data: torch.Tensor | int) -> None:
        """MONAI's hook: draw parameters for a batch (a tensor ``(B, ...)`` or a batch size) into ``self.params``."""
        self.params = self.sample_params(data if isinstance(data, int) else len(data))

    def __call__(self, x: torch.Tensor, params: AugmentParams | None = None) -> torch.Tensor:
        """Augment a batch ``(B, C, S0, S1, S2)`` (float, any device, ``S >= patch_size``) to ``(B, C, *patch_size)``.

        Args:
            x: the batch.
            params: use these instead of drawing new ones (``self.params`` is set to what was used).
        """
        if params is None:
            self.randomize(int(x.shape[0]))
        else:
            self.params = params
        assert self.params is not None
        return self.apply(x, self.params)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The deterministic part: resample ``x`` ``(B, C, S0, S1, S2)`` with ``params`` to ``(B, C, *patch_size)``."""
        if isinstance(x, MetaTensor):
            x = x.as_tensor()
        if x.ndim != 5 or not x.is_floating_point():
            raise ValueError(f"expected a float batch (B, C, D, H, W), got {tuple(x.shape)} {x.dtype}")
        b, c, *in_shape = x.shape
        if len(params.rot90) != b:
            raise ValueError(f"params are for {len(params.rot90)} samples, the batch has {b}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        m = geometry_matrices(params, in_shape, self.patch_size)
        exact = _voxel_maps(m)
        out = torch.empty((b, c, *self.patch_size), dtype=work, device=x.device)
        if not exact.all():  # one grid and one grid_sample for every interpolated sample, in float32 (or float64)
            idx = torch.from_numpy(np.flatnonzero(~exact)).to(x.device)
            src = x if not exact.any() else x.index_select(0, idx)
            grid = _sampling_grid(m[~exact], in_shape, self.patch_size, x.device, work)
            sampled = F.grid_sample(src.to(work), grid, mode="bilinear", padding_mode="border", align_corners=False)
            out = sampled if not exact.any() else out.index_copy_(0, idx, sampled)
        if exact.any():  # crop, flips, rot90, integer shifts: a gather of exact voxels, no interpolation
            idx = torch.from_numpy(np.flatnonzero(exact)).to(x.device)
            src = x if exact.all() else x.index_select(0, idx)
            out.index_copy_(0, idx, self._gather(src, m[exact]).to(work))
        noisy = np.flatnonzero(np.asarray(params.noise_std) > 0)
        if len(noisy):
            gen = torch.Generator(device=x.device).manual_seed(int(params.noise_seed))
            noise = torch.randn((len(noisy), c, *self.patch_size), generator=gen, device=x.device)  # float32 draws
            std = torch.as_tensor(np.asarray(params.noise_std)[noisy], dtype=torch.float32, device=x.device)
            out.index_add_(0, torch.from_numpy(noisy).to(x.device), (noise * std.view(-1, 1, 1, 1, 1)).to(work))
        if np.any(params.offsets):
            out += torch.as_tensor(np.asarray(params.offsets), dtype=work, device=x.device).view(-1, 1, 1, 1, 1)
        return out.to(x.dtype)

    def _gather(self, x: torch.Tensor, m: np.ndarray) -> torch.Tensor:
        """``x`` ``(N, C, *S)`` read at the voxel maps ``m`` ``(N, 4, 4)`` -> ``(N, C, *patch_size)``; indices outside
        the input are clamped to its border (as ``padding_mode="border"``)."""
        n, c, *shape = x.shape
        strides = (shape[1] * shape[2], shape[2], 1)
        mi = np.rint(m).astype(np.int64)
        steps = [np.zeros((n, p), np.int64) for p in self.patch_size]  # flat-index contribution per output axis
        for k in range(n):
            for axis in range(3):  # input axis `axis` follows output axis j with step +1 or -1
                j = int(np.flatnonzero(mi[k, axis, :3])[0])
                pos = mi[k, axis, 3] + mi[k, axis, j] * np.arange(self.patch_size[j])
                steps[j][k] += np.clip(pos, 0, shape[axis] - 1) * strides[axis]
        s0, s1, s2 = (torch.from_numpy(v).to(x.device) for v in steps)
        flat = s0.view(n, -1, 1, 1) + s1.view(n, 1, -1, 1) + s2.view(n, 1, 1, -1)
        index = flat.view(n, 1, -1).expand(n, c, -1)
        return torch.gather(x.reshape(n, c, -1), 2, index).view(n, c, *self.patch_size)


def _voxel_maps(m: np.ndarray) -> np.ndarray:
    """``(B,)`` bool: which maps ``m`` ``(B, 4, 4)`` send voxel centres to voxel centres (integer offsets, linear
    part a signed permutation), so that the sample is an exact copy of input voxels."""
    lin = m[:, :3, :3]
    integer = np.all(np.abs(m[:, :3] - np.rint(m[:, :3])) < 1e-9, axis=(1, 2))
    permutation = np.all(np.abs(lin).sum(axis=1) == 1, axis=1) & np.all(np.abs(lin).sum(axis=2) == 1, axis=1)
    return integer & permutation
