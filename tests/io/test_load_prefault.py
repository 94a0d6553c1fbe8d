"""The SimpleITK ``.nii.gz`` path maps the output's pages in while SimpleITK reads, and cleans up after itself."""

from __future__ import annotations

import gc
import threading

import nibabel as nib
import numpy as np
import pytest

import volcnn.io.layout as layout_mod
from tests.conftest import make_affine
from volcnn.io import VolumeError, load_volume
from volcnn.io.layout import empty_float32

AFFINE = make_affine((0.7, 0.7, 1.25), (-1, -1, 1), origin=(5.0, 6.0, -7.0))


def _save(path, array) -> str:
    img = nib.Nifti1Image(array, AFFINE)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))
    return str(path)


def _ct(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


def _prefault_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "volcnn-prefault"]


def test_empty_float32_is_a_c_ordered_writable_array_that_owns_its_memory():
    a = empty_float32((5, 6, 7))
    assert a.shape == (5, 6, 7) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 3.0
    gc.collect()  # the tensor whose memory it is stays alive as long as the array
    assert float(a.sum()) == 3.0 * 5 * 6 * 7
    b = empty_float32((5, 6, 7))
    b[...] = 1.0
    assert float(a.sum()) == 3.0 * 5 * 6 * 7  # separate memory


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 4, 5), (64, 64, 9), (17, 33, 1025)])
def test_touch_pages_writes_only_zeros_at_page_steps(shape):
    a = np.full(shape, 7.0, dtype=np.float32)
    layout_mod.touch_pages(a)
    flat = a.reshape(-1)
    step = max(1, layout_mod.mmap.PAGESIZE // 4)
    assert np.all(flat[::step] == 0)
    rest = np.ones(flat.size, dtype=bool)
    rest[::step] = False
    assert np.all(flat[rest] == 7.0)


def test_prefault_runs_alongside_simpleitk_and_the_values_are_nibabels(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr = _ct((40, 30, 70), 1)
    path = _save(tmp_path / "a.nii.gz", arr)
    seen = []
    real_read = sitk.ReadImage

    def read(*args, **kwargs):
        seen.append(any(t.name == "volcnn-prefault" for t in threading.enumerate()) or "finished")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", read)
    vol = load_volume(path)
    assert seen  # the SimpleITK path was taken
    np.testing.assert_array_equal(vol.array, np.asarray(nib.load(path).dataobj, dtype=np.float32))
    assert vol.array.flags.c_contiguous and vol.array.dtype == np.float32
    assert not _prefault_threads()


def test_simpleitk_failing_mid_read_falls_back_to_zlib_and_joins_the_thread(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr = _ct((20, 21, 33), 2)
    path = _save(tmp_path / "b.nii.gz", arr)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated SimpleITK failure")

    monkeypatch.setattr(sitk, "ReadImage", broken)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert not _prefault_threads()


def test_truncated_gz_is_still_refused_on_the_simpleitk_path(tmp_path):
    arr = _ct((32, 32, 40), 3)
    path = tmp_path / "c.nii.gz"
    _save(path, arr)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match="c.nii.gz"):
        load_volume(path)
    assert not _prefault_threads()


# ---------------------------------------------------------------- whole volumes copied plane by plane


def _scaled(raw: np.ndarray) -> np.ndarray:
    """A conversion like nibabel's read scaling: float64 out, cast to float32 on assignment."""
    return raw.astype(np.float64) * 0.37 - 1024.25


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("tasks", [1, 8, 1000])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float64])
@pytest.mark.parametrize("convert", [None, _scaled], ids=["plain", "scaled"])
def test_put_all_copies_every_plane_bit_for_bit(monkeypatch, threads, tasks, dtype, convert):
    monkeypatch.setattr(layout_mod, "COPY_THREADS", threads)
    monkeypatch.setattr(layout_mod, "PLANE_TASKS_PER_THREAD", tasks)
    monkeypatch.setattr(layout_mod.os, "cpu_count", lambda: 4)
    zyx = np.random.default_rng(threads * 100 + tasks).integers(0, 250, (13, 11, 7)).astype(dtype)
    expected = (zyx if convert is None else convert(zyx)).transpose(2, 1, 0).astype(np.float32)
    out = np.full((7, 11, 13), np.nan, dtype=np.float32)
    with layout_mod.BlockCopier(out, convert) as copier:
        copier.put_all(zyx)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("layout", ["zyx-view", "c-order", "strided"])
def test_xyz_float32_of_any_layout(monkeypatch, layout):
    monkeypatch.setattr(layout_mod, "COPY_THREADS", 2)
    xyz = np.random.default_rng(4).normal(0, 300, (9, 10, 12))
    if layout == "zyx-view":
        array = np.ascontiguousarray(xyz.transpose(2, 1, 0)).transpose(2, 1, 0)  # a DICOM stack, transposed
    elif layout == "c-order":
        array = np.ascontiguousarray(xyz)  # float64: cast
    else:
        array = np.repeat(xyz, 2, axis=1)[:, ::2]
    out = layout_mod.xyz_float32(array)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out, xyz.astype(np.float32))


@pytest.mark.parametrize("threads", [1, 3])
def test_simpleitk_path_bit_identical_with_any_thread_count(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(layout_mod, "COPY_THREADS", threads)
    monkeypatch.setattr(layout_mod.os, "cpu_count", lambda: 4)
    arr = _ct((33, 17, 29), 5)
    path = _save(tmp_path / "d.nii.gz", arr)
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert vol.array.flags.c_contiguous
