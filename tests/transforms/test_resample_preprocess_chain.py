"""The preprocessing chain's fast paths give the former results bit for bit: the chunked HU window, and the
resampling's reused scratch buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta, set_track_meta

import volcnn.transforms.intensity as intensity_mod
import volcnn.transforms.resample as resample_mod
from volcnn.transforms import HUWindow, HUWindowd
from volcnn.transforms.resample import resample_linear, spacing_geometry

LOWER, UPPER = -1000.0, 400.0


def _reference(x: torch.Tensor) -> torch.Tensor:
    """The plain torch expression the window has always computed."""
    x = torch.as_tensor(x, dtype=torch.float32)
    x = x.as_tensor() if isinstance(x, MetaTensor) else x
    return ((x - LOWER) / (UPPER - LOWER)).clamp_(0.0, 1.0)


def _volume(shape=(1, 23, 19, 17), seed=0) -> torch.Tensor:
    x = np.random.default_rng(seed).uniform(-3000.0, 3000.0, shape).astype(np.float32)
    x.reshape(-1)[:6] = [np.nan, np.inf, -np.inf, LOWER, UPPER, -0.0]
    return torch.from_numpy(x)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.as_tensor() if isinstance(a, MetaTensor) else a
    b = b.as_tensor() if isinstance(b, MetaTensor) else b
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.fixture(params=["torch path", "chunked, 1 thread", "chunked, 3 threads"])
def path(request, monkeypatch):
    """The window as configured for small tensors (torch), and chunked with tiny chunks on 1 or 3 threads."""
    if request.param != "torch path":
        monkeypatch.setattr(intensity_mod, "WINDOW_MIN_VOXELS", 1)
        monkeypatch.setattr(intensity_mod, "WINDOW_CHUNK_VOXELS", 97)
        threads = 1 if "1 thread" in request.param else 3
        monkeypatch.setattr(intensity_mod.torch, "get_num_threads", lambda: threads)
    return request.param


def test_window_values_bit_identical(path):
    x = _volume()
    keep = x.clone()
    out = HUWindow((LOWER, UPPER))(x)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert _bits_equal(out, _reference(x))
    assert torch.isnan(out).sum() == 1 and float(out.nan_to_num(0.5).min()) >= 0.0
    assert _bits_equal(x, keep)  # the input is not modified


def test_window_metatensor_keeps_metadata_like_a_torch_op(path):
    affine = torch.diag(torch.tensor([0.7, 0.8, 1.2, 1.0], dtype=torch.float64))
    x = MetaTensor(_volume(seed=1), affine=affine, meta={"filename_or_obj": "a.nii.gz"})
    x.applied_operations.append({"class": "Something"})
    out = HUWindowd("image", (LOWER, UPPER))({"image": x})["image"]
    assert isinstance(out, MetaTensor)
    assert _bits_equal(out, _reference(x))
    assert out.meta["filename_or_obj"] == "a.nii.gz" and torch.equal(out.affine, affine)
    assert out.applied_operations == [{"class": "Something"}] and not out.is_batch
    out.meta["filename_or_obj"] = "changed"
    out.applied_operations.append({"class": "More"})
    assert x.meta["filename_or_obj"] == "a.nii.gz" and len(x.applied_operations) == 1  # copies, not shared


def test_window_without_meta_tracking_still_returns_a_metatensor(path):
    x = MetaTensor(_volume(seed=2), meta={"filename_or_obj": "b.nii.gz"})
    was = get_track_meta()
    set_track_meta(False)
    try:
        out = HUWindow((LOWER, UPPER))(x)
    finally:
        set_track_meta(was)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "b.nii.gz"
    assert _bits_equal(out, _reference(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _volume(seed=3).permute(0, 3, 2, 1),  # not contiguous
        lambda: _volume(seed=4).to(torch.float64),  # cast first
        lambda: _volume(seed=5).numpy(),  # a numpy array
        lambda: _volume(seed=6).requires_grad_(True),  # autograd
        lambda: _volume(seed=7)[:, 2:9],  # a view with an offset
        lambda: torch.from_numpy(np.random.default_rng(8).integers(-2000, 2000, (1, 9, 8, 7)).astype(np.int16)),
    ],
    ids=["permuted", "float64", "numpy", "requires-grad", "sliced", "int16"],
)
def test_window_other_inputs(path, make):
    x = make()
    out = HUWindow((LOWER, UPPER))(x)
    ref = _reference(x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(x))
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _bits_equal(out.detach(), ref)


def test_large_volume_takes_the_chunked_path_by_default(monkeypatch):
    calls = []
    real = HUWindow._window_chunked
    monkeypatch.setattr(HUWindow, "_window_chunked", lambda self, x: calls.append(1) or real(self, x))
    x = _volume((1, 128, 96, 90), seed=9)
    assert x.numel() >= intensity_mod.WINDOW_MIN_VOXELS
    out = HUWindow((LOWER, UPPER))(x)
    assert calls == [1] and _bits_equal(out, _reference(x))
    small = _volume((1, 8, 8, 8), seed=10)
    assert _bits_equal(HUWindow((LOWER, UPPER))(small), _reference(small)) and calls == [1]


# ---------------------------------------------------------------- resampling with reused scratch buffers


def test_scratch_alternates_two_buffers_and_grows():
    scratch = resample_mod._Scratch()
    a = scratch((2, 3, 4))
    b = scratch((2, 3, 4))
    c = scratch((4, 6))
    assert a.shape == (2, 3, 4) and c.shape == (4, 6) and a.dtype == np.float32
    assert not np.shares_memory(a, b) and np.shares_memory(a, c)  # every other call: the same memory
    d = scratch((100,))  # larger: a new buffer, then reused
    assert not np.shares_memory(d, b) and np.shares_memory(scratch((1,)), c) and np.shares_memory(scratch((90,)), d)


def _case(seed: int, shape, spacing, flips, pixdim, dtype, layout):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0.0, 500.0, (1, *shape)).astype(dtype))
    if layout == "permuted":
        x = x.permute(0, 3, 1, 2)
    affine = np.diag([*(np.asarray(spacing) * np.asarray(flips)), 1.0])
    affine[:3, 3] = rng.normal(0.0, 10.0, 3)
    geo = spacing_geometry(x.shape[1:], affine, pixdim)
    assert not geo.unchanged
    return x, geo


CASES = [
    (0, (23, 19, 17), (0.71875, 0.71875, 1.203125), (1, 1, 1), (1.0, 1.0, 1.0), np.float32, "c"),
    (1, (20, 18, 15), (0.7, 0.8, 1.25), (-1, -1, 1), (1.0, 1.0, 1.0), np.float32, "permuted"),
    (2, (16, 12, 30), (0.5, 1.0, 0.5), (1, -1, 1), (1.0, 1.0, 1.0), np.float32, "c"),  # integer coordinates
    (3, (21, 13, 11), (0.9, 0.6, 2.0), (1, 1, -1), (0.6, 1.5, 1.0), np.int16, "c"),  # gathered without scratch
    (4, (9, 31, 14), (1.3, 0.7, 0.7), (-1, 1, 1), (1.0, 1.0, 2.0), np.float64, "permuted"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("slab_voxels", [5, 333, 1 << 18])
def test_reused_scratch_gives_the_values_of_fresh_buffers(monkeypatch, case, workers, slab_voxels):
    """Every scratch element is written before it is read: poisoning each buffer handed out (NaN) changes nothing,
    and the result is the one computed with fresh buffers for every step (the former allocation pattern)."""
    x, geo = _case(*case)
    real_call = resample_mod._Scratch.__call__

    def poisoned(self, shape):
        view = real_call(self, shape)
        view[...] = np.nan
        return view

    def fresh(self, shape):
        return np.full(shape, np.nan, dtype=np.float32)

    monkeypatch.setattr(resample_mod._Scratch, "__call__", poisoned)
    reused = resample_linear(x, geo.xform, geo.shape, slab_voxels=slab_voxels, workers=workers)
    monkeypatch.setattr(resample_mod._Scratch, "__call__", fresh)
    reference = resample_linear(x, geo.xform, geo.shape, slab_voxels=slab_voxels, workers=workers)
    monkeypatch.setattr(resample_mod._Scratch, "__call__", real_call)
    default = resample_linear(x, geo.xform, geo.shape, slab_voxels=slab_voxels, workers=workers)
    assert not torch.isnan(reused).any()
    assert reused.shape == tuple([1, *geo.shape]) and reused.dtype == torch.float32
    assert _bits_equal(reused, reference) and _bits_equal(default, reference)
