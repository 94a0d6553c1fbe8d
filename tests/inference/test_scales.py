"""Multi-scale heat maps (``volcnn.inference.scales``): a nodule larger than the classifier's window is found at a
coarser scale, the scales' findings merge by non-maximum suppression, and the maps fuse by their maximum."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import blob_volume, make_affine
from volcnn.inference import InferenceRunner
from volcnn.inference.scales import check_scales, fuse_heatmaps, merge_findings
from volcnn.io import write_nifti

PATCH = (12, 12, 12)
CENTRE_RAS = (31.3, 28.6, 30.2)
RADIUS_MM = 10.0


class SmallBlobNet(nn.Module):
    """A detector of blobs smaller than its window: logit 1 = ``gain * (centre mean - rim mean - 0.45)``, the centre a
    Gaussian of 2 voxels around voxel ``size // 2``, the rim the voxels more than 5.5 voxels from it. A blob that fills
    the whole window (rim as bright as the centre) scores low, as a classifier trained on small nodules does."""

    def __init__(self, patch_size=PATCH, gain: float = 40.0):
        super().__init__()
        centre = torch.tensor([p // 2 for p in patch_size], dtype=torch.float32)
        axes = [torch.arange(p, dtype=torch.float32) for p in patch_size]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        d2 = ((grid - centre) ** 2).sum(-1)
        w = torch.exp(-d2 / 8.0)
        self.register_buffer("centre_w", w / w.sum())
        rim = (d2 > 5.5**2).float()
        self.register_buffer("rim_w", rim / rim.sum())
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = (x[:, 0] * self.centre_w).flatten(1).sum(1)
        r = (x[:, 0] * self.rim_w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(c), self.gain * (c - r - 0.45)], dim=1)


@pytest.fixture(scope="module")
def large_nodule(tmp_path_factory):
    """A CT of 1 mm voxels with one 20 mm nodule (+50 HU in lung at -800 HU)."""
    folder = tmp_path_factory.mktemp("scales")
    affine = make_affine((1.0, 1.0, 1.0))
    arr = blob_volume((64, 60, 60), affine, CENTRE_RAS, radius_mm=RADIUS_MM, background=-800.0, value=50.0)
    path = folder / "big.nii.gz"
    write_nifti(path, arr, affine)
    return path


def _run(path, out, scales):
    runner = InferenceRunner(
        SmallBlobNet(), patch_size=PATCH, stride_mm=2.0, threshold=0.5, method="window", progress=False,
        min_distance_mm=6.0, scales=scales, device="cpu", skip_air=False,
    )  # fmt: skip
    runner.run([path], out)
    return json.loads((out / "big" / "findings.json").read_text())


def test_a_nodule_larger_than_the_window_is_found_at_a_coarser_scale(large_nodule, tmp_path):
    """At 1 mm the 12 mm window sits inside the 20 mm nodule and scores it below 0.5: no finding. With scales
    [1, 2] the 2 mm image shows it whole: one finding within its radius, from scale 2, and the heat map peaks there."""
    single = _run(large_nodule, tmp_path / "one", [1.0])
    assert not any(math.dist(f["center_ras_mm"], CENTRE_RAS) <= RADIUS_MM for f in single["findings"])
    multi = _run(large_nodule, tmp_path / "two", [1.0, 2.0])
    near = [f for f in multi["findings"] if math.dist(f["center_ras_mm"], CENTRE_RAS) <= RADIUS_MM]
    assert len(near) == 1 and near[0]["scale"] == 2.0 and near[0]["probability"] > 0.9
    assert multi["max_probability"] > 0.9 > single["max_probability"]
    assert multi["settings"]["scales"] == [1.0, 2.0] and [s["scale"] for s in multi["heatmap"]["scales"]] == [1.0, 2.0]


@pytest.mark.parametrize("bad", [[], [2.0], [1.0, 1.0], [1.0, 3.0, 2.0], [1.0, math.inf], ["x"], [0.5, 1.0]], ids=str)
def test_scales_refused(bad):
    with pytest.raises(ValueError, match="scales"):
        check_scales(bad)


def test_scales_accepted():
    assert check_scales(None) == (1.0,) and check_scales([1, 1.6]) == (1.0, 1.6) and check_scales(1.0) == (1.0,)


def _f(p, x, d=0.0):
    return {"center_ras_mm": [x, 0.0, 0.0], "probability": p, "diameter_mm": d}


def test_merge_keeps_the_most_probable_of_close_findings():
    fine = [_f(0.9, 0.0), _f(0.4, 30.0)]
    coarse = [_f(0.95, 4.0), _f(0.6, 31.0), _f(0.3, 60.0)]
    merged = merge_findings([fine, coarse], min_distance_mm=10.0, max_findings=10)
    assert [(f["probability"], f["center_ras_mm"][0]) for f in merged] == [(0.95, 4.0), (0.6, 31.0), (0.3, 60.0)]
    assert len(merge_findings([fine, coarse], min_distance_mm=10.0, max_findings=2)) == 2


def test_merge_suppresses_within_a_large_findings_radius():
    """A 30 mm finding suppresses a weaker one 12 mm away although min_distance_mm is 10; a 4 mm one does not."""
    assert len(merge_findings([[_f(0.9, 0.0, 30.0)], [_f(0.5, 12.0)]], 10.0, 10)) == 1
    assert len(merge_findings([[_f(0.9, 0.0, 4.0)], [_f(0.5, 12.0)]], 10.0, 10)) == 2


def test_merge_ties_keep_the_finer_scale():
    merged = merge_findings([[dict(_f(0.5, 0.0), scale=1.0)], [dict(_f(0.5, 1.0), scale=2.0)]], 10.0, 10)
    assert [f["scale"] for f in merged] == [1.0]


def test_fused_map_is_the_maximum_on_the_fine_grid():
    """A coarse map's hot cell shows up at its world position on the fine grid; elsewhere the fine map wins."""
    fine = np.full((8, 8, 8), 0.2, dtype=np.float32)
    coarse = np.zeros((4, 4, 4), dtype=np.float32)
    coarse[2, 1, 1] = 1.0
    fine_affine, coarse_affine = np.eye(4), np.diag([2.0, 2.0, 2.0, 1.0])
    fused = fuse_heatmaps([(fine, fine_affine), (coarse, coarse_affine)])
    assert fused.shape == fine.shape and fused[4, 2, 2] == pytest.approx(1.0)
    assert fused[0, 7, 7] == pytest.approx(0.2) and fused.min() >= 0.2
