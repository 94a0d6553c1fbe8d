"""pipelines.bench_preprocess measures both sides in fresh processes and reports comparable work."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines import bench_preprocess as bench


def _tiny_ct(path: Path) -> Path:
    """40x40x30 int16 at 0.7x0.7x1.5 mm (RAS), a smooth HU ramp with a bright ball: what both sides resample."""
    i, j, k = np.meshgrid(np.arange(40), np.arange(40), np.arange(30), indexing="ij")
    hu = -1000.0 + 25.0 * i + 10.0 * k
    hu[(i - 20) ** 2 + (j - 18) ** 2 + ((k - 15) * 2) ** 2 < 64] = 300.0
    affine = np.diag([0.7, 0.7, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, -20.0)
    img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


BALLAST_MB = 256


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = _tiny_ct(tmp_path_factory.mktemp("bench_preprocess") / "ct.nii.gz")
    # the parent holds a few hundred MB, as the benchmark does after synthesising the CT: Linux hands a child's
    # ru_maxrss the parent's size through fork and exec, which must not leak into the children's numbers
    ballast = np.ones(BALLAST_MB * 2**20, dtype=np.uint8)
    out = bench.run(path, repeats=1)
    del ballast
    return out


def test_result_structure_and_ratio(result):
    for side in ("ours", "sitk"):
        runs = result[f"{side}_runs"]
        assert len(runs) == 1 and all(0 < t < 60 for t in runs)
        assert result[f"{side}_s"] == runs[0]
        assert result[f"{side}_baseline_rss_mb"] > 0
        assert result[f"{side}_peak_rss_mb"] >= result[f"{side}_baseline_rss_mb"]
        assert result[f"{side}_extra_rss_mb"] == pytest.approx(
            result[f"{side}_peak_rss_mb"] - result[f"{side}_baseline_rss_mb"]
        )
        assert result[f"{side}_dtype"] == "float32"
    assert result["preprocess_time_ratio_vs_sitk"] == pytest.approx(result["ours_s"] / result["sitk_s"])
    assert result["ours_baseline_rss_mb"] > result["sitk_baseline_rss_mb"]  # torch + MONAI vs SimpleITK alone
    assert result["sitk_peak_rss_mb"] < BALLAST_MB  # the child's own memory, not the parent's
    assert result["torch_threads"] >= 1 and result["sitk_threads"] >= 1
    assert result["repeats"] == 1


def test_both_sides_did_the_same_work(result):
    # axis-aligned: 39 x 0.7 = 27.3 mm between the first and last voxel centres -> 28 voxels at 1 mm,
    # 29 x 1.5 = 43.5 mm -> 44 (44.5 rounded half to even, as MONAI's Spacing rounds it)
    assert result["ours_shape"] == result["sitk_shape"] == [28, 28, 44]
    assert 0.05 < result["ours_mean"] < 0.95
    # the same grid inside the input, the same trilinear interpolation and window: the same mean to rounding
    assert result["ours_mean"] == pytest.approx(result["sitk_mean"], abs=1e-4)


def test_volume_is_described_without_the_path(result):
    v = result["volume"]
    assert v["shape"] == [40, 40, 30] and v["dtype"] == "int16" and v["format"] == ".nii.gz"
    assert v["spacing_mm"] == pytest.approx([0.7, 0.7, 1.5])
    assert v["orientation"] == "RAS"
    assert "ct.nii.gz" not in repr(result)


def test_table_and_json(result, tmp_path):
    text = bench.table(result)
    assert "SimpleITK" in text and "volcnn" in text and "28x28x44" in text
    assert f"{result['preprocess_time_ratio_vs_sitk']:.3f}" in text
    import json

    assert json.loads(json.dumps(result)) == result
    assert all(math.isfinite(result[k]) for k in ("ours_s", "sitk_s", "preprocess_time_ratio_vs_sitk"))


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        bench.run(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="repeats"):
        bench.run(_tiny_ct(tmp_path / "ct.nii.gz"), repeats=0)


def test_a_failing_child_is_an_error_naming_the_side(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(RuntimeError, match="child 'ours' failed"):
        bench.run(bad, repeats=1)
