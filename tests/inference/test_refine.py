"""Findings refined to the classifier's local maximum (``volcnn.inference.refine``): they move to the nodule a coarse
grid only came near, report the best window's probability, merge when they meet, average flips with TTA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.inference import GEOMETRIES, NODULE_RAS, BlobNet, nodule_scan
from volcnn.core.geometry import voxel_to_world
from volcnn.inference import InferenceRunner, window_probabilities
from volcnn.inference.refine import FlipMean, refine_findings, refinement_steps
from volcnn.io import write_nifti

PATCH = (12, 12, 12)


def _blob_image(centre: tuple[int, int, int], shape=(40, 40, 40), spacing=1.0) -> MetaTensor:
    """A preprocessed volume: background 0.14 (lung), a bright 3-voxel blob at ``centre``; ``spacing`` mm voxels."""
    idx = np.indices(shape).astype(np.float64)
    d2 = sum((idx[a] - centre[a]) ** 2 for a in range(3))
    arr = (0.14 + 0.7 * np.exp(-d2 / (2 * 1.5**2))).astype(np.float32)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-20.0, 5.0, 30.0]
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(affine))


def test_steps_in_voxels():
    assert [s.tolist() for s in refinement_steps(2.0, (1.0, 1.0, 1.0))] == [[2, 2, 2], [1, 1, 1]]
    assert [s.tolist() for s in refinement_steps(2.0, (1.0, 1.0, 2.0))] == [[2, 2, 1], [1, 1, 0]]
    assert [s.tolist() for s in refinement_steps(4.0, (2.0, 2.0, 2.0))] == [[2, 2, 2], [1, 1, 1]]
    assert refinement_steps(0.0, (1.0, 1.0, 1.0)) == [] and refinement_steps(0.4, (1.0, 1.0, 1.0)) == []
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="refine_mm"):
            refinement_steps(bad, (1.0, 1.0, 1.0))


def test_a_finding_next_to_the_nodule_moves_onto_it():
    """Started 3 voxels off on two axes, the search (2 then 1 voxel) reaches the blob's centre voxel and reports the
    centre window's probability, higher than its start's."""
    image, net = _blob_image((20, 21, 19)), BlobNet(PATCH)
    centre = voxel_to_world(image.affine.numpy(), np.array([[20.0, 21.0, 19.0]]))[0]
    start = voxel_to_world(image.affine.numpy(), np.array([[23.0, 21.0, 16.0]]))[0]
    p_start, p_centre = window_probabilities(image, net, np.array([[23, 21, 16], [20, 21, 19]]), PATCH)
    finding = {"center_ras_mm": start.tolist(), "probability": float(p_start), "diameter_mm": 6.0}
    steps = refinement_steps(2.0, (1.0, 1.0, 1.0))
    (refined,) = refine_findings(image, net, [finding], PATCH, steps, min_distance_mm=10.0)
    assert refined["center_ras_mm"] == pytest.approx(centre.tolist(), abs=0.01)
    assert refined["probability"] == pytest.approx(float(p_centre), abs=1e-4) and p_centre > p_start + 0.1
    assert refined["refine_shift_mm"] == pytest.approx(math.dist(start, centre), abs=0.01)
    assert refined["diameter_mm"] == 6.0  # other keys kept
    assert refine_findings(image, net, [finding], PATCH, [], min_distance_mm=10.0) == [finding]  # no steps: as is


def test_a_finding_on_a_flat_top_stays_at_its_centre():
    """A large nodule saturates the classifier: every window within 2 voxels of its centre gives p > 0.98, and a
    faint intensity ramp along x makes a window 2 voxels off the most probable. The finding stays at the top's centre
    (the lattice's centroid, within half a voxel) instead of following the ramp, and reports the best window's
    probability."""
    idx = np.indices((40, 40, 40)).astype(np.float64)
    d2 = sum((idx[a] - c) ** 2 for a, c in enumerate((20, 21, 19)))
    arr = np.where(d2 <= 5.0**2, 0.84, 0.14).astype(np.float32)
    arr += 0.05 * (idx[0] - 20).astype(np.float32)  # the ramp
    image = MetaTensor(torch.from_numpy(arr)[None], affine=torch.eye(4, dtype=torch.float64))
    net = BlobNet(PATCH, gain=20.0)
    lattice = np.array([[20 + i, 21 + j, 19 + k] for i in (-2, 0, 2) for j in (-2, 0, 2) for k in (-2, 0, 2)])
    p = window_probabilities(image, net, lattice, PATCH)
    assert p.min() > 0.98 and lattice[int(np.argmax(p))].tolist() == [22, 21, 19]  # a flat top, its maximum off
    finding = {"center_ras_mm": [20.0, 21.0, 19.0], "probability": float(p[13])}
    (refined,) = refine_findings(image, net, [finding], PATCH, refinement_steps(2.0, (1, 1, 1)), min_distance_mm=5.0)
    assert math.dist(refined["center_ras_mm"], [20.0, 21.0, 19.0]) < 0.5
    assert refined["probability"] >= float(p.max()) - 1e-4  # the best window searched


def test_findings_that_meet_are_one():
    """Two findings on either side of one blob both reach it: the less probable is dropped; a far one stays."""
    image, net = _blob_image((20, 20, 20)), BlobNet(PATCH)
    starts = np.array([[22.0, 20.0, 20.0], [18.0, 21.0, 20.0], [5.0, 5.0, 5.0]])
    world = voxel_to_world(image.affine.numpy(), starts)
    p = window_probabilities(image, net, starts.astype(int), PATCH)
    findings = [{"center_ras_mm": w.tolist(), "probability": float(q)} for w, q in zip(world, p, strict=True)]
    refined = refine_findings(image, net, findings, PATCH, refinement_steps(2.0, (1, 1, 1)), min_distance_mm=5.0)
    assert len(refined) == 2 and refined[0]["probability"] > refined[1]["probability"]
    assert refined[1]["center_ras_mm"] != refined[0]["center_ras_mm"]


def test_flip_mean_is_the_mean_of_the_mirrored_patches():
    torch.manual_seed(0)
    x = torch.rand(3, 1, *PATCH)
    net = BlobNet(PATCH, sigma=1.0)
    net.weights[6, 7, 4] *= 5  # an asymmetric detector: flips change its answer
    views = [x, x.flip(2), x.flip(3), x.flip(4)]
    expected = torch.stack([torch.softmax(net(v), 1) for v in views]).mean(0)
    assert torch.allclose(torch.softmax(FlipMean(net)(x), 1), expected, atol=1e-6)
    assert not torch.allclose(expected, torch.softmax(net(x), 1), atol=1e-3)


def test_runner_refines_findings_onto_the_planted_nodule(tmp_path):
    """On an 8 mm grid the nearest grid point lies up to 4 mm per axis from the planted nodule; the finding (its
    peak's centroid, then refined) sits within 1.5 mm of it, refined at least as probable; the settings record
    refine_mm."""
    shape, aff = GEOMETRIES["ras"]
    path = tmp_path / "in" / "ras.nii.gz"
    write_nifti(path, nodule_scan(shape, aff), aff)
    docs = {}
    for refine in (0.0, 2.0):
        runner = InferenceRunner(
            BlobNet(PATCH), patch_size=PATCH, pixdim=(1.0, 1.0, 1.0), device="cpu", progress=False, stride_mm=8.0,
            threshold=0.05, model_info={"sha256": "abc"}, refine_mm=refine,
        )  # fmt: skip
        runner.run([str(path)], tmp_path / f"r{refine}")
        docs[refine] = json.loads((tmp_path / f"r{refine}" / "ras" / "findings.json").read_text())
    grid, refined = docs[0.0]["findings"][0], docs[2.0]["findings"][0]
    assert docs[2.0]["settings"]["refine_mm"] == 2.0 and "refine_shift_mm" not in grid
    assert (
        math.dist(refined["center_ras_mm"], NODULE_RAS) <= 1.5 and math.dist(grid["center_ras_mm"], NODULE_RAS) <= 1.5
    )
    assert refined["probability"] >= grid["probability"] - 1e-4 and "refine_shift_mm" in refined


def test_a_peak_below_the_threshold_that_refines_above_it_is_reported(tmp_path):
    """The threshold applies to refined probabilities: with it between the grid peak's probability and the refined
    one (and above half the grid's), the grid alone reports nothing and the refined run reports the nodule."""
    shape, aff = GEOMETRIES["ras"]
    path = tmp_path / "in" / "ras.nii.gz"
    write_nifti(path, nodule_scan(shape, aff), aff)

    def run(refine: float, threshold: float, name: str) -> dict:
        runner = InferenceRunner(
            BlobNet(PATCH), patch_size=PATCH, pixdim=(1.0, 1.0, 1.0), device="cpu", progress=False, stride_mm=8.0,
            threshold=threshold, model_info={"sha256": "abc"}, refine_mm=refine,
        )  # fmt: skip
        runner.run([str(path)], tmp_path / name)
        return json.loads((tmp_path / name / "ras" / "findings.json").read_text())

    grid = run(0.0, 0.01, "grid")["findings"][0]["probability"]
    best = run(2.0, 0.01, "best")["findings"][0]["probability"]
    threshold = 0.5 * (grid + best)
    assert grid < threshold < best and grid >= 0.5 * threshold
    assert run(0.0, threshold, "grid_cut")["findings"] == []
    (found,) = run(2.0, threshold, "refined_cut")["findings"]
    assert found["probability"] == best and math.dist(found["center_ras_mm"], NODULE_RAS) <= 1.5
