"""Findings placed on the image's blob (``volcnn.inference.localize``): a finding pulled off a nodule attached to a
vessel moves back onto the nodule's centre; vessels alone and flat lung do not attract it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from tests.inference import GEOMETRIES, NODULE_RAS, BlobNet, nodule_scan
from volcnn.core.geometry import voxel_to_world
from volcnn.inference import InferenceRunner
from volcnn.inference.localize import SIGMAS_MM, blobness, snap_findings
from volcnn.io import write_nifti

LUNG, SOLID = 0.14, 0.75


def _image(shape=(48, 48, 48), nodule=(24, 24, 24), nodule_r=4.0, vessel_r=1.5, spacing=1.0) -> MetaTensor:
    """Lung with a vessel along axis 0 at (y, z) = (24, 20) and, optionally, a sphere touching it (``nodule``),
    blurred by 0.7 voxels as a scanner blurs edges."""
    idx = np.indices(shape).astype(np.float64)
    arr = np.full(shape, LUNG, dtype=np.float32)
    if vessel_r:
        arr[(idx[1] - 24) ** 2 + (idx[2] - 20) ** 2 <= vessel_r**2] = SOLID
    if nodule is not None:
        arr[sum((idx[a] - nodule[a]) ** 2 for a in range(3)) <= nodule_r**2] = SOLID
    arr = ndimage.gaussian_filter(arr, 0.7)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(affine))


def _world(image, voxel):
    return voxel_to_world(image.affine.numpy(), np.asarray([voxel], dtype=np.float64))[0].tolist()


def test_blob_responds_to_a_sphere_more_than_to_a_vessel():
    image = _image()
    response = blobness(image[0].numpy(), [[s, s, s] for s in SIGMAS_MM])
    peak = np.unravel_index(np.argmax(response), response.shape)
    assert math.dist(peak, (24, 24, 24)) <= 1.0
    vessel_only = blobness(_image(nodule=None)[0].numpy(), [[s, s, s] for s in SIGMAS_MM])
    assert vessel_only[10:38, 22:27, 18:23].max() < 0.5 * response.max()


def test_a_finding_off_a_juxtavascular_nodule_moves_onto_it():
    """A finding 2.8 mm off the nodule's centre, towards the vessel it touches, moves to within 1 mm of the centre;
    its probability and other keys stay."""
    image = _image()
    start = _world(image, (24, 24, 21.2))
    finding = {"center_ras_mm": start, "probability": 0.3, "diameter_mm": 8.0}
    (moved,) = snap_findings(image, [finding], 3.0, min_distance_mm=10.0)
    assert math.dist(moved["center_ras_mm"], _world(image, (24, 24, 24))) <= 1.0
    assert moved["snap_shift_mm"] == pytest.approx(math.dist(moved["center_ras_mm"], start), abs=0.02)
    assert moved["probability"] == 0.3 and moved["diameter_mm"] == 8.0


def test_anisotropic_voxels_are_measured_in_mm():
    """With 2 mm voxels the same nodule (4 voxels = 8 mm radius) is reached from 4 mm away within 5 mm, not from
    4 voxels = 8 mm."""
    image = _image(spacing=2.0, nodule_r=3.0)
    near = {"center_ras_mm": _world(image, (24, 24, 22)), "probability": 0.5}
    (moved,) = snap_findings(image, [near], 5.0, min_distance_mm=10.0)
    assert math.dist(moved["center_ras_mm"], _world(image, (24, 24, 24))) <= 2.0
    far = {"center_ras_mm": _world(image, (24, 24, 32)), "probability": 0.5}  # 16 mm away, in plain lung
    (stayed,) = snap_findings(image, [far], 5.0, min_distance_mm=10.0)
    assert math.dist(stayed["center_ras_mm"], far["center_ras_mm"]) <= 5.0


def test_nothing_in_reach_leaves_a_finding_where_it_is():
    image = _image(nodule=None, vessel_r=0.0)  # flat lung
    finding = {"center_ras_mm": _world(image, (20, 20, 20)), "probability": 0.2}
    (same,) = snap_findings(image, [finding], 3.0, min_distance_mm=10.0)
    assert same["center_ras_mm"] == finding["center_ras_mm"] and same["snap_shift_mm"] == 0.0
    assert snap_findings(image, [finding], 0.0, min_distance_mm=10.0) == [finding]  # off


def test_findings_that_land_on_one_blob_are_one():
    image = _image()
    a = {"center_ras_mm": _world(image, (24, 24, 22)), "probability": 0.6}
    b = {"center_ras_mm": _world(image, (24, 26, 25)), "probability": 0.4}
    kept = snap_findings(image, [a, b], 3.0, min_distance_mm=5.0)
    assert [f["probability"] for f in kept] == [0.6]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_snap_distance_refused(bad):
    with pytest.raises(ValueError, match="snap_mm"):
        snap_findings(_image(), [{"center_ras_mm": [0.0, 0.0, 0.0], "probability": 0.5}], bad, min_distance_mm=5.0)


class _OffCentreNet(BlobNet):
    """:class:`BlobNet` looking 2 voxels off its window's centre along axis 0: its heat map peaks 2 mm from a nodule,
    as a classifier's does next to a vessel."""

    def __init__(self, patch_size):
        super().__init__(patch_size)
        self.weights = torch.roll(self.weights, shifts=2, dims=0)


def test_the_runner_puts_findings_on_the_blob(tmp_path):
    """Through :class:`InferenceRunner` (an LPS input, 1 mm preprocessing): without ``snap_mm`` the off-centre
    classifier's finding lies about 2 mm from the nodule, with ``snap_mm=3`` within 1 mm, and ``findings.json`` says
    how far it moved."""
    shape, affine = GEOMETRIES["lps"]
    path = tmp_path / "scan.nii.gz"
    write_nifti(path, nodule_scan(shape, affine), affine)
    docs = {}
    for snap in (0.0, 3.0):
        runner = InferenceRunner(
            _OffCentreNet((12, 12, 12)), patch_size=(12, 12, 12), stride_mm=2.0, threshold=0.5, method="window",
            device="cpu", progress=False, snap_mm=snap,
        )  # fmt: skip
        runner.run([path], tmp_path / f"snap{snap:g}")
        docs[snap] = json.loads((tmp_path / f"snap{snap:g}" / "scan" / "findings.json").read_text())
    (before,), (after,) = docs[0.0]["findings"], docs[3.0]["findings"]
    assert math.dist(before["center_ras_mm"], NODULE_RAS) > 1.5
    assert math.dist(after["center_ras_mm"], NODULE_RAS) <= 1.0
    assert after["snap_shift_mm"] == pytest.approx(math.dist(after["center_ras_mm"], before["center_ras_mm"]), abs=0.05)
    assert docs[3.0]["settings"]["snap_mm"] == 3.0
