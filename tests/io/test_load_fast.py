"""The streaming NIfTI reader and the C-ordered float32 volumes of ``load_volume``, against plain references.

The reader copies the voxels block by block (decompressing ``.nii.gz`` itself) into a C-ordered float32
``(X, Y, Z)`` array; these tests hold it to nibabel's ``get_fdata(dtype=np.float32)`` bit for bit (scaled,
big-endian, wide-integer, extension-carrying and multi-member files included), with small block, tile and
read sizes so that every boundary is crossed, and check that damaged files are still refused by name.
"""

from __future__ import annotations

import gzip
import io
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import volcnn.io.checks as checks_mod
import volcnn.io.layout as layout_mod
import volcnn.io.nifti as nifti_mod
from tests.conftest import make_affine
from volcnn.io import LoadVolumed, VolcnnReader, Volume, VolumeError, load_volume
from volcnn.io.layout import xyz_float32

AFFINE = make_affine((0.7, 0.8, 1.25), (-1, 1, 1), origin=(10.0, -20.0, 30.0))


@pytest.fixture(params=["default", "small"])
def block_sizes(request, monkeypatch):
    """The reader as configured, and with tiny blocks, tiles, gzip pieces and check chunks (every boundary
    crossed), three copy threads, and ``.nii.gz`` always inflated by zlib rather than SimpleITK."""
    if request.param == "small":
        monkeypatch.setattr(nifti_mod, "BLOCK_SLICES", 3)
        monkeypatch.setattr(layout_mod, "TILE_BYTES", 64)
        monkeypatch.setattr(nifti_mod, "GZIP_READ_BYTES", 97)
        monkeypatch.setattr(nifti_mod, "GZIP_MAX_OUT_BYTES", 101)
        monkeypatch.setattr(checks_mod, "CHECK_CHUNK_BYTES", 16)
        monkeypatch.setattr(layout_mod, "COPY_THREADS", 3)
        monkeypatch.setattr(nifti_mod, "SITK_GZIP", False)
    return request.param


def _nifti_bytes(
    array: np.ndarray,
    affine: np.ndarray = AFFINE,
    slope: float | None = None,
    inter: float | None = None,
    endianness: str = "<",
    extension: bytes = b"",
    cls: type = nib.Nifti1Header,
) -> bytes:
    """A single-file NIfTI (header, optional comment extension, voxels in Fortran order) with exactly these fields.

    Written by hand so that ``scl_slope``/``scl_inter`` are stored as given (``nib.save`` would recompute them).
    """
    hdr = cls(endianness=endianness)
    hdr.set_data_shape(array.shape)
    hdr.set_data_dtype(array.dtype)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr["scl_slope"] = np.nan if slope is None else slope
    hdr["scl_inter"] = np.nan if inter is None else inter
    if extension:
        hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", extension))
    hdr["vox_offset"] = 0  # nibabel sets the smallest offset past the header and extensions
    out = io.BytesIO()
    hdr.write_to(out)
    out.write(b"\0" * (int(hdr["vox_offset"]) - out.tell()))
    out.write(array.astype(array.dtype.newbyteorder(endianness)).tobytes(order="F"))
    return out.getvalue()


def _write(path: Path, raw: bytes) -> str:
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return str(path)


def _reference(path: str) -> np.ndarray:
    """What the reader returned before it streamed: nibabel's float32 data (scaling applied), C-ordered."""
    return np.ascontiguousarray(nib.load(path).get_fdata(dtype=np.float32))


def _assert_same_as_nibabel(path: str, simple: bool = True) -> Volume:
    vol = load_volume(path)
    ref = _reference(path)
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    assert vol.array.shape == ref.shape[:3]
    np.testing.assert_array_equal(vol.array.view(np.uint32), ref.reshape(vol.array.shape).view(np.uint32))  # bits
    assert np.array_equal(vol.affine, nib.load(path).affine)
    if simple:  # the straightforward reference: nibabel's scaled values, then float32
        plain = np.asanyarray(nib.load(path).dataobj).astype(np.float32).reshape(vol.array.shape)
        np.testing.assert_array_equal(vol.array.view(np.uint32), plain.view(np.uint32))
    return vol


