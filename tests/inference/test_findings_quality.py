"""Findings worth reading: calibrated probabilities, size-aware suppression, test-time flips, the volume score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.conftest import make_affine
from tests.inference import GEOMETRIES, BlobNet, nodule_scan
from volcnn.inference import HeatmapStrategy, InferenceRunner, find_peaks
from volcnn.io import write_nifti
from volcnn.models import Calibration, CalibrationError, read_calibration

PATCH = (12, 12, 12)


def _runner(**kwargs) -> InferenceRunner:
    options = {"patch_size": PATCH, "pixdim": (2.0, 2.0, 2.0), "device": "cpu", "progress": False, "stride_mm": 4.0}
    return InferenceRunner(BlobNet(PATCH), **{"model_info": {"sha256": "abc"}, **options, **kwargs})


@pytest.fixture
def scan(tmp_path):
    shape, aff = GEOMETRIES["ras"]
    path = tmp_path / "in" / "ras.nii.gz"
    write_nifti(path, nodule_scan(shape, aff), aff)
    return path


def test_calibration_maps_the_findings_and_the_heat_map(scan, tmp_path):
    """The same peaks as uncalibrated (a monotonic map), reported with calibrated probabilities; the threshold applies
    to calibrated values; the heat map file holds calibrated values; findings.json names the calibration."""
    import nibabel as nib

    plain = _runner(threshold=0.05)
    plain.run([str(scan)], tmp_path / "plain")
    cal = Calibration(a=0.5, b=-1.0)
    calibrated = _runner(threshold=0.05, calibration=cal.to_dict())
    calibrated.run([str(scan)], tmp_path / "cal")
    before = json.loads((tmp_path / "plain" / "ras" / "findings.json").read_text())
    after = json.loads((tmp_path / "cal" / "ras" / "findings.json").read_text())
    assert after["calibration"] == cal.to_dict() and after["settings"]["calibration"] == cal.to_dict()
    kept = [f for f in before["findings"] if cal.apply(np.float64(f["probability"])) >= 0.05]
    assert [f["center_ras_mm"] for f in after["findings"]] == [f["center_ras_mm"] for f in kept]
    for b, a in zip(kept, after["findings"], strict=True):
        assert a["probability_uncalibrated"] == b["probability"]
        assert a["probability"] == pytest.approx(float(cal.apply(np.float64(b["probability"]))), abs=1e-4)
    assert after["max_probability"] == pytest.approx(float(cal.apply(before["max_probability"])), abs=1e-3)
    mapped = nib.load(tmp_path / "cal" / "ras" / "heatmap.nii.gz").get_fdata()  # calibrated, then resampled
    assert mapped.max() <= after["max_probability"] + 1e-4 and mapped.max() > 0.5 * after["max_probability"]
    assert mapped.min() >= float(cal.apply(0.0)) - 1e-6  # even air maps to the calibrated value of 0


def test_calibration_files(tmp_path):
    cal = Calibration(a=2.0, b=0.5, num_cases=10, num_positive=3)
    cal.write(tmp_path / "calibration.json")
    assert read_calibration(tmp_path / "calibration.json") == cal
    assert read_calibration(tmp_path / "missing.json") is None and read_calibration(None) is None
    assert cal.invert(float(cal.apply(0.3))) == pytest.approx(0.3)
    (tmp_path / "bad.json").write_text('{"a": -1, "b": 0}')
    with pytest.raises(CalibrationError, match="bad.json.*positive"):
        read_calibration(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CalibrationError, match="broken.json"):
        read_calibration(tmp_path / "broken.json")


def _two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """A 20 mm blob with two local maxima 12 mm apart, and a small blob far away (2 mm grid)."""
    idx = np.indices((40, 30, 30)).astype(np.float64)
    big = np.exp(-(((idx[0] - 10) ** 2 + (idx[1] - 15) ** 2 + (idx[2] - 15) ** 2) / (2 * 5.0**2)))
    second = 0.97 * np.exp(-(((idx[0] - 16) ** 2 + (idx[1] - 15) ** 2 + (idx[2] - 15) ** 2) / (2 * 5.0**2)))
    small = 0.8 * np.exp(-(((idx[0] - 32) ** 2 + (idx[1] - 15) ** 2 + (idx[2] - 15) ** 2) / (2 * 1.0**2)))
    return np.maximum(np.maximum(big, second), small).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])


def test_size_aware_suppression_reports_a_large_blob_once_with_its_size():
    heat, aff = _two_blobs()
    fixed = find_peaks(heat, aff, threshold=0.5, min_distance_mm=10.0)
    sized = find_peaks(heat, aff, threshold=0.5, min_distance_mm=10.0, size_aware=True)
    assert len(fixed) == 3 and len(sized) == 2  # the secondary peak 12 mm off inside the big blob goes
    big, small = sized
    assert big["diameter_mm"] > 2 * small["diameter_mm"] and small["diameter_mm"] < 10.0
    assert "diameter_mm" not in fixed[0]


def _volume(shape=(30, 26, 22)) -> MetaTensor:
    g = torch.Generator().manual_seed(0)
    x = MetaTensor(torch.rand(1, *shape, generator=g))
    x.affine = torch.as_tensor(make_affine((2.0, 2.0, 2.0)), dtype=torch.float64)
    return x


class _Asymmetric(torch.nn.Module):
    """Logit 1: the window's mean minus its mean over the first half along x (a direction-sensitive response)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = 8.0 * (x.mean(dim=(1, 2, 3, 4)) - x[:, :, : x.shape[2] // 2].mean(dim=(1, 2, 3, 4)))
        return torch.stack([torch.zeros_like(d), d], dim=1)


