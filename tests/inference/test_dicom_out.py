"""``volcnn infer --dicom-out``: the findings as a DICOM SR (TID 1500) and the heat map / explanations as Parametric
Maps, read back with pydicom and highdicom: references to the input series and instances, the input's frame of
reference, each SR point equal to ``findings.json``'s centre in LPS, probabilities, map values equal to the heat map
NIfTI slice by slice (placed by each input instance's position), new UIDs every run, volume mode, NIfTI inputs, a
case whose DICOM cannot be written, an enhanced multi-frame input, the command line."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from tests.conftest import make_affine
from tests.inference import NODULE_RAS, BlobNet, nodule_scan
from tests.inference.test_runner import SMALL, bundle, infer_main  # noqa: F401  (bundle: a fixture)
from volcnn.data import write_dicom_series
from volcnn.inference import InferenceRunner
from volcnn.inference.dicom_out import (
    EXPLAIN_PM_NAME,
    HEATMAP_PM_NAME,
    SR_NAME,
    write_batch_dicom,
    write_case_dicom,
)
from volcnn.io import write_nifti

PATCH = (12, 12, 12)
#: two small axial series around the nodule: LPS-stored slices ascending, and RAS-stored with z descending
GEOMETRY = {
    "chest": ((36, 36, 24), make_affine((2.0, 2.0, 2.5), (-1, -1, 1), origin=(50.0, 30.0, -10.0))),
    "flipped": ((36, 30, 20), make_affine((2.0, 2.5, 3.0), (1, 1, -1), origin=(-20.0, -55.0, 55.0))),
}
PATIENT_ID = "SYNTH-DCMOUT"
PATIENT_NAME = "Synthetic^Phantom"
MODEL = {"name": "blob", "version": "1.2.3", "sha256": "abc"}
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"


def _series(folder: Path, name: str) -> Path:
    shape, aff = GEOMETRY[name]
    write_dicom_series(nodule_scan(shape, aff), aff, folder, uid_entropy=[name, str(folder)], patient_id=PATIENT_ID)
    return folder


def _runner(**kwargs) -> InferenceRunner:
    settings = {
        "patch_size": PATCH,
        "pixdim": (2.0, 2.0, 2.0),
        "stride_mm": 6.0,
        "batch_size": 512,
        "device": "cpu",
        "threshold": 0.3,
        "model_info": MODEL,
        "progress": False,
        **kwargs,
    }
    return InferenceRunner(BlobNet(PATCH), **settings)


def _instances(folder: Path) -> dict[str, pydicom.Dataset]:
    """The input series' headers by SOPInstanceUID."""
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm")))
    }


