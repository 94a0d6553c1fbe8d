"""Real-world variants of one DICOM CT series: each reads to exactly the plain series' voxels and affine, or is
refused naming the file and the true problem.

Variants are built from one synthetic series: blank or missing UIDs (as anonymisers leave them), every compressed
transfer syntax a plugin decodes (RLE, JPEG-LS lossless and near-lossless, JPEG 2000 lossless, JPEG lossless process
14), enhanced multi-frame CT through highdicom's legacy conversion, pixel padding, a SliceThickness that disagrees
with the slice positions, and several series in one folder (refused from the headers, measured in bytes read).
"""

from __future__ import annotations

import copy
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests.conftest import make_affine
from tests.io.jpeg_lossless import encode_jpeg_lossless
from volcnn.data import write_dicom_series
from volcnn.io import Volume, VolumeError, load_volume
from volcnn.io.dicom import PADDING_HU, discover_series, load_dicom_files
from volcnn.io.ingest import ingest

SHAPE = (40, 36, 8)  # (columns, rows, slices); JPEG 2000 (openjpeg) encodes frames of 32 x 32 and more
AFFINE = make_affine((0.7, 0.8, 1.5), origin=(-20.0, 10.0, 30.0))


@dataclass
class Plain:
    folder: Path
    image: np.ndarray
    vol: Volume


def _write(folder: Path, seed: int, tag: str, image: np.ndarray | None = None) -> tuple[Path, np.ndarray]:
    if image is None:
        image = np.random.default_rng(seed).integers(-1024, 2000, SHAPE).astype(np.int16)
    write_dicom_series(image, AFFINE, folder, uid_entropy=["variants", tag], patient_id="SYNTH-v")
    return folder, image


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Plain:
    folder, image = _write(tmp_path_factory.mktemp("plain") / "series", 0, "a")
    vol = load_volume(folder)
    np.testing.assert_array_equal(vol.array, image.astype(np.float32))  # the plain series reads exactly
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-9)
    assert not vol.warnings
    return Plain(folder, image, vol)


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Plain:
    """A second series on the same grid, with other voxels and other UIDs."""
    folder, image = _write(tmp_path_factory.mktemp("other") / "series", 1, "b")
    return Plain(folder, image, load_volume(folder))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _copy(src: Path, dest: Path, prefix: str = "") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in _files(src):
        shutil.copy(f, dest / f"{prefix}{f.name}")
    return dest


def _each(folder: Path, edit) -> Path:
    for f in _files(folder):
        _each_file(f, edit)
    return folder


def _each_file(f: Path, edit) -> None:
    ds = pydicom.dcmread(f)
    edit(ds)
    ts = ds.file_meta.TransferSyntaxUID
    ds.save_as(f, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True)


def _assert_same(vol: Volume, ref: Volume) -> None:
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.affine, ref.affine)


# ---------------------------------------------------------------- blank or missing UIDs


def _no_uids(how: str):
    def edit(ds: pydicom.Dataset) -> None:
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if how == "blank":
                setattr(ds, kw, "")
            else:
                delattr(ds, kw)
        ds.file_meta.MediaStorageSOPInstanceUID = ""

    return edit


@pytest.mark.parametrize("how", ["blank", "missing"])
def test_series_without_uids_reads_exactly_with_a_warning(tmp_path, plain, how):
    folder = _each(_copy(plain.folder, tmp_path / "s"), _no_uids(how))
    vol = load_volume(folder)
    _assert_same(vol, plain.vol)
    assert any("no SeriesInstanceUID" in w for w in vol.warnings), vol.warnings