def _ct(shape: tuple[int, ...], seed: int = 0, dtype: type = np.int16, lo: int = -1024, hi: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(dtype)


# ---------------------------------------------------------------- values bit-identical to nibabel


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(7, 5, 67), (6, 9, 2), (3, 4, 40), (16, 1 + 16, 33)])
def test_int16_unscaled_matches_nibabel(tmp_path, block_sizes, suffix, shape):
    _assert_same_as_nibabel(_write(tmp_path / f"a{suffix}", _nifti_bytes(_ct(shape))))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("dtype", "slope", "inter", "lo", "hi"),
    [
        (np.int16, 0.5, -1024.25, -32768, 32767),  # float64 scaling, then float32
        (np.int16, 1.0, -1024.0, 0, 4096),  # intercept only (what many converters write)
        (np.uint8, 3.7, -12.1, 0, 256),
        (np.uint16, 0.123456789, 0.0, 0, 65536),
        (np.int32, 1e-3, 7.0, -(2**31), 2**31 - 1),
        (np.float32, 2.0, 1.5, -3000, 3000),
    ],
    ids=["int16-scaled", "int16-intercept", "uint8-scaled", "uint16-slope", "int32-scaled", "float32-scaled"],
)
def test_scaled_files_match_nibabel(tmp_path, block_sizes, suffix, dtype, slope, inter, lo, hi):
    arr = _ct((5, 6, 37), 1, np.int64, lo, hi).astype(dtype)
    if dtype == np.float32:
        arr = arr + np.float32(0.3)
    vol = _assert_same_as_nibabel(_write(tmp_path / f"s{suffix}", _nifti_bytes(arr, slope=slope, inter=inter)))
    np.testing.assert_allclose(vol.array, arr.astype(np.float64) * slope + inter, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(
    "array",
    [
        _ct((5, 4, 9), 2, np.int64, -(2**62), 2**62),  # int -> float64 -> float32, as nibabel rounds
        _ct((5, 4, 9), 3, np.int32, -(2**31), 2**31 - 1),
        np.random.default_rng(4).normal(0, 1e6, (5, 4, 9)),  # float64 -> float32
        _ct((5, 4, 9), 5, np.int8, -128, 127),
    ],
    ids=["int64", "int32", "float64", "int8"],
)
def test_wide_and_narrow_types_match_nibabel(tmp_path, block_sizes, array):
    array = array.copy()
    if array.dtype == np.int64:  # rounds differently straight to float32 than through float64 (nibabel's way)
        array[1, 2, 3] = 2**62 + 2**38 + 1
        assert np.float32(array[1, 2, 3]) != np.float32(np.float64(array[1, 2, 3]))
    vol = _assert_same_as_nibabel(_write(tmp_path / "w.nii.gz", _nifti_bytes(array)), simple=array.dtype != np.int64)
    if array.dtype == np.int64:
        assert vol.array[1, 2, 3] == np.float32(2**62)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_big_endian_extensions_and_nifti2(tmp_path, block_sizes, suffix):
    arr = _ct((6, 5, 11), 6)
    _assert_same_as_nibabel(_write(tmp_path / f"be{suffix}", _nifti_bytes(arr, endianness=">", slope=2.0, inter=-3)))
    ext = _write(tmp_path / f"ext{suffix}", _nifti_bytes(arr, extension=b"a comment " * 100))
    assert nib.load(ext).dataobj.offset > 352
    _assert_same_as_nibabel(ext)
    two = tmp_path / f"two{suffix}"
    nib.save(nib.Nifti2Image(arr, AFFINE), str(two))
    _assert_same_as_nibabel(str(two))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_fortran_and_c_ordered_arrays_save_alike_and_load_alike(tmp_path, block_sizes, suffix):
    arr = _ct((9, 7, 13), 7)
    c_path, f_path = tmp_path / f"c{suffix}", tmp_path / f"f{suffix}"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), AFFINE), str(c_path))
    nib.save(nib.Nifti1Image(np.asfortranarray(arr), AFFINE), str(f_path))
    c_vol, f_vol = _assert_same_as_nibabel(str(c_path)), _assert_same_as_nibabel(str(f_path))
    np.testing.assert_array_equal(c_vol.array, arr)
    np.testing.assert_array_equal(f_vol.array, arr)


def test_single_volume_4d_and_multi_member_gzip(tmp_path, block_sizes):
    arr = _ct((6, 5, 23), 8)
    four = _write(tmp_path / "four.nii.gz", _nifti_bytes(arr[..., None]))
    vol = load_volume(four)
    assert vol.array.shape == (6, 5, 23) and vol.array.flags.c_contiguous
    np.testing.assert_array_equal(vol.array, arr)
    raw = _nifti_bytes(arr)
    cut = 352 + 1000 + 1  # members split inside the voxel data, at an odd byte
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    np.testing.assert_array_equal(_assert_same_as_nibabel(str(multi)).array, arr)