def _lps(ras) -> np.ndarray:
    return np.asarray(ras, dtype=np.float64) * [-1.0, -1.0, 1.0]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One batch: a series whose DICOM cannot be written (no FrameOfReferenceUID: the reader does not need it, a
    DICOM result does) first, then two good series and a NIfTI file; the runner, then the --dicom-out post-step."""
    root = tmp_path_factory.mktemp("dicom_out")
    inputs = {name: _series(root / "in" / name, name) for name in GEOMETRY}
    broken = _series(root / "in" / "no_frame", "chest")
    for path in broken.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    shape, aff = GEOMETRY["chest"]
    nifti = root / "in" / "plain.nii.gz"
    write_nifti(nifti, nodule_scan(shape, aff), aff)
    order = [broken, inputs["chest"], nifti, inputs["flipped"]]
    out = root / "out"
    result = _runner().run([str(p) for p in order], out)
    (out / "no_frame" / SR_NAME).write_bytes(b"stale")  # an earlier run's output must not survive a failure
    logger = logging.getLogger("volcnn")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        failures = write_batch_dicom([str(p) for p in order], out, result)
    finally:
        logger.removeHandler(handler)
    return {
        "inputs": inputs,
        "broken": broken,
        "nifti": nifti,
        "out": out,
        "result": result,
        "failures": failures,
        "log": "\n".join(r.getMessage() for r in records),
    }


def test_the_batch_goes_on_past_a_case_whose_dicom_fails(batch):
    assert batch["result"]["failures"] == []  # inference itself succeeded everywhere
    (failure,) = batch["failures"]
    assert failure["case"] == "no_frame" and failure["stage"] == "dicom_out"
    assert failure["input"] == str(batch["broken"]) and "FrameOfReferenceUID" in failure["error"]
    assert json.loads((batch["out"] / "failures.json").read_text()) == [failure]
    with open(batch["out"] / "summary.csv", newline="") as f:
        status = {row["case"]: row["status"] for row in csv.DictReader(f)}
    assert status == {"no_frame": "dicom_out failed", "chest": "ok", "plain": "ok", "flipped": "ok"}
    broken = batch["out"] / "no_frame"
    assert (broken / "findings.json").is_file() and not list(broken.glob("*.dcm"))
    for name in GEOMETRY:
        assert (batch["out"] / name / SR_NAME).is_file() and (batch["out"] / name / HEATMAP_PM_NAME).is_file()
    assert not list((batch["out"] / "plain").glob("*.dcm"))  # a NIfTI input: no DICOM, no failure
    assert "plain" in batch["log"] and "DICOM series" in batch["log"]


def test_no_patient_identifier_in_logs_or_json(batch):
    texts = [batch["log"], *(p.read_text() for p in batch["out"].rglob("*.json"))]
    assert all(PATIENT_ID not in t and "Synthetic" not in t for t in texts)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_sr_points_probabilities_and_references(batch, name):
    folder, case_dir = batch["inputs"][name], batch["out"] / name
    doc = json.loads((case_dir / "findings.json").read_text())
    assert doc["findings"], "no finding to report"
    instances = _instances(folder)
    first = next(iter(instances.values()))
    raw = pydicom.dcmread(case_dir / SR_NAME)
    assert raw.SOPClassUID == COMPREHENSIVE_3D_SR_STORAGE and raw.Modality == "SR"
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert raw.StudyInstanceUID == first.StudyInstanceUID and raw.SeriesInstanceUID != first.SeriesInstanceUID
    assert raw.PatientID == PATIENT_ID and str(raw.PatientName) == PATIENT_NAME  # copied, not invented
    (evidence,) = raw.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == first.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence}
    assert refs == {(CTImageStorage, uid) for uid in instances}

    sr = hd.sr.srread(case_dir / SR_NAME)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [
        f"finding{k:02d}" for k in range(1, len(doc["findings"]) + 1)
    ]
    for group, finding in zip(groups, doc["findings"], strict=True):
        roi = group.roi
        assert roi.GraphicType == "POINT" and roi.ValueType == "SCOORD3D"
        assert roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
        np.testing.assert_allclose(roi.value[0], _lps(finding["center_ras_mm"]), atol=0.01)
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding["probability"], abs=1e-9)
        assert probability.unit.value == "{probability}" and probability.unit.scheme_designator == "UCUM"
    assert np.linalg.norm(_lps(doc["findings"][0]["center_ras_mm"]) - _lps(NODULE_RAS)) < 8.0
    (score_group,) = sr.content.get_image_measurement_groups()
    (score,) = score_group.get_measurements(name=codes.DCM.Probability)
    assert score.value == pytest.approx(doc["score"], abs=1e-9)
    names = hd.sr.utils.find_content_items(sr, name=codes.DCM.AlgorithmName, recursive=True)
    versions = hd.sr.utils.find_content_items(sr, name=codes.DCM.AlgorithmVersion, recursive=True)
    assert names and {n.TextValue for n in names} == {MODEL["name"]}
    assert {v.TextValue for v in versions} == {MODEL["version"]}
    library = hd.sr.utils.find_content_items(sr, value_type="IMAGE", recursive=True)
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library} == set(instances)


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_parametric_map_equals_the_heat_map_slice_by_slice(batch, name):
    folder, case_dir = batch["inputs"][name], batch["out"] / name
    instances = _instances(folder)
    first = next(iter(instances.values()))
    heat_img = nib.load(case_dir / "heatmap.nii.gz")
    heat = np.asarray(heat_img.dataobj, dtype=np.float32)
    to_voxel = np.linalg.inv(heat_img.affine)
    _check_map(case_dir / HEATMAP_PM_NAME, instances, {"probability": (heat, to_voxel)}, unit="{probability}")
    pm = pydicom.dcmread(case_dir / HEATMAP_PM_NAME)
    assert pm.StudyInstanceUID == first.StudyInstanceUID and pm.SeriesInstanceUID != first.SeriesInstanceUID
    assert heat.max() > 0.5  # the map is not trivially empty


def _check_map(path: Path, instances: dict[str, pydicom.Dataset], channels: dict, unit: str) -> None:
    """``path`` is a Parametric Map on the input's frame of reference, unsigned 16-bit in RLE Lossless, one frame
    per input instance and channel, each frame through its real-world value mapping equal (1e-4) to its channel's
    NIfTI ``(array, RAS -> voxel)`` at the input instance it derives from, found through that instance's
    ImagePositionPatient."""
    first = next(iter(instances.values()))
    pm = pydicom.dcmread(path)
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert pm.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert (pm.BitsAllocated, pm.PixelRepresentation) == (16, 0) and "FloatPixelData" not in pm
    assert int(pm.NumberOfFrames) == len(instances) * len(channels)
    raw_uint16 = int(pm.NumberOfFrames) * int(pm.Rows) * int(pm.Columns) * 2  # half what float32 frames would take
    assert len(pm.PixelData) < raw_uint16, (len(pm.PixelData), raw_uint16)  # RLE compressed it
    (series,) = pm.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    pixels = pm.pixel_array.astype(np.float32)
    seen: dict[str, set[str]] = {label: set() for label in channels}
    for k, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        mappings = frame.get("RealWorldValueMappingSequence") or pm.SharedFunctionalGroupsSequence[0].get(
            "RealWorldValueMappingSequence"
        )
        (mapping,) = mappings
        label = mapping.LUTLabel
        assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == unit
        assert (mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped) == (0, 65535)
        slope, intercept = float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)
        assert (slope * 65535 + intercept, intercept) == pytest.approx((1.0, 0.0))
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        instance = instances[source.ReferencedSOPInstanceUID]
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, np.asarray(instance.ImagePositionPatient, dtype=float), atol=1e-4)
        array, to_voxel = channels[label]
        index = to_voxel @ [*_lps(position), 1.0]  # LPS -> RAS is the same sign flip
        np.testing.assert_allclose(index[:2], 0.0, atol=1e-2)
        z = int(np.rint(index[2]))
        expected = array[:, :, z].T  # (rows, columns): X along a row, Y down a column
        np.testing.assert_allclose(pixels[k] * slope + intercept, expected, atol=1e-4)
        seen[label].add(source.ReferencedSOPInstanceUID)
    assert all(uids == set(instances) for uids in seen.values())


def test_every_run_makes_new_uids(batch, tmp_path):
    case_dir = tmp_path / "chest"
    shutil.copytree(batch["out"] / "chest", case_dir)
    before = {n: pydicom.dcmread(case_dir / n, stop_before_pixels=True) for n in (SR_NAME, HEATMAP_PM_NAME)}
    assert sorted(p.name for p in write_case_dicom(batch["inputs"]["chest"], case_dir)) == [SR_NAME, HEATMAP_PM_NAME]
    for n, old in before.items():
        new = pydicom.dcmread(case_dir / n, stop_before_pixels=True)
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.SeriesInstanceUID != old.SeriesInstanceUID
        assert new.StudyInstanceUID == old.StudyInstanceUID
        assert new.get("FrameOfReferenceUID") == old.get("FrameOfReferenceUID")  # the map's; an SR has none


def test_an_enhanced_multiframe_input(batch, tmp_path):
    """The same series as one legacy-converted enhanced CT file (highdicom): the map's frames follow the file's
    frames, each at its own position, and equal the heat map there."""
    folder = batch["inputs"]["chest"]
    legacy = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, generate_uid(), 2, generate_uid(), 1)
    mf_folder = tmp_path / "enhanced"
    mf_folder.mkdir()
    enhanced.save_as(mf_folder / "volume.dcm")
    case_dir = tmp_path / "case"
    shutil.copytree(batch["out"] / "chest", case_dir)
    write_case_dicom(mf_folder, case_dir)
    pm = pydicom.dcmread(case_dir / HEATMAP_PM_NAME)
    assert pm.FrameOfReferenceUID == enhanced.FrameOfReferenceUID and int(pm.NumberOfFrames) == len(legacy)
    assert {s.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        enhanced.SOPInstanceUID
    }
    heat_img = nib.load(case_dir / "heatmap.nii.gz")
    heat, to_voxel = np.asarray(heat_img.dataobj), np.linalg.inv(heat_img.affine)
    pixels = pm.pixel_array / 65535.0  # the real-world value mapping's slope
    for k, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        index = to_voxel @ [*_lps(frame.PlanePositionSequence[0].ImagePositionPatient), 1.0]
        np.testing.assert_allclose(index[:2], 0.0, atol=1e-2)
        np.testing.assert_allclose(pixels[k], heat[:, :, int(np.rint(index[2]))].T, atol=1e-4)
    sr = hd.sr.srread(case_dir / SR_NAME)
    (series,) = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == [enhanced.SOPInstanceUID]


def test_a_map_off_the_input_grid_is_refused(batch, tmp_path):
    case_dir = tmp_path / "chest"
    shutil.copytree(batch["out"] / "chest", case_dir)
    img = nib.load(case_dir / "heatmap.nii.gz")
    shifted = img.affine.copy()
    shifted[:3, 3] += img.affine[:3, 2] * 0.5  # half a slice off
    write_nifti(case_dir / "heatmap.nii.gz", np.asarray(img.dataobj), shifted)
    with pytest.raises(ValueError, match="not on the input's grid"):
        write_case_dicom(batch["inputs"]["chest"], case_dir)
    assert not list(case_dir.glob("*.dcm"))  # no partial set (the SR was written before the map failed)


def test_volume_mode_writes_the_sr_with_the_volume_probability(tmp_path):
    from tests.inference.test_volume_mode import PATCH as VOLUME_PATCH
    from tests.inference.test_volume_mode import LinearNet

    folder = _series(tmp_path / "in" / "vol", "chest")
    runner = InferenceRunner(
        LinearNet(num_classes=2), patch_size=VOLUME_PATCH, pixdim=(2.0, 2.0, 2.0), margin=2, device="cpu",
        mode="volume", model_info=MODEL, progress=False,
    )  # fmt: skip
    out = tmp_path / "out"
    result = runner.run([str(folder)], out)
    assert write_batch_dicom([str(folder)], out, result) == []
    doc = json.loads((out / "vol" / "findings.json").read_text())
    assert doc["mode"] == "volume" and not doc["findings"]
    assert sorted(p.name for p in (out / "vol").glob("*.dcm")) == [SR_NAME]  # no heat map, no map
    sr = hd.sr.srread(out / "vol" / SR_NAME)
    assert sr.content.get_planar_roi_measurement_groups() == []
    (group,) = sr.content.get_image_measurement_groups()
    assert str(group.tracking_identifier) == "volume probability"
    (probability,) = group.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(doc["score"], abs=1e-9) and 0.0 < doc["score"] < 1.0
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == set(_instances(folder))


def test_the_command_line_writes_dicom_with_the_explanation(bundle, tmp_path):  # noqa: F811
    """``volcnn infer --dicom-out --explain 1`` through the bundle: SR, heat map and explanation maps for the
    series; a NIfTI input beside it gets none and the exit code stays 0."""
    from volcnn.cli import build_parser

    args = build_parser().parse_args(["infer", "--bundle", "b", "--out", "o", "--dicom-out", "x"])
    assert args.dicom_out is True
    series = _series(tmp_path / "in" / "ct", "chest")
    shape, aff = GEOMETRY["chest"]
    nifti = tmp_path / "in" / "plain.nii.gz"
    write_nifti(nifti, nodule_scan(shape, aff), aff)
    out = tmp_path / "out"
    settings = {**SMALL, "threshold": 0.0}  # an untrained network: report whatever peaks there are
    assert infer_main(bundle, out, [str(series), str(nifti)], explain=1, dicom_out=True, **settings) == 0
    case_dir = out / "ct"
    assert sorted(p.name for p in case_dir.glob("*.dcm")) == sorted([SR_NAME, HEATMAP_PM_NAME, EXPLAIN_PM_NAME])
    assert not list((out / "plain").glob("*.dcm"))
    doc = json.loads((case_dir / "findings.json").read_text())
    (explanation,) = doc["explanations"]
    img = nib.load(case_dir / explanation["nifti"])
    _check_map(
        case_dir / EXPLAIN_PM_NAME,
        _instances(series),
        {explanation["name"]: (np.asarray(img.dataobj, dtype=np.float32), np.linalg.inv(img.affine))},
        unit="1",
    )
    assert json.loads((out / "failures.json").read_text()) == []


def test_an_error_inside_highdicom_names_no_patient(batch, tmp_path, monkeypatch):
    """A library error quoting a header value is reported with the patient's identifiers blanked out."""
    import volcnn.inference.dicom_out as dicom_out

    def broken(*args, **kwargs):
        raise ValueError(f"value {PATIENT_NAME!r} / {PATIENT_ID} is invalid")

    monkeypatch.setattr(dicom_out, "write_parametric_map", broken)
    out = tmp_path / "out"
    shutil.copytree(batch["out"] / "chest", out / "chest")
    inputs = [str(batch["inputs"]["chest"])]
    (failure,) = write_batch_dicom(inputs, out, {"processed": [{"case": "chest"}], "failures": []})
    assert "ValueError" in failure["error"] and "<redacted>" in failure["error"]
    assert PATIENT_ID not in failure["error"] and "Synthetic" not in failure["error"]
    assert not list((out / "chest").glob("*.dcm"))
    assert json.loads((out / "failures.json").read_text()) == [failure]