def test_flips_average_the_mirrored_maps_on_the_same_grid():
    image = _volume()
    strategy = HeatmapStrategy(_Asymmetric(), (6, 6, 6), stride_mm=4.0, method="window", skip_air=False)
    single, aff, _ = strategy(image, "x")
    strategy.flips = True
    averaged, aff2, how = strategy(image, "x")
    np.testing.assert_array_equal(aff, aff2)
    assert how["flips"] == ["x", "y", "z"] and averaged.shape == single.shape
    assert not np.allclose(averaged, single)  # the network is not mirror-symmetric
    # the x-mirrored map, flipped back, averaged with the others by hand
    from volcnn.inference.heatmap_strategy import _extend_to_grid

    ext = _extend_to_grid(image, how["grid_step_vox"], single.shape)
    maps = [single]
    for axis in range(3):
        m = MetaTensor(torch.flip(ext, dims=[axis + 1]))
        m.affine = image.affine
        strategy.flips = False
        maps.append(np.flip(strategy(m, "x")[0], axis=axis))
    np.testing.assert_allclose(averaged, np.mean(maps, axis=0), atol=1e-6)


def test_the_volume_score_is_the_noisy_or_of_calibrated_findings(scan, tmp_path):
    runner = _runner(threshold=0.05, score="noisy_or", calibration={"a": 1.0, "b": -2.0})
    runner.run([str(scan)], tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "ras" / "findings.json").read_text())
    top = [f["probability"] for f in doc["findings"]][:5]
    assert doc["score_method"] == "noisy_or"
    assert doc["score"] == pytest.approx(1 - np.prod([1 - p for p in top]), abs=2e-3)


def test_an_ensemble_gets_a_dense_heat_map_equal_to_its_windows():
    """An ensemble of splittable networks is mapped densely, member by member, and its map (the mean of the members'
    probabilities) equals window-by-window evaluation of the ensemble itself."""
    from volcnn.networks import create_network

    torch.manual_seed(0)
    net = create_network("valid_cnn3d", spatial_size=(32, 32, 32), ensemble=2).eval()
    with torch.no_grad():  # spread the untrained members' probabilities away from 0.5
        for layer in (m for m in net.modules() if isinstance(m, torch.nn.Linear)):
            layer.weight.mul_(200.0)
    g = torch.Generator().manual_seed(1)
    image = MetaTensor(torch.rand(1, 38, 36, 34, generator=g))
    image.affine = torch.as_tensor(make_affine((1.0, 1.0, 1.0)), dtype=torch.float64)
    dense = HeatmapStrategy(net, (32, 32, 32), stride_mm=8.0, method="dense", skip_air=False, dense_check_points=0)
    assert len(dense.dense_parts) == 2
    heat, aff, how = dense(image, "x")
    window = HeatmapStrategy(net, (32, 32, 32), stride_mm=8.0, method="window", skip_air=False)
    ref, ref_aff, ref_how = window(image, "x")
    assert how["method"] == "dense" and ref_how["method"] == "window"
    np.testing.assert_array_equal(aff, ref_aff)
    assert np.ptp(ref) > 0.05
    np.testing.assert_allclose(heat, ref, atol=1e-5, rtol=0)
