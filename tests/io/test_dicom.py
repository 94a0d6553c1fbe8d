"""DICOM series reading: a corpus of bad series that must be refused by name, and geometry round trips."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import HEVCMP51, JPEG2000Lossless, JPEGLSLossless, generate_uid

from tests.conftest import make_affine
from volcnn.data import write_dicom_series
from volcnn.io import VolumeError, load_volume
from volcnn.io.dicom import discover_series, load_dicom_files, uid_hash

SHAPE = (10, 9, 7)  # (columns, rows, slices) for an axial series written from an identity-like affine


def _image(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


def _series(folder: Path, image: np.ndarray | None = None, affine: np.ndarray | None = None, tag: str = "a") -> Path:
    image = _image() if image is None else image
    affine = make_affine((0.7, 0.8, 1.5), origin=(-20.0, 10.0, 30.0)) if affine is None else affine
    write_dicom_series(image, affine, folder, uid_entropy=["test", tag], patient_id="SYNTH-t")
    return folder


def _edit(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _assert_same_world(vol, image: np.ndarray, affine: np.ndarray) -> None:
    """``vol`` holds the same voxels at the same world positions as ``image`` with ``affine`` (any axis order)."""
    t = np.linalg.inv(affine) @ vol.affine  # our index -> original index
    perm = np.rint(t[:3, :3])
    np.testing.assert_allclose(t[:3, :3], perm, atol=1e-4)
    np.testing.assert_allclose(t[:3, 3], np.rint(t[:3, 3]), atol=1e-3)
    idx = np.indices(vol.array.shape).reshape(3, -1)
    orig = (perm @ idx + np.rint(t[:3, 3])[:, None]).astype(int)
    np.testing.assert_array_equal(vol.array.reshape(-1), image[orig[0], orig[1], orig[2]].astype(np.float32))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "affine",
    [
        make_affine((0.7, 0.8, 1.5), origin=(-20.0, 10.0, 30.0)),  # RAS-stored
        make_affine((0.7, 0.8, 1.5), flips=(-1, -1, 1), origin=(20.0, 10.0, -30.0)),  # LPS-stored
        make_affine((0.7, 0.8, 1.5), flips=(1, -1, -1), origin=(5.0, 6.0, 7.0)),  # slices stored top-down
        make_affine((0.7, 0.8, 1.5), perm=(2, 0, 1), origin=(1.0, 2.0, 3.0)),  # permuted storage axes
    ],
    ids=["ras", "lps", "flipped", "permuted"],
)
def test_axial_round_trip_values_and_world_positions(tmp_path, affine):
    image = _image(1)
    vol = load_volume(_series(tmp_path / "s", image, affine))
    assert vol.kind == "dicom" and vol.array.dtype == np.float32
    _assert_same_world(vol, image, affine)
    np.testing.assert_allclose(sorted(vol.spacing), [0.7, 0.8, 1.5])
    assert not vol.warnings


def test_file_names_and_instance_numbers_do_not_decide_slice_order(tmp_path):
    ref = load_volume(_series(tmp_path / "ref"))
    folder = _series(tmp_path / "s")
    files = sorted(folder.glob("*.dcm"))
    for i, f in enumerate(files):  # reverse InstanceNumber, scramble names
        _edit(f, InstanceNumber=len(files) - i)
        f.rename(folder / f"z{(i * 5) % len(files):02d}_{i}.dcm")
    vol = load_volume(folder)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine)


@pytest.mark.parametrize("tilt", [0.0, 0.3], ids=["oblique", "oblique+gantry-tilt"])
def test_oblique_series_planted_points_land_at_their_world_positions(tmp_path, tilt):
    rot = _rotation(20.0, -35.0, 12.0)
    r, c = rot[:, 0], rot[:, 1]
    n = np.cross(r, c)
    row_sp, col_sp, step = 0.7, 0.9, 1.5
    p0 = np.array([-40.0, 25.0, 110.0])
    image = np.full((24, 20, 12), -1000, np.int16)  # (columns, rows, slices)
    points = [(3, 4, 2), (20, 15, 9), (11, 2, 6), (0, 19, 11)]
    for m, (i, j, k) in enumerate(points):
        image[i, j, k] = 500 + 100 * m
    folder = _series(tmp_path / "obl", image, np.eye(4))
    files = sorted(folder.glob("*.dcm"))
    for k, f in enumerate(files):
        ipp = p0 + k * step * n + k * tilt * r
        _edit(
            f,
            ImageOrientationPatient=[f"{v:.10f}"[:16] for v in (*r, *c)],
            ImagePositionPatient=[f"{v:.8f}"[:16] for v in ipp],
            PixelSpacing=[f"{row_sp}", f"{col_sp}"],
        )
    for i, f in enumerate(reversed(files)):
        f.rename(folder / f"X{i:03d}.dcm")
    vol = load_volume(folder)
    assert any("gantry tilt" in w for w in vol.warnings) == (tilt > 0)
    for m, (i, j, k) in enumerate(points):
        found = np.argwhere(vol.array == 500 + 100 * m)
        assert len(found) == 1
        world = (vol.affine @ np.append(found[0], 1.0))[:3]
        lps = p0 + i * col_sp * r + j * row_sp * c + k * (step * n + tilt * r)
        np.testing.assert_allclose(world, lps * [-1, -1, 1], atol=0.5)
        np.testing.assert_allclose(world, lps * [-1, -1, 1], atol=1e-3)  # in fact exact up to DS rounding


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    a, b, g = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(g), -np.sin(g), 0], [np.sin(g), np.cos(g), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_rescale_slope_and_intercept_applied_per_slice(tmp_path):
    image = (np.random.default_rng(3).integers(-250, 500, SHAPE) * 4).astype(np.int16)  # multiples of 4
    affine = make_affine((0.7, 0.8, 1.5))
    folder = _series(tmp_path / "s", image, affine)
    scalings = [(1, -1024), (2, -2048), (4, -1000), (0.5, -1024), (1, -1100), (2, -1024), (4, -2048)]
    for k, f in enumerate(sorted(folder.glob("*.dcm"))):
        slope, icpt = scalings[k]
        raw = ((image[:, :, k].T.astype(np.float64) - icpt) / slope).astype(np.int32)
        assert raw.min() >= 0 and raw.max() < 65536
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(icpt)
        ds.PixelData = raw.astype("<u2").tobytes()
        ds.save_as(f)
    vol = load_volume(folder)
    _assert_same_world(vol, image, affine)  # exact HU on every slice


def test_signed_pixels_and_float_rescale(tmp_path):
    folder = _series(tmp_path / "s")
    ref = load_volume(folder)
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.int32) - 1024
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = hu.astype("<i2").tobytes()
        ds.save_as(f)
    np.testing.assert_array_equal(load_volume(folder).array, ref.array)


def test_discover_series_groups_by_uid_and_hides_it(tmp_path):
    folder = _series(tmp_path / "s")
    (folder / "notes.txt").write_text("not dicom")
    series = discover_series(folder)
    assert len(series) == 1
    uid = str(pydicom.dcmread(series[0].files[0]).SeriesInstanceUID)
    assert series[0].uid_hash == uid_hash(uid) and len(series[0].uid_hash) == 12 and uid not in repr(series[0])
    assert len(series[0].files) == SHAPE[2] and series[0].modality == "CT"
    load_volume(folder)  # the non-DICOM file is ignored


# ---------------------------------------------------------------- the corpus of bad series


def _missing_slice(folder: Path) -> None:
    (folder / "IM0004.dcm").unlink()


def _truncated_pixels(folder: Path) -> None:
    f = folder / "IM0003.dcm"
    f.write_bytes(f.read_bytes()[:-50])


def _truncated_header(folder: Path) -> None:
    f = folder / "IM0003.dcm"
    f.write_bytes(f.read_bytes()[:300])


def _cut_before_pixels(folder: Path) -> None:
    f = folder / "IM0003.dcm"
    data = f.read_bytes()
    f.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])


def _two_series(folder: Path) -> None:
    other = _series(folder.parent / "other", tag="b")
    for f in other.glob("*.dcm"):
        shutil.move(f, folder / f"B_{f.name}")


def _duplicate(folder: Path) -> None:
    shutil.copy(folder / "IM0003.dcm", folder / "IM0099.dcm")
    _edit(folder / "IM0099.dcm", SOPInstanceUID=generate_uid(), InstanceNumber=99)


def _compressed(uid: pydicom.uid.UID):
    def mutate(folder: Path) -> None:
        f = folder / "IM0002.dcm"
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51not really compressed data!!"])
        ds["PixelData"].VR = "OB"
        ds.save_as(f)

    return mutate


def _set(name: str, **tags: object):
    return lambda folder: _edit(folder / name, **tags)


def _mr(folder: Path) -> None:
    for f in folder.glob("*.dcm"):
        _edit(f, Modality="MR")


def _no_position(folder: Path) -> None:
    ds = pydicom.dcmread(folder / "IM0005.dcm")
    del ds.ImagePositionPatient
    ds.save_as(folder / "IM0005.dcm")


def _shifted(folder: Path) -> None:
    ds = pydicom.dcmread(folder / "IM0005.dcm")
    ds.ImagePositionPatient = [str(float(ds.ImagePositionPatient[0]) + 3.0), *ds.ImagePositionPatient[1:]]
    ds.save_as(folder / "IM0005.dcm")


def _garbage_dcm(folder: Path) -> None:
    (folder / "junk.dcm").write_bytes(b"\x00" * 10)


BAD = {
    "missing slice": (_missing_slice, None, r"uneven slice spacing.*IM0003.dcm and IM0005.dcm.*missing slice"),
    "truncated pixel data": (_truncated_pixels, "IM0003.dcm", "number of bytes of pixel data is less than expected"),
    "truncated header": (_truncated_header, "IM0003.dcm", "truncated or damaged DICOM file"),
    "cut before pixel data": (_cut_before_pixels, "IM0003.dcm", "no pixel data"),
    "two series": (_two_series, None, r"2 DICOM series in one folder \([0-9a-f]{12} \(7 files\), [0-9a-f]{12}"),
    "duplicate position": (_duplicate, None, "duplicate slice position: IM0003.dcm and IM0099.dcm"),
    "syntax without decoder": (_compressed(HEVCMP51), "IM0002.dcm", r"HEVC/H\.265 .*no decoder installed"),
    "JPEG-LS garbage": (_compressed(JPEGLSLossless), "IM0002.dcm", "cannot decode pixel data in .*JPEG-LS Lossless"),
    "JPEG 2000 garbage": (_compressed(JPEG2000Lossless), "IM0002.dcm", "cannot decode pixel data in .*JPEG 2000"),
    "non-CT modality": (_mr, ".dcm", "Modality is 'MR', not CT"),
    "orientation differs": (
        _set("IM0004.dcm", ImageOrientationPatient=["1", "0", "0", "0", "0.9950042", "0.0998334"]),
        "IM0004.dcm",
        "ImageOrientationPatient .* differs",
    ),
    "rows differ": (_set("IM0006.dcm", Rows=8), "IM0006.dcm", r"Rows/Columns \(8, 10\) differ"),
    "pixel spacing differs": (_set("IM0002.dcm", PixelSpacing=["0.8", "0.8"]), "IM0002.dcm", "PixelSpacing .* differs"),
    "no position": (_no_position, "IM0005.dcm", "missing ImagePositionPatient"),
    "slice off the line": (_shifted, None, "not on one line: IM0005.dcm"),
    "unreadable .dcm": (_garbage_dcm, "junk.dcm", "truncated or damaged DICOM file"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_series_is_refused_naming_file_and_problem(tmp_path, case):
    mutate, culprit, message = BAD[case]
    folder = _series(tmp_path / "series")
    mutate(folder)
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(folder)
    text = str(err.value)
    assert str(folder) in text  # the folder, or a file inside it
    if culprit:
        assert err.value.path.endswith(culprit), text


def test_non_ct_allowed_explicitly_with_warning(tmp_path):
    folder = _series(tmp_path / "s")
    _mr(folder)
    vol = load_dicom_files(sorted(folder.glob("*.dcm")), folder, allow_non_ct=True)
    assert any("not HU" in w for w in vol.warnings)


def test_files_from_two_series_are_refused(tmp_path):
    a = sorted(_series(tmp_path / "a").glob("*.dcm"))
    b = sorted(_series(tmp_path / "b", tag="b").glob("*.dcm"))
    with pytest.raises(VolumeError, match="SeriesInstanceUID differs"):
        load_dicom_files(a[:3] + b[3:], tmp_path)


def test_empty_folder_and_single_slice(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM series found"):
        load_volume(tmp_path)
    folder = _series(tmp_path / "s")
    for f in sorted(folder.glob("*.dcm"))[1:]:
        f.unlink()
    with pytest.raises(VolumeError, match="at least 2"):
        load_volume(folder)
