"""Tests for volcnn.io.sources and volcnn.io.input_hash: one definition of case names, DICOM files, MetaImage data
files, and of the files and sha256 of an input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from volcnn.core.hashing import sha256_files
from volcnn.io.input_hash import input_files, input_sha256
from volcnn.io.sources import (
    case_name,
    has_dicom_preamble,
    looks_like_dicom,
    metaimage_data_file,
    safe_name,
    strip_volume_suffix,
)
from volcnn.io.types import VolumeError


def test_case_names():
    assert case_name("/data/a/ct_001.nii.gz") == "ct_001"
    assert case_name("scan.v2.nii") == "scan.v2"
    assert case_name("/data/dicom/series 7/") == "series_7"
    assert case_name("..") not in ("", ".", "..")
    assert strip_volume_suffix("a.mha") == "a" and strip_volume_suffix("a.dcm") == "a.dcm"
    assert safe_name(".hidden name.", "volume") == "hidden_name"
    assert safe_name("...", "volume") == "volume"


def _metaimage(tmp_path, name="1.3.6.1.4"):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.int16)), str(tmp_path / f"{name}.mhd"))
    return tmp_path / f"{name}.mhd", tmp_path / f"{name}.raw"


def test_metaimage_case_name_and_hash_cover_the_data_file(tmp_path):
    header, raw = _metaimage(tmp_path)
    assert case_name(header) == "1.3.6.1.4"
    assert metaimage_data_file(header) == raw and input_files(header) == [header, raw]
    before = input_sha256(header)
    raw.write_bytes(b"\x01" + raw.read_bytes()[1:])
    assert input_sha256(header) != before
    raw.unlink()
    assert metaimage_data_file(header) is None and input_files(header) == [header]


def test_embedded_or_listed_metaimage_data_is_no_separate_file(tmp_path):
    for value in ("LOCAL", "LIST"):
        (tmp_path / "a.mhd").write_text(f"NDims = 3\nElementDataFile = {value}\n")
        (tmp_path / value).write_bytes(b"x")  # a file of that name must not be taken for the data
        assert metaimage_data_file(tmp_path / "a.mhd") is None
    assert metaimage_data_file(tmp_path / "LOCAL") is None  # not a header


def test_several_files_hash_by_name_and_content(tmp_path):
    """Moving bytes from the end of one file to the start of the next changes the hash (joined bytes would not)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"12"), b.write_bytes(b"34")
    first = sha256_files([b, a])
    a.write_bytes(b"1"), b.write_bytes(b"234")
    assert sha256_files([a, b]) != first
    assert sha256_files([a]) == hashlib.sha256(b"1").hexdigest()
    with pytest.raises(ValueError, match="no files"):
        sha256_files([])


def test_dicom_magic_and_folder_inputs(tmp_path):
    from volcnn.data import write_dicom_series

    series = tmp_path / "series"
    files = write_dicom_series(
        np.zeros((6, 6, 3), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), series, uid_entropy=["t"], patient_id="SYNTH-0"
    )
    (series / "notes.txt").write_text("not DICOM")
    (series / "old.dcm").write_bytes(b"\0" * 10)  # no preamble, but named .dcm: the reader takes it
    assert has_dicom_preamble(files[0]) and not has_dicom_preamble(series / "old.dcm")
    assert looks_like_dicom(series / "old.dcm") and not looks_like_dicom(series / "notes.txt")
    (series / "old.dcm").unlink()
    assert input_files(series) == sorted(files)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="no DICOM series"):
        input_sha256(empty)