class _NoStreaming:
    def __init__(self, *args, **kwargs):
        raise AssertionError("streamed with zlib")


def test_plain_nii_gz_is_inflated_by_simpleitk_and_checked(tmp_path, monkeypatch):
    """An unscaled single-member .nii.gz takes the SimpleITK path; what it cannot vouch for is streamed."""
    arr = _ct((9, 8, 41), 22)
    plain = _write(tmp_path / "p.nii.gz", _nifti_bytes(arr, extension=b"x" * 40))
    scaled = _write(tmp_path / "s.nii.gz", _nifti_bytes(arr, slope=1.0, inter=-1024.0))
    sheared_affine = AFFINE.copy()
    sheared_affine[0, 2] = 0.3  # geometry is nibabel's whatever SimpleITK makes of it
    sheared = _write(tmp_path / "sh.nii.gz", _nifti_bytes(arr, affine=sheared_affine))
    wide = _write(tmp_path / "w.nii.gz", _nifti_bytes(_ct((9, 8, 41), 22, np.int32, -(2**31), 2**31 - 1)))
    big_endian = _write(tmp_path / "be.nii.gz", _nifti_bytes(arr, endianness=">"))
    multi = tmp_path / "mm.nii.gz"
    raw = _nifti_bytes(arr)
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    real = nifti_mod._PrefetchedBlocks
    monkeypatch.setattr(nifti_mod, "_PrefetchedBlocks", _NoStreaming)
    for path in (plain, sheared, wide):
        _assert_same_as_nibabel(path, simple=path != wide)
    for path in (scaled, big_endian, str(multi)):
        with pytest.raises(VolumeError, match="streamed with zlib"):
            load_volume(path)
    monkeypatch.setattr(nifti_mod, "_PrefetchedBlocks", real)
    for path in (scaled, big_endian, str(multi)):
        _assert_same_as_nibabel(path)


def test_simpleitk_bytes_that_fail_the_checksum_are_not_used(tmp_path, monkeypatch):
    import SimpleITK as sitk

    arr = _ct((9, 8, 41), 23)
    path = _write(tmp_path / "p.nii.gz", _nifti_bytes(arr))
    real_read = sitk.ReadImage

    def altered(*args, **kwargs):  # one voxel differs from the file: the CRC32 no longer matches
        image = real_read(*args, **kwargs)
        image[0, 0, 0] = image[0, 0, 0] + 1
        return image

    monkeypatch.setattr(sitk, "ReadImage", altered)
    streamed = []
    real = nifti_mod._PrefetchedBlocks
    monkeypatch.setattr(nifti_mod, "_PrefetchedBlocks", lambda *a, **k: streamed.append(1) or real(*a, **k))
    np.testing.assert_array_equal(_assert_same_as_nibabel(path).array, arr)
    assert streamed == [1]


def test_monai_loader_output_and_meta(tmp_path, block_sizes):
    arr = _ct((7, 6, 35), 9)
    path = _write(tmp_path / "m.nii.gz", _nifti_bytes(arr, slope=1.0, inter=-1024.0))
    img = LoadVolumed("image")({"image": path})["image"]
    assert img.dtype == np.float32 or str(img.dtype) == "torch.float32"
    assert img.is_contiguous() and tuple(img.shape) == (7, 6, 35)
    np.testing.assert_array_equal(img.numpy(), _reference(path))
    stored = nib.load(path).affine  # the sform, as float32 in the header
    assert np.array_equal(img.affine.numpy(), stored) and np.allclose(stored, AFFINE)
    assert np.array_equal(np.asarray(img.meta["original_affine"]), stored)
    assert list(np.asarray(img.meta["spatial_shape"])) == [7, 6, 35]
    assert img.meta["space"] == "RAS" and img.meta["source_kind"] == "nifti"
    assert img.meta["filename_or_obj"] == path


