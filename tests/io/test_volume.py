from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged

from tests.conftest import make_affine
from volcnn.io import VolcnnReader, VolumeError, load_volume


def test_nifti_round_trip_values_and_affine(nifti_factory):
    aff = make_affine((0.7, 0.7, 1.25), (-1, -1, 1), origin=(100.0, 80.0, -200.0))
    arr = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8) - 1000
    vol = load_volume(nifti_factory("a.nii.gz", arr, aff))
    assert vol.array.dtype == np.float32 and vol.array.shape == (6, 7, 8)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.affine, aff)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.7, 1.25])


def test_single_volume_4d_is_accepted(nifti_factory):
    vol = load_volume(nifti_factory("b.nii.gz", np.zeros((4, 5, 6, 1), np.int16), make_affine()))
    assert vol.array.shape == (4, 5, 6)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((8, 8), "expected a 3D volume"), ((4, 4, 4, 2), "expected a 3D volume"), ((8, 8, 1), "single slice")],
)
def test_wrong_dimensionality_is_refused(tmp_path, shape, message):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(path))
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_is_refused(nifti_factory, tmp_path):
    path = nifti_factory(
        "t.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (20, 20, 20)).astype(np.int16), np.eye(4)
    )
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="cannot read NIfTI") as err:
        load_volume(cut)
    assert "cut.nii.gz" in str(err.value)


def test_truncated_uncompressed_is_refused(nifti_factory, tmp_path):
    path = nifti_factory("u.nii", np.ones((20, 20, 20), np.int16), np.eye(4))
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(data[:-100])
    with pytest.raises(VolumeError, match="cut.nii"):
        load_volume(cut)


