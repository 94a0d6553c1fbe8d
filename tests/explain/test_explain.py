"""Explanations of findings: saliency peaks at the evidence, lands on the input's grid in any orientation, PNG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from monai.data import MetaTensor
from torch import nn

from tests.conftest import make_affine
from volcnn.core.geometry import translate
from volcnn.explain import (
    EXPLAIN_METHODS,
    Explainer,
    candidate_layers,
    crop_patch,
    default_target_layer,
    explain_finding,
    explain_findings,
    paste_to_grid,
    to_ras,
)
from volcnn.inference import iter_window_batches
from volcnn.io import load_volume, write_nifti
from volcnn.networks import create_network
from volcnn.transforms import WorldPatchCrop, voxel_to_world

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: the evidence: a bright Gaussian blob, deliberately off every voxel grid
BLOB_RAS = np.array([10.3, -15.2, 20.6])
#: the finding explained, off the blob so that a peak at the patch centre would fail the tests
FINDING_RAS = BLOB_RAS + np.array([6.0, -4.0, 4.0])
PATCH = (16, 16, 16)
PIXDIM = (2.0, 2.0, 2.0)
SETTINGS = {"patch_size": PATCH, "pixdim": PIXDIM, "hu_window": (-1000.0, 400.0), "class_index": 1}
#: a couple of preprocessed voxels
TOL_MM = 4.5

GEOMETRIES = {
    "ras": ((40, 40, 30), make_affine((1.5, 1.5, 2.0), origin=(-20.0, -45.0, -10.0))),
    "lps": ((40, 40, 30), make_affine((1.5, 1.5, 2.0), (-1, -1, 1), origin=(40.0, 15.0, -10.0))),
    "permuted": ((30, 40, 40), make_affine((2.0, 1.5, 1.5), (1, -1, -1), origin=(40.0, 15.0, -10.0), perm=(2, 0, 1))),
}


class EvidenceNet(nn.Module):
    """Logit 1 = ``gain * (mean(relu(box5(x) - 0.3)) - offset)``, logit 0 = 0: the evidence for class 1 is bright
    tissue anywhere in the patch (the blob), so every explanation must peak on it. ``features.0`` is a stride-2
    5^3 box filter, so Grad-CAM is upsampled from a 8^3 grid."""

    def __init__(self, gain: float = 200.0, offset: float = 0.0) -> None:
        super().__init__()
        conv = nn.Conv3d(1, 1, kernel_size=5, stride=2, padding=2)
        with torch.no_grad():
            conv.weight.fill_(1.0 / 125.0)
            conv.bias.fill_(-0.3)
        self.features = nn.Sequential(conv, nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0], [gain]]))
            self.fc.bias.copy_(torch.tensor([0.0, -gain * offset]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def gaussian_blob_scan(shape, affine, center=BLOB_RAS, sigma_mm=3.0, background=-800.0, peak=100.0) -> np.ndarray:
    """int16 HU: lung with one Gaussian-profile nodule at ``center`` (world RAS mm)."""
    idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    d2 = ((voxel_to_world(affine, idx) - center) ** 2).sum(axis=1).reshape(shape)
    return (background + (peak - background) * np.exp(-d2 / (2 * sigma_mm**2))).astype(np.int16)


def _preprocessed(shape, affine) -> MetaTensor:
    from volcnn.io import Volume
    from volcnn.transforms import preprocess_volume

    vol = Volume(gaussian_blob_scan(shape, affine).astype(np.float32), affine, "synthetic", "nifti")
    return preprocess_volume(vol, PIXDIM, SETTINGS["hu_window"])


@pytest.fixture(scope="module")
def net() -> EvidenceNet:
    return EvidenceNet().eval()


@pytest.fixture(scope="module")
def image() -> MetaTensor:
    return _preprocessed(*GEOMETRIES["ras"])


def _peak_world(saliency: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return voxel_to_world(affine, np.unravel_index(int(np.argmax(saliency)), saliency.shape))


@pytest.mark.parametrize("method", EXPLAIN_METHODS)
def test_saliency_peaks_at_the_evidence_not_the_patch_centre(net, image, method):
    kwargs = {"mask_size": 4} if method == "occlusion" else {}
    saliency, patch_affine = explain_finding(image, net, PATCH, FINDING_RAS, method=method, **kwargs)
    assert saliency.shape == PATCH and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() == pytest.approx(1.0)
    peak = _peak_world(saliency, patch_affine)
    assert np.linalg.norm(peak - BLOB_RAS) < TOL_MM, (method, peak)
    assert np.linalg.norm(peak - FINDING_RAS) > 6.0
    # the patch is centred on the finding as inference windows are: voxel size // 2 is the nearest voxel
    centre = voxel_to_world(patch_affine, np.asarray(PATCH) // 2)
    assert np.all(np.abs(centre - FINDING_RAS) <= np.asarray(PIXDIM) / 2 + 1e-6)


def test_explanation_reports_the_patch_probability_and_layer(net, image):
    e = explain_finding(image, net, PATCH, FINDING_RAS)
    patch, _ = crop_patch(image, FINDING_RAS, PATCH)
    with torch.no_grad():
        p = torch.softmax(net(patch[None]), dim=1)[0, 1].item()
    assert e.probability == pytest.approx(p, abs=1e-5)
    assert e.target_layer == "features.0" and e.method == "gradcam" and e.class_index == 1


def test_network_is_left_untouched(net, image):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.inference_mode():  # gradients are switched back on inside
        explain_finding(image, net, PATCH, FINDING_RAS, target_layer="features.1")
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())
    assert net.features[1].inplace is True  # MONAI switches it off on the explainer's copy only
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_nifti_on_the_input_grid_and_png(net, geometry, tmp_path):
    shape, affine = GEOMETRIES[geometry]
    path = tmp_path / f"{geometry}.nii.gz"
    write_nifti(path, gaussian_blob_scan(shape, affine), affine)
    findings = [
        {"center_ras_mm": (BLOB_RAS + 30.0).tolist(), "probability": 0.4},  # not among the top one
        {"center_ras_mm": FINDING_RAS.tolist(), "probability": 0.93},
    ]
    out = tmp_path / "out"
    results = explain_findings(str(path), net, SETTINGS, findings, out, top=1)

    assert len(results) == 1
    r = results[0]
    assert (r["rank"], r["name"], r["method"], r["probability"]) == (2, "finding02", "gradcam", 0.93)
    assert r["nifti"] == "finding02_gradcam.nii.gz" and r["png"] == "finding02_gradcam.png"
    assert sorted(p.name for p in out.iterdir()) == ["finding02_gradcam.nii.gz", "finding02_gradcam.png"]

    img = nib.load(out / r["nifti"])
    src = load_volume(path)
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    sal = np.asarray(img.dataobj, dtype=np.float32)
    # the patch map peaks at 1 on one voxel (a feature cell's centre, volcnn.explain.cell_geometry); the input's
    # 1.5-2 mm voxels sample it up to 0.75-1 mm off that peak
    assert sal.min() >= 0.0 and 0.8 <= sal.max() <= 1.0 + 1e-6
    peak = _peak_world(sal, img.affine)
    assert np.linalg.norm(peak - BLOB_RAS) < TOL_MM, (geometry, peak)
    # zero outside the patch (16 voxels of 2 mm around the finding) beyond one patch voxel of its edge
    world = voxel_to_world(img.affine, np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)
    outside = np.abs(world - FINDING_RAS).max(axis=-1) > PATCH[0] / 2 * PIXDIM[0] + 2 * PIXDIM[0]
    assert outside.any() and not sal[outside].any()

    png = (out / r["png"]).read_bytes()
    assert png[:8] == PNG_SIGNATURE
    pixels = imread(out / r["png"])
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 600 and pixels.std() > 0.05


def test_occlusion_through_explain_findings(net, tmp_path):
    shape, affine = GEOMETRIES["lps"]
    path = tmp_path / "lps.nii.gz"
    write_nifti(path, gaussian_blob_scan(shape, affine), affine)
    (r,) = explain_findings(path, net, SETTINGS, [{"center_ras_mm": FINDING_RAS.tolist()}], tmp_path, 3, "occlusion")
    assert r["target_layer"] is None and r["probability"] is None and 0.5 < r["patch_probability"] <= 1.0
    img = nib.load(tmp_path / r["nifti"])
    assert img.shape == shape
    assert np.linalg.norm(_peak_world(np.asarray(img.dataobj), img.affine) - BLOB_RAS) < 2 * TOL_MM
    assert (tmp_path / r["png"]).read_bytes()[:8] == PNG_SIGNATURE


def test_preprocessed_input_is_not_read_again(net, image, tmp_path):
    shape, affine = GEOMETRIES["ras"]
    findings = [{"center_ras_mm": FINDING_RAS.tolist(), "probability": 0.9}]
    missing = tmp_path / "gone.nii.gz"  # the runner has the volume in memory; nothing is read from disk
    (r,) = explain_findings(missing, net, SETTINGS, findings, tmp_path, preprocessed=image, input_grid=(shape, affine))
    img = nib.load(tmp_path / r["nifti"])
    assert img.shape == shape and np.allclose(img.affine, affine)
    assert np.linalg.norm(_peak_world(np.asarray(img.dataobj), img.affine) - BLOB_RAS) < TOL_MM


def test_no_findings_writes_nothing(net, tmp_path):
    assert explain_findings(tmp_path / "never-read.nii.gz", net, SETTINGS, [], tmp_path / "out", top=3) == []
    assert not (tmp_path / "out").exists()


def test_unknown_method_layer_and_padding_are_clear_errors(net, image):
    with pytest.raises(ValueError, match="unknown explanation method 'lime'.*gradcam, gradcampp, occlusion"):
        explain_finding(image, net, PATCH, FINDING_RAS, method="lime")
    with pytest.raises(ValueError, match="unknown target layer 'layer9'.*suggested: features.0.*features.1"):
        explain_finding(image, net, PATCH, FINDING_RAS, target_layer="layer9")
    with pytest.raises(ValueError, match="Grad-CAM only"):
        explain_finding(image, net, PATCH, FINDING_RAS, method="occlusion", target_layer="features.0")
    with pytest.raises(ValueError, match="unknown padding 'reflect'.*replicate, constant"):
        explain_finding(image, net, PATCH, FINDING_RAS, padding="reflect")
    with pytest.raises(ValueError, match="outside the preprocessed image"):
        explain_finding(image, net, PATCH, (500.0, 0.0, 0.0))


def test_default_layers_of_the_registry_networks():
    size = (32, 32, 32)
    resnet = create_network("resnet10", spatial_size=size)
    assert candidate_layers(resnet) == ["layer4", "layer3", "layer2", "layer1"]
    assert default_target_layer(resnet, size) == "layer2"  # layer4 and layer3 are 1^3 and 2^3 at 32^3
    assert default_target_layer(resnet, (64, 64, 64)) == "layer3"
    assert default_target_layer(create_network("seed_cnn3d", spatial_size=size), size) == "features.4"
    dense = create_network("densenet121", spatial_size=size)
    assert candidate_layers(dense)[0] == "class_layers.relu"
    assert default_target_layer(dense, size) == "features.denseblock2"


def test_resnet10_gradcam_runs_on_a_32_patch(image):
    torch.manual_seed(0)
    net = create_network("resnet10", spatial_size=(32, 32, 32)).eval()
    e = Explainer(net, (32, 32, 32)).explain(image, FINDING_RAS)
    assert e.target_layer == "layer2" and e.saliency.shape == (32, 32, 32)
    assert np.isfinite(e.saliency).all() and e.saliency.min() >= 0.0 and e.saliency.max() <= 1.0
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_constant_padding_is_the_training_crop(image):
    corner = voxel_to_world(image.affine, [1, 1, 1])  # the patch reaches beyond the scan
    patch, patch_affine = crop_patch(image, corner, PATCH, padding="constant")
    ref = WorldPatchCrop(PATCH)(image, corner)
    assert torch.equal(patch, ref.as_subclass(torch.Tensor))
    np.testing.assert_allclose(patch_affine, ref.affine.numpy())
    replicated, replicated_affine = crop_patch(image, corner, PATCH)
    np.testing.assert_allclose(replicated_affine, patch_affine)
    assert float(replicated[0, 0, 0, 0]) == pytest.approx(float(image[0, 0, 0, 0]))  # border voxel, not air


@pytest.mark.parametrize("voxel", [(1, 1, 1), (15, 14, 13), (29, 3, 28)])
def test_replicate_padding_is_the_inference_window(image, voxel):
    data = image.as_subclass(torch.Tensor)
    window = next(iter_window_batches(data, np.asarray([voxel]), PATCH, 1))[0]
    patch, patch_affine = crop_patch(image, voxel_to_world(image.affine, voxel), PATCH)
    assert torch.equal(patch, window)
    np.testing.assert_allclose(
        voxel_to_world(patch_affine, np.asarray(PATCH) // 2), voxel_to_world(image.affine, voxel)
    )


def test_paste_to_grid_is_zero_outside_the_patch():
    sal = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    grid_affine = make_affine((1.0, 1.0, 1.0), (-1, 1, 1), origin=(20.0, 0.0, 0.0))
    patch_affine = grid_affine @ translate([3, 2, 1])
    out = paste_to_grid(sal, patch_affine, (12, 12, 12), grid_affine)
    np.testing.assert_allclose(out[3:7, 2:7, 1:7], sal, atol=1e-6)
    rest = out.copy()
    rest[3:7, 2:7, 1:7] = 0
    assert not rest.any()
    far = patch_affine.copy()
    far[:3, 3] += 500.0  # wholly outside the grid
    assert not paste_to_grid(sal, far, (12, 12, 12), grid_affine).any()


def test_to_ras_reorders_an_lps_array():
    shape, affine = GEOMETRIES["lps"]
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    ras, ras_affine = to_ras(arr, affine)
    assert np.all(np.diag(ras_affine)[:3] > 0)
    np.testing.assert_allclose(voxel_to_world(ras_affine, [0, 0, 0]), voxel_to_world(affine, [39, 39, 0]))
    assert ras[0, 0, 0] == arr[39, 39, 0]


def test_png_is_written_atomically_without_leftovers(net, image, tmp_path):
    from volcnn.explain import write_explanation

    saliency, patch_affine = explain_finding(image, net, PATCH, FINDING_RAS)
    shape, affine = GEOMETRIES["ras"]
    paths = write_explanation(saliency, patch_affine, shape, affine, image, tmp_path, "x", probability=0.5)
    assert set(paths) == {"nifti", "png"} and all(isinstance(p, Path) and p.is_file() for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_gradcam.nii.gz", "x_gradcam.png"]


def test_an_ensemble_is_explained_through_every_member(image):
    """Grad-CAM of an :class:`EnsembleClassifier` averages the members' maps, each taken from the ensemble's own
    log-odds: with a second member that ignores the image (a constant output), the map still shows the first
    member's evidence; the last member's layer alone (what a single deepest layer gave) shows nothing."""
    from volcnn.explain import Explainer
    from volcnn.networks import EnsembleClassifier

    ensemble = EnsembleClassifier([EvidenceNet(), EvidenceNet(gain=0.0)]).eval()
    explainer = Explainer(ensemble, PATCH)
    assert explainer.target_layer == "members.*.features.0" and len(explainer._cams) == 2
    e = explainer.explain(image, FINDING_RAS)
    assert e.saliency.max() == pytest.approx(1.0)
    assert np.linalg.norm(_peak_world(e.saliency, e.patch_affine) - BLOB_RAS) < TOL_MM
    alone = Explainer(ensemble, PATCH, target_layer="members.0.features.0").explain(image, FINDING_RAS)
    np.testing.assert_allclose(e.saliency, alone.saliency, atol=1e-5)  # the silent member adds nothing
    last = Explainer(ensemble, PATCH, target_layer="members.1.features.0").explain(image, FINDING_RAS)
    assert last.saliency.max() == 0.0
    with pytest.raises(ValueError, match="unknown target layer 'nope'"):
        Explainer(ensemble, PATCH, target_layer="nope")