def _pair(tmp_path: Path, plain: Plain, other: Plain, a: dict, b: dict) -> Path:
    """Both series in one folder (A_*, B_*), UIDs blank, the same frame of reference and series number, then
    ``a`` / ``b`` set on each."""
    folder = _copy(plain.folder, tmp_path / "both", "A_")
    _copy(other.folder, folder, "B_")
    frame = str(pydicom.dcmread(_files(plain.folder)[0]).FrameOfReferenceUID)
    for f in _files(folder):
        ds = pydicom.dcmread(f)
        _no_uids("blank")(ds)
        ds.FrameOfReferenceUID, ds.SeriesNumber = frame, 1
        for k, v in (a if f.name.startswith("A_") else b).items():
            setattr(ds, k, v)
        ds.save_as(f)
    return folder


@pytest.mark.parametrize(
    "attribute, a, b",
    [
        ("SeriesNumber", 1, 2),
        ("FrameOfReferenceUID", "1.2.3.4", "1.2.3.5"),
        ("ConvolutionKernel", "B30f", "B70f"),
        ("AcquisitionNumber", 1, 2),  # two acquisitions at the same positions
    ],
)
def test_series_without_uids_are_told_apart(tmp_path, plain, other, attribute, a, b):
    folder = _pair(tmp_path, plain, other, {attribute: a}, {attribute: b})
    series = discover_series(folder)
    assert len(series) == 2
    for info in series:
        names = {f.name[:2] for f in info.files}
        assert len(names) == 1 and len(info.files) == SHAPE[2]
        ref = plain.vol if names == {"A_"} else other.vol
        assert any("taken apart by AcquisitionNumber" in w for w in info.warnings) == (attribute == "AcquisitionNumber")
        vol = load_dicom_files(info.files, folder)
        _assert_same(vol, ref)
        assert any("no SeriesInstanceUID" in w for w in vol.warnings)
    with pytest.raises(VolumeError, match="2 DICOM series in one folder"):
        load_volume(folder)


def test_series_without_uids_that_cannot_be_told_apart_are_refused(tmp_path, plain, other):
    folder = _pair(tmp_path, plain, other, {}, {})
    with pytest.raises(VolumeError, match="duplicate slice position: A_IM0001.dcm and B_IM0001.dcm") as err:
        load_volume(folder)
    assert "no SeriesInstanceUID" in str(err.value) and "cannot be told apart" in str(err.value)
    assert str(folder) in str(err.value)


def test_a_file_without_uid_next_to_its_series_with_one_is_refused(tmp_path, plain, other):
    folder = _copy(plain.folder, tmp_path / "both", "A_")
    _copy(other.folder, folder, "B_")
    frame = str(pydicom.dcmread(_files(plain.folder)[0]).FrameOfReferenceUID)
    for f in folder.glob("B_*.dcm"):
        _each_file(f, lambda ds: (_no_uids("blank")(ds), setattr(ds, "FrameOfReferenceUID", frame)))
    with pytest.raises(VolumeError, match="no SeriesInstanceUID, while A_IM0001.dcm.* has one") as err:
        load_volume(folder)
    assert err.value.path.endswith("B_IM0001.dcm")