def test_nan_voxels_are_refused(nifti_factory):
    arr = np.zeros((5, 5, 5), np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    with pytest.raises(VolumeError, match="2 NaN/Inf voxels"):
        load_volume(nifti_factory("nan.nii.gz", arr, np.eye(4)))


def test_degenerate_affine_is_refused(tmp_path):
    path = tmp_path / "deg.nii.gz"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(img, str(path))
    with pytest.raises(VolumeError, match="affine"):
        load_volume(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    other = tmp_path / "x.png"
    other.write_bytes(b"png")
    with pytest.raises(VolumeError, match="not a NIfTI"):
        load_volume(other)
    with pytest.raises(VolumeError, match="no DICOM series"):
        load_volume(tmp_path)


def test_monai_reader_gives_same_volume(nifti_factory):
    aff = make_affine((0.9, 0.9, 2.0), (-1, 1, 1))
    arr = np.random.default_rng(1).integers(-1000, 500, (6, 7, 8)).astype(np.int16)
    path = nifti_factory("m.nii.gz", arr, aff)
    img = LoadImaged("image", reader=VolcnnReader(), image_only=True)({"image": path})["image"]
    np.testing.assert_array_equal(img.numpy(), arr)
    np.testing.assert_allclose(img.affine.numpy(), aff)


def test_monai_reader_refuses_like_load_volume(tmp_path):
    path = tmp_path / "flat.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"not a nifti at all" * 30)
    with pytest.raises(Exception, match="flat.nii.gz"):
        LoadImaged("image", reader=VolcnnReader(), image_only=True)({"image": str(path)})


def _write_mhd(path, array_zyx, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def test_metaimage_as_luna16_ships_it(tmp_path):
    zyx = np.random.default_rng(2).integers(-1000, 400, (5, 6, 7)).astype(np.int16)
    _write_mhd(tmp_path / "scan.mhd", zyx, (0.7, 0.8, 2.5), (-150.0, -170.0, -300.0))
    vol = load_volume(tmp_path / "scan.mhd")
    np.testing.assert_array_equal(vol.array, zyx.transpose(2, 1, 0))
    # MetaImage physical space is LPS: voxel (i, j, k) -> LPS origin + spacing * index; RAS negates x and y
    expected = np.diag([-0.7, -0.8, 2.5, 1.0])
    expected[:3, 3] = [150.0, 170.0, -300.0]
    np.testing.assert_allclose(vol.affine, expected)
    assert vol.kind == "metaimage"


def test_truncated_metaimage_raw_is_refused(tmp_path):
    _write_mhd(tmp_path / "cut.mhd", np.ones((6, 6, 6), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    raw = tmp_path / "cut.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(VolumeError, match="cannot read MetaImage") as err:
        load_volume(tmp_path / "cut.mhd")
    assert "cut.mhd" in str(err.value)


def test_load_transform_never_falls_back_to_monai_readers(nifti_factory):
    """MONAI's LoadImage silently retries with NibabelReader when a designated reader raises; ours must not."""
    from volcnn.io import LoadVolumed

    arr = np.zeros((5, 5, 5), np.float32)
    arr[2, 2, 2] = np.nan
    path = nifti_factory("nan.nii.gz", arr, np.eye(4))
    assert LoadImaged("image", image_only=True)({"image": path})["image"].isnan().any()  # what MONAI alone does
    with pytest.raises(Exception, match=r"nan\.nii\.gz: 1 NaN/Inf voxels"):
        LoadVolumed("image")({"image": path})


def test_nan_voxels_replaced_on_request(nifti_factory):
    arr = np.full((5, 5, 5), 40.0, np.float32)
    arr[0, 0, 0] = -1000.0
    arr[1, 2, 3] = np.nan
    arr[2, 2, 2] = -np.inf
    vol = load_volume(nifti_factory("nan.nii.gz", arr, np.eye(4)), nan_policy="replace")
    assert vol.array[1, 2, 3] == -1000.0 and vol.array[2, 2, 2] == -1000.0
    assert np.isfinite(vol.array).all()
    assert any("replaced 2 NaN/Inf voxels with -1000" in w for w in vol.warnings)
    with pytest.raises(ValueError, match="nan_policy"):
        load_volume(nifti_factory("nan2.nii.gz", arr, np.eye(4)), nan_policy="zero")


def test_all_nan_volume_replaced_with_air(nifti_factory):
    vol = load_volume(
        nifti_factory("allnan.nii.gz", np.full((3, 3, 3), np.nan, np.float32), np.eye(4)), nan_policy="replace"
    )
    np.testing.assert_array_equal(vol.array, -1024.0)


def _form_image(sform, scode, qform, qcode):
    img = nib.Nifti1Image(np.full((4, 5, 6), -500, np.int16), None)
    img.set_sform(sform, code=scode)
    img.set_qform(qform, code=qcode)
    return img


@pytest.mark.parametrize(
    ("qshift", "scode", "qcode", "warned"),
    [(0.0, 1, 1, False), (0.0005, 1, 1, False), (2.0, 1, 1, True), (2.0, 1, 0, False), (2.0, 2, 1, True)],
)
def test_sform_qform_disagreement_is_reported(tmp_path, qshift, scode, qcode, warned):
    sform = make_affine((0.8, 0.8, 2.0), (-1, 1, 1), origin=(10.0, 20.0, 30.0))
    qform = sform.copy()
    qform[0, 3] += qshift
    path = tmp_path / "f.nii.gz"
    nib.save(_form_image(sform, scode, qform, qcode), str(path))
    vol = load_volume(path)
    np.testing.assert_allclose(vol.affine, sform)  # nibabel's choice: the sform
    msgs = [w for w in vol.warnings if "disagree" in w]
    assert bool(msgs) == warned
    if warned:
        assert "using the sform" in msgs[0] and "2.000 mm" in msgs[0]


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.random.default_rng(0).integers(-1024, 1500, (5, 5, 5)), None),
        (np.random.default_rng(0).integers(0, 2, (5, 5, 5)), "mask"),
        (np.random.default_rng(0).integers(0, 256, (5, 5, 5)), "8-bit"),
        (np.random.default_rng(0).integers(0, 4000, (5, 5, 5)), "no negative values"),
    ],
    ids=["hu", "mask", "uint8", "mr-like"],
)
def test_values_that_do_not_look_like_hu_are_warned(nifti_factory, array, expected):
    vol = load_volume(nifti_factory("v.nii.gz", array.astype(np.int16), np.eye(4)))
    if expected is None:
        assert not vol.warnings
    else:
        assert (
            len(vol.warnings) == 1
            and expected in vol.warnings[0]
            and "not CT in HU" in vol.warnings[0]
            or (expected == "no negative values" and expected in vol.warnings[0])
        )