def test_reader_hands_monai_a_contiguous_array():
    """A volume in another layout (built by hand, or by a DICOM reader) is made C-ordered by the reader."""
    zyx = _ct((11, 5, 6), 10).astype(np.float32)
    vol = Volume(array=zyx.transpose(2, 1, 0), affine=np.eye(4), path="mem", kind="dicom")
    array, meta = VolcnnReader().get_data(vol)
    assert array.flags.c_contiguous and array.dtype == np.float32
    np.testing.assert_array_equal(array, zyx.transpose(2, 1, 0))
    assert list(meta["spatial_shape"]) == [6, 5, 11]


@pytest.mark.parametrize(
    "array",
    [
        _ct((6, 5, 70), 11).astype(np.float32).transpose(2, 1, 0).transpose(2, 1, 0).copy(order="F"),
        _ct((70, 5, 6), 12).transpose(2, 1, 0),  # int16, Fortran-ordered
        _ct((8, 10, 12), 13).astype(np.float64)[::2, 1::3, ::-1],  # arbitrary strides
        np.random.default_rng(14).normal(0, 1e6, (4, 5, 6)),  # C-ordered float64
    ],
    ids=["float32-F", "int16-F", "strided-float64", "float64-C"],
)
def test_xyz_float32_is_astype_in_c_order(block_sizes, array):
    out = xyz_float32(array)
    assert out.flags.c_contiguous and out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), np.ascontiguousarray(array.astype(np.float32)).view(np.uint32))
    same = np.zeros((3, 4, 5), np.float32)
    assert xyz_float32(same) is same


def test_metaimage_and_dicom_volumes_are_c_ordered(tmp_path, block_sizes):
    import SimpleITK as sitk

    from volcnn.data import write_dicom_series
    from volcnn.io.dicom import load_series_folder

    for dtype in (np.int16, np.float64):
        zyx = _ct((19, 6, 7), 15).astype(dtype)
        img = sitk.GetImageFromArray(zyx)
        img.SetSpacing((0.7, 0.8, 2.5))
        sitk.WriteImage(img, str(tmp_path / f"scan_{dtype.__name__}.mhd"))
        vol = load_volume(tmp_path / f"scan_{dtype.__name__}.mhd")
        assert vol.array.flags.c_contiguous and vol.array.dtype == np.float32
        np.testing.assert_array_equal(vol.array, zyx.astype(np.float32).transpose(2, 1, 0))
    image = _ct((10, 9, 7), 16)
    write_dicom_series(image, make_affine((0.7, 0.8, 1.5)), tmp_path / "dcm", uid_entropy=["fast"], patient_id="F")
    vol = load_volume(tmp_path / "dcm")
    assert vol.array.flags.c_contiguous and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, load_series_folder(tmp_path / "dcm").array)


# ---------------------------------------------------------------- refusals, still naming the file


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((4, 5, 6, 2), "expected a 3D volume"),
        ((4, 5, 6, 1, 1), "expected a 3D volume"),
        ((7, 9), "expected a 3D volume"),
        ((7, 9, 1), "single slice"),
        ((1, 9, 40), "single slice"),
    ],
)
def test_wrong_shapes_are_refused_by_name(tmp_path, block_sizes, suffix, shape, message):
    path = _write(tmp_path / f"odd{suffix}", _nifti_bytes(_ct(shape, 17)))
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(path)
    assert err.value.path == path and path in str(err.value)