def test_sequential_acquisitions_without_uids_stay_one_series(tmp_path, plain):
    """Step-and-shoot: one AcquisitionNumber per table position, none sharing a position: one volume."""
    folder = _each(_copy(plain.folder, tmp_path / "s"), _no_uids("blank"))
    for k, f in enumerate(_files(folder)):
        _each_file(f, lambda ds, k=k: setattr(ds, "AcquisitionNumber", k // 2 + 1))
    assert len(discover_series(folder)) == 1
    _assert_same(load_volume(folder), plain.vol)


# ---------------------------------------------------------------- compressed transfer syntaxes


def _compress(uid, **kwargs):
    def edit(ds: pydicom.Dataset) -> None:
        ds.compress(uid, **kwargs)

    return edit


def _jpeg_lossless(uid, predictor: int):
    def edit(ds: pydicom.Dataset) -> None:
        frame = encode_jpeg_lossless(ds.pixel_array, int(ds.BitsStored), predictor)
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"

    return edit


def _native(uid):
    def edit(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid  # written so by save_as

    return edit


SYNTAXES = {
    "implicit VR": (ImplicitVRLittleEndian, _native(ImplicitVRLittleEndian)),
    "deflated": (DeflatedExplicitVRLittleEndian, _native(DeflatedExplicitVRLittleEndian)),
    "RLE": (RLELossless, _compress(RLELossless)),
    "JPEG-LS lossless": (JPEGLSLossless, _compress(JPEGLSLossless)),
    "JPEG-LS near-lossless NEAR=0": (JPEGLSNearLossless, _compress(JPEGLSNearLossless, jls_error=0)),
    "JPEG 2000 lossless": (JPEG2000Lossless, _compress(JPEG2000Lossless)),
    "JPEG lossless SV1": (JPEGLosslessSV1, _jpeg_lossless(JPEGLosslessSV1, 1)),
    "JPEG lossless process 14, predictor 6": (JPEGLossless, _jpeg_lossless(JPEGLossless, 6)),
}


@pytest.mark.parametrize("name", list(SYNTAXES), ids=list(SYNTAXES))
def test_series_in_each_transfer_syntax_reads_exactly(tmp_path, plain, name):
    uid, edit = SYNTAXES[name]
    folder = _each(_copy(plain.folder, tmp_path / "s"), edit)
    assert all(pydicom.dcmread(f).file_meta.TransferSyntaxUID == uid for f in _files(folder))
    vol = load_volume(folder)
    _assert_same(vol, plain.vol)
    lossy = [w for w in vol.warnings if "lossy" in w]
    assert lossy == (["lossy compressed pixel data (" + uid.name + ", which allows lossy compression): voxel values "
                      "may differ from the acquired ones"] if uid == JPEGLSNearLossless else [])  # fmt: skip


def test_near_lossless_jpeg_ls_reads_within_its_error_bound_with_a_warning(tmp_path, plain):
    def edit(ds: pydicom.Dataset) -> None:
        ds.compress(JPEGLSNearLossless, jls_error=3)
        ds.LossyImageCompression = "01"

    vol = load_volume(_each(_copy(plain.folder, tmp_path / "s"), edit))
    np.testing.assert_array_equal(vol.affine, plain.vol.affine)
    err = np.abs(vol.array - plain.vol.array)
    assert 0 < err.max() <= 3
    assert any("lossy compressed pixel data (JPEG-LS Lossy" in w for w in vol.warnings), vol.warnings


def test_compressed_syntax_without_its_decoder_is_refused_naming_the_syntax(tmp_path, plain, monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder

    folder = _each(_copy(plain.folder, tmp_path / "s"), _compress(JPEGLSLossless))
    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if pyjpegls and pylibjpeg-libjpeg were not installed
    monkeypatch.setattr(decoder, "_unavailable", {"pyjpegls": ("pyjpegls",)})
    with pytest.raises(VolumeError, match=r"JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\) "
                                          "and no decoder installed for it.*pyjpegls") as err:  # fmt: skip
        load_volume(folder)
    assert err.value.path.endswith(".dcm") and str(folder) in err.value.path


def test_unknown_transfer_syntax_is_refused_naming_it(tmp_path, plain):
    folder = _each(_copy(plain.folder, tmp_path / "s"), _native("1.2.3.4.5.6.7"))
    with pytest.raises(VolumeError, match=r"unknown transfer syntax 1\.2\.3\.4\.5\.6\.7") as err:
        load_volume(folder)
    assert err.value.path.endswith("IM0001.dcm")


# ---------------------------------------------------------------- enhanced multi-frame CT


def _legacy(folder: Path, **kwargs) -> pydicom.Dataset:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    datasets = [pydicom.dcmread(f) for f in _files(folder)]
    return LegacyConvertedEnhancedCTImage(datasets, generate_uid(), 2, generate_uid(), 1, **kwargs)


@pytest.fixture(scope="module")
def enhanced(plain) -> pydicom.Dataset:
    ds = _legacy(plain.folder)
    assert int(ds.NumberOfFrames) == SHAPE[2] and "ImagePositionPatient" not in ds
    return ds


def _save(ds: pydicom.Dataset, folder: Path, name: str = "enhanced.dcm") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder


def test_legacy_converted_enhanced_ct_reads_exactly(tmp_path, plain, enhanced):
    vol = load_volume(_save(copy.deepcopy(enhanced), tmp_path / "mf"))
    _assert_same(vol, plain.vol)
    assert not vol.warnings


def test_enhanced_ct_compressed_reads_exactly(tmp_path, plain):
    ds = _legacy(plain.folder, transfer_syntax_uid=JPEGLSLossless)
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    _assert_same(load_volume(_save(ds, tmp_path / "mf")), plain.vol)


def test_enhanced_ct_with_per_frame_rescale_reads_exact_hu(tmp_path, plain):
    image = (np.random.default_rng(3).integers(-250, 500, SHAPE) * 4).astype(np.int16)  # multiples of 4
    folder, _ = _write(tmp_path / "s", 0, "r", image)
    scalings = [(1, -1024), (2, -2048), (4, -1000), (0.5, -1024), (1, -1100), (2, -1024), (4, -2048), (1, -1024)]
    for k, f in enumerate(_files(folder)):
        slope, icpt = scalings[k]
        ds = pydicom.dcmread(f)
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = str(slope), str(icpt)
        ds.PixelData = ((image[:, :, k].T.astype(np.float64) - icpt) / slope).astype("<u2").tobytes()
        ds.save_as(f)
    ds = _legacy(folder)
    assert "PixelValueTransformationSequence" in ds.PerFrameFunctionalGroupsSequence[0]  # per frame, not shared
    vol = load_volume(_save(ds, tmp_path / "mf"))
    np.testing.assert_array_equal(vol.array, image.astype(np.float32))
    np.testing.assert_array_equal(vol.affine, plain.vol.affine)


def test_enhanced_ct_with_per_frame_orientation_reads_exactly(tmp_path, plain, enhanced):
    ds = copy.deepcopy(enhanced)
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PlaneOrientationSequence = copy.deepcopy(orientation)
    _assert_same(load_volume(_save(ds, tmp_path / "mf")), plain.vol)


def _frame(ds: pydicom.Dataset, k: int) -> pydicom.Dataset:
    return ds.PerFrameFunctionalGroupsSequence[k]


def _frame_at_z(ds: pydicom.Dataset) -> list[int]:
    """Frame indices in position order (the reader names frames by their 1-based index in the file)."""
    z = [float(_frame(ds, k).PlanePositionSequence[0].ImagePositionPatient[2]) for k in range(int(ds.NumberOfFrames))]
    return list(np.argsort(z))


def _move(dz: float, which: int):
    def edit(ds: pydicom.Dataset) -> tuple[str, str]:
        k = _frame_at_z(ds)[which]
        pos = _frame(ds, k).PlanePositionSequence[0]
        pos.ImagePositionPatient = [*pos.ImagePositionPatient[:2], float(pos.ImagePositionPatient[2]) + dz]
        return "", f"enhanced.dcm frame {k + 1}"

    return edit


def _duplicate(ds: pydicom.Dataset) -> tuple[str, str]:
    order = _frame_at_z(ds)
    a, b = order[2], order[3]
    _frame(ds, b).PlanePositionSequence = copy.deepcopy(_frame(ds, a).PlanePositionSequence)
    return "", f"frame {min(a, b) + 1} and enhanced.dcm frame {max(a, b) + 1} are both at"


def _tilted(ds: pydicom.Dataset) -> tuple[str, str]:
    ds.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence = Sequence([pydicom.Dataset()])
    ds.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence[0].ImageOrientationPatient = [
        1, 0, 0, 0, 0.9950042, 0.0998334,
    ]  # fmt: skip
    return "enhanced.dcm", "frame 5: ImageOrientationPatient .* differs from .* in enhanced.dcm frame 1"


def _no_position(ds: pydicom.Dataset) -> tuple[str, str]:
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    return "enhanced.dcm", "frame 3: no PlanePositionSequence in the per-frame or shared functional groups"


ENHANCED_BAD = {
    "uneven spacing": lambda ds: (_move(0.5, 4)(ds)[0], r"uneven slice spacing: 2\.000 mm between .*frame"),
    "missing frame position": _no_position,
    "duplicate position": lambda ds: (_duplicate(ds)[0], "duplicate slice position: enhanced.dcm " + _duplicate(ds)[1]),
    "orientation differs": _tilted,
}


@pytest.mark.parametrize("case", list(ENHANCED_BAD), ids=list(ENHANCED_BAD))
def test_bad_enhanced_ct_is_refused_naming_file_frame_and_problem(tmp_path, enhanced, case):
    ds = copy.deepcopy(enhanced)
    culprit, message = ENHANCED_BAD[case](ds)
    folder = _save(ds, tmp_path / "mf")
    with pytest.raises(VolumeError, match=message) as err:
        load_volume(folder)
    assert "enhanced.dcm" in str(err.value) and str(folder) in err.value.path
    if culprit:
        assert err.value.path.endswith(culprit)


# ---------------------------------------------------------------- padding, slice thickness


def _pad_corners(value: int, bits_stored: int = 12, signed: bool = False, also=None):
    """Stored ``value`` in a 6 x 5 corner of every slice, PixelPaddingValue ``value`` (+ ``also`` tags)."""

    def edit(ds: pydicom.Dataset) -> None:
        raw = ds.pixel_array.astype(np.int64) - (1024 if signed else 0)  # signed: store HU directly
        raw[:5, :6] = value
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), bits_stored, bits_stored - 1
        if signed:
            ds.RescaleIntercept = "0"
        ds.PixelPaddingValue = value if value >= 0 or signed else value + 65536
        for k, v in (also or {}).items():
            setattr(ds, k, v)
        for kw in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            if kw in ds:
                ds[kw].VR = "SS" if signed else "US"
        ds.PixelData = raw.astype("<i2" if signed else "<u2").tobytes()

    return edit


def _signed_range(ds: pydicom.Dataset) -> None:
    _pad_corners(-2000, signed=True, also={"PixelPaddingRangeLimit": -1500})(ds)
    raw = np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns).copy()
    raw[:2, :3] = -1800  # inside the padding range
    ds.PixelData = raw.tobytes()


PADDING = {
    "unsigned 4095 (3071 HU unmasked)": _pad_corners(4095),
    "16-bit 63536 in 12-bit data (1072 HU once masked)": _pad_corners(63536),
    "signed -2000 with range limit -1500": _signed_range,
    "RLE, unsigned 4095": lambda ds: (_pad_corners(4095)(ds), ds.compress(RLELossless)),
}


@pytest.mark.parametrize("case", list(PADDING), ids=list(PADDING))
def test_pixel_padding_becomes_air(tmp_path, plain, case):
    vol = load_volume(_each(_copy(plain.folder, tmp_path / "s"), PADDING[case]))
    expected = plain.vol.array.copy()
    expected[:6, :5, :] = PADDING_HU  # array is (X = column, Y = row, Z)
    np.testing.assert_array_equal(vol.array, expected)
    np.testing.assert_array_equal(vol.affine, plain.vol.affine)
    assert PADDING_HU == -1024.0
    assert any(f"{6 * 5 * SHAPE[2]} padding voxel(s)" in w and "-1024" in w for w in vol.warnings), vol.warnings


@pytest.mark.parametrize("thickness, warned", [("3", True), ("1.52", False), ("1.5", False)])
def test_slice_thickness_disagreeing_with_positions_is_a_warning(tmp_path, plain, thickness, warned):
    folder = _each(_copy(plain.folder, tmp_path / "s"), lambda ds: setattr(ds, "SliceThickness", thickness))
    vol = load_volume(folder)
    _assert_same(vol, plain.vol)
    msgs = [w for w in vol.warnings if "SliceThickness" in w]
    assert bool(msgs) == warned, vol.warnings
    if warned:
        assert "SliceThickness 3 mm differs from the 1.5 mm spacing of the slice positions" in msgs[0]


def test_enhanced_ct_slice_thickness_is_checked_too(tmp_path, enhanced):
    ds = copy.deepcopy(enhanced)
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = "5"
    vol = load_volume(_save(ds, tmp_path / "mf"))
    assert any("SliceThickness 5 mm differs" in w for w in vol.warnings), vol.warnings


# ---------------------------------------------------------------- several series: refused from the headers


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_several_series_are_refused_before_any_pixel_data_is_read(tmp_path):
    if not Path("/proc/self/io").exists():
        pytest.skip("bytes read are measured through /proc/self/io (Linux)")
    rng = np.random.default_rng(5)
    big = (512, 512, 3)  # 512 KiB of pixel data per file
    for tag in ("a", "b"):
        image = rng.integers(-1024, 2000, big).astype(np.int16)
        write_dicom_series(image, AFFINE, tmp_path / tag, uid_entropy=[tag], patient_id="X")
    both = _copy(tmp_path / "a", tmp_path / "both", "A_")
    _copy(tmp_path / "b", both, "B_")
    files = _files(both)
    pixel_bytes = sum(len(pydicom.dcmread(f).PixelData) for f in files)
    # what reading every header can cost: the bytes before the pixel data plus two buffers of read-ahead per file
    # (one to check the DICM preamble, one for the header)
    headers = sum(f.stat().st_size - len(pydicom.dcmread(f).PixelData) for f in files)
    allowance = headers + len(files) * 2 * max(io.DEFAULT_BUFFER_SIZE, files[0].stat().st_blksize)
    for _ in range(2):  # the first call may import modules lazily; measure the second
        before = _bytes_read()
        with pytest.raises(VolumeError, match="2 DICOM series in one folder"):
            load_volume(both)
        refused = _bytes_read() - before
    before = _bytes_read()
    load_volume(tmp_path / "a")  # the same measure sees one series' pixel data read
    assert _bytes_read() - before >= pixel_bytes // 2
    assert refused <= allowance, f"{refused} bytes read to refuse, {allowance} allowed for the headers"
    assert refused < pixel_bytes // 10, f"{refused} bytes read to refuse {pixel_bytes} bytes of pixel data"


# ---------------------------------------------------------------- ingest reads every variant


def test_ingest_reads_every_variant_with_warnings_in_the_manifest(tmp_path, plain, other, enhanced):
    src = tmp_path / "src"
    _each(_copy(plain.folder, src / "no_uids"), _no_uids("blank"))
    _each(_copy(plain.folder, src / "jpeg_ls"), _compress(JPEGLSLossless))
    _save(copy.deepcopy(enhanced), src / "enhanced")
    _pair(src, plain, other, {"SeriesNumber": 1}, {"SeriesNumber": 2})  # src/both: two series, no UIDs
    result = ingest([src], tmp_path / "out")
    assert not result.failures, result.failures
    by_source = {}
    for e in result.converted:
        by_source.setdefault(Path(e["source"]).name, []).append(e)
    assert sorted((k, len(v)) for k, v in by_source.items()) == [
        ("both", 2), ("enhanced", 1), ("jpeg_ls", 1), ("no_uids", 1)
    ]  # fmt: skip
    for name, entries in by_source.items():
        for e in entries:
            img = nib.load(tmp_path / "out" / e["output"])
            data = np.asarray(img.dataobj)
            ref = other.vol if name == "both" and np.array_equal(data, other.vol.array) else plain.vol
            np.testing.assert_array_equal(data, ref.array)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)
            assert any("no SeriesInstanceUID" in w for w in e["warnings"]) == (name in ("no_uids", "both"))
    assert {len(e["series_uid_hash"]) for e in result.converted} == {12}
    assert len({e["series_uid_hash"] for e in by_source["both"]}) == 2