def test_complex_voxels_are_refused(tmp_path):
    arr = (np.ones((4, 4, 4)) + 1j).astype(np.complex64)
    path = _write(tmp_path / "c.nii", _nifti_bytes(arr))
    with pytest.raises(VolumeError, match="unsupported NIfTI voxel type complex64") as err:
        load_volume(path)
    assert "c.nii" in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("keep", [352 + 10, 352 + 4 * 5 * 9 * 2 - 1, 352 + 4 * 5 * 9 * 2 // 2])
def test_truncated_voxel_data_is_refused(tmp_path, block_sizes, suffix, keep):
    raw = _nifti_bytes(_ct((4, 5, 9), 18))
    path = _write(tmp_path / f"cut{suffix}", raw[:keep])
    with pytest.raises(VolumeError, match="cannot read NIfTI") as err:
        load_volume(path)
    assert "cut.nii" in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("damage", ["crc", "length", "cut trailer", "cut stream", "flipped data"])
def test_damaged_gzip_is_refused(tmp_path, block_sizes, damage):
    """The gzip checksum and length are verified: a damaged file is an error, not silently wrong voxels.

    The volume is larger than what ``nib.load`` decompresses for the header, so that only the voxel reader sees
    the end of the stream (nibabel's ``get_fdata`` returns all of these files without an error).
    """
    raw = _nifti_bytes(_ct((40, 40, 40), 19))
    gz = bytearray(gzip.compress(raw))
    if damage == "crc":
        gz[-8] ^= 0xFF
    elif damage == "length":
        gz[-4] ^= 0x01
    elif damage == "cut trailer":
        gz = gz[:-8]
    elif damage == "cut stream":
        gz = gz[: len(gz) * 2 // 3]
    else:
        gz[len(gz) // 2] ^= 0x55
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(VolumeError, match="cannot read NIfTI") as err:
        load_volume(path)
    assert "bad.nii.gz" in str(err.value)


def test_reader_threads_end_with_every_load(tmp_path, block_sizes):
    good = _write(tmp_path / "g.nii.gz", _nifti_bytes(_ct((4, 5, 30), 20)))
    bad = _write(tmp_path / "b.nii.gz", _nifti_bytes(_ct((4, 5, 30), 20))[:900])
    load_volume(good)
    with pytest.raises(VolumeError):
        load_volume(bad)
    assert not [t for t in threading.enumerate() if t.name.startswith(("volcnn-nifti-read", "volcnn-copy"))]


# ---------------------------------------------------------------- value checks in chunks


def test_nan_inf_checks_and_replacement_across_chunks(tmp_path, block_sizes):
    arr = np.full((6, 5, 7), 30.0, np.float32)
    arr[0, 0, 0] = -900.0
    arr[5, 4, 6] = np.nan  # last chunk
    arr[2, 1, 3] = np.inf  # +Inf only: the minimum stays finite
    arr[3, 0, 0] = -np.inf
    path = _write(tmp_path / "n.nii.gz", _nifti_bytes(arr))
    with pytest.raises(VolumeError, match="3 NaN/Inf voxels") as err:
        load_volume(path)
    assert "n.nii.gz" in str(err.value)
    vol = load_volume(path, nan_policy="replace")
    assert vol.array[5, 4, 6] == -900.0 and vol.array[2, 1, 3] == -900.0 and vol.array[3, 0, 0] == -900.0
    assert np.isfinite(vol.array).all() and any("replaced 3 NaN/Inf voxels with -900" in w for w in vol.warnings)
    for value in (np.inf, -np.inf, np.nan):  # a single bad voxel in a middle or the last chunk
        for where in ((2, 1, 1), (3, 3, 3)):
            one = np.full((4, 4, 4), -500.0, np.float32)
            one[where] = value
            with pytest.raises(VolumeError, match="1 NaN/Inf voxels"):
                load_volume(_write(tmp_path / "i.nii", _nifti_bytes(one)))


def test_integer_check_reads_every_chunk(tmp_path, block_sizes):
    arr = np.random.default_rng(21).integers(0, 256, (6, 5, 7)).astype(np.float32)
    arr[0, 0, 0], arr[5, 4, 6] = 0.0, 200.0
    assert any("8-bit" in w for w in load_volume(_write(tmp_path / "u.nii", _nifti_bytes(arr))).warnings)
    arr[5, 4, 5] = 100.5  # a fraction in the last chunk: not an 8-bit image
    warnings = load_volume(_write(tmp_path / "f.nii", _nifti_bytes(arr))).warnings
    assert len(warnings) == 1 and "no negative values" in warnings[0]


def test_no_hu_warnings_where_hu_is_not_expected(tmp_path, caplog):
    arr = np.random.default_rng(22).integers(0, 256, (6, 5, 7)).astype(np.float32)
    path = _write(tmp_path / "u.nii", _nifti_bytes(arr))
    with caplog.at_level("WARNING", logger="volcnn.io.checks"):
        assert load_volume(path, expect_hu=False).warnings == []
    assert caplog.records == []
    with caplog.at_level("WARNING", logger="volcnn.io.checks"):
        assert any("8-bit" in w for w in load_volume(path).warnings)
    assert any("u.nii" in r.getMessage() and "8-bit" in r.getMessage() for r in caplog.records)
    arr[1, 1, 1] = np.nan  # what is wrong with the values themselves is still said
    vol = load_volume(_write(tmp_path / "n.nii", _nifti_bytes(arr)), nan_policy="replace", expect_hu=False)
    assert len(vol.warnings) == 1 and "replaced 1 NaN/Inf" in vol.warnings[0]
