"""Grad-CAM lands where the evidence is: feature cells are placed at their receptive-field centres on the patch.

Ground truth is worked out by hand from each layer's kernel, stride and padding (cell ``i`` of a layer sees input
voxels ``[start + J i, end + J i]``; its centre is the midpoint), independently of the NaN probe that
:func:`~volcnn.explain.cell_geometry.layer_cell_geometry` runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from monai.visualize.visualizer import default_upsampler
from torch import nn

from volcnn.explain import Explainer, default_target_layer
from volcnn.explain import cell_geometry as cg
from volcnn.explain.cell_geometry import CellGeometry, interpolation_matrix, layer_cell_geometry, upsample_cells
from volcnn.networks import create_network

PATCH = (32, 32, 32)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Every test measures for itself (the cache is keyed by architecture, not by test)."""
    cg._CACHE.clear()
    yield
    cg._CACHE.clear()


def _placement_error(geometry: CellGeometry, truth: CellGeometry, cells: tuple[int, ...]) -> float:
    """Largest distance (voxels, over cells and axes) between two placements of the same cells."""
    return max(float(np.abs(a - b).max()) for a, b in zip(geometry.centres(cells), truth.centres(cells), strict=True))


# ---------------------------------------------------------------------------------------------------- valid_cnn3d

# valid_cnn3d at 32^3: 32 -conv3-> 30 -conv3-> 28 -pool2-> 14 -conv3-> 12 -conv3-> 10 -pool2-> 5 -conv3-> 3 -conv3-> 1
# receptive field of cell i, in input voxels:
#   conv "0":  [i, i + 2]                                      jump 1
#   conv "3":  [i, i + 4]                                      jump 1
#   pool "6":  [2i, 2i + 1 + 4]      = [2i, 2i + 5]            jump 2
#   conv "7":  [2i, 2(i + 2) + 5]    = [2i, 2i + 9]            jump 2
#   conv "10": [2i, 2(i + 2) + 9]    = [2i, 2i + 13]  -> centre 2i + 6.5   (10 cells: the default layer)
#   pool "13": [4i, 4i + 2 + 13]     = [4i, 4i + 15]           jump 4
#   conv "14": [4i, 4(i + 2) + 15]   = [4i, 4i + 23]  -> centre 4i + 11.5
#   conv "17": [4i, 4(i + 2) + 23]   = [4i, 4i + 31]  -> centre 4i + 15.5  (1 cell: the whole patch)
VALID_CENTRES = {"3": (2.0, 1.0), "10": (6.5, 2.0), "14": (11.5, 4.0), "17": (15.5, 4.0)}


@pytest.mark.parametrize("layer", sorted(VALID_CENTRES))
def test_valid_cnn3d_cells_sit_at_their_receptive_field_centres(layer):
    net = create_network("valid_cnn3d", spatial_size=PATCH).eval()
    offset, jump = VALID_CENTRES[layer]
    assert layer_cell_geometry(net, layer, PATCH) == CellGeometry((offset,) * 3, (jump,) * 3)


def test_valid_cnn3d_default_layer_was_stretched_by_monai():
    net = create_network("valid_cnn3d", spatial_size=PATCH).eval()
    layer = default_target_layer(net, PATCH)
    assert layer == "10"
    truth = CellGeometry((6.5,) * 3, (2.0,) * 3)
    cells = (10, 10, 10)
    assert _placement_error(layer_cell_geometry(net, layer, PATCH), truth, cells) == 0.0
    # MONAI's upsampler puts cell i at 1.1 + 3.2 i instead of 6.5 + 2 i: 5.4 voxels off at both edges
    assert _placement_error(CellGeometry.even_tiling(cells, PATCH), truth, cells) == pytest.approx(5.4)


# ---------------------------------------------------------------------------------------------------- resnet10

# registry resnet10 (stem conv 7^3 stride 2 padding 3, max pool 3^3 stride 2 padding 1, basic blocks of two 3^3
# convs padded 1, the first of layers 2-4 with stride 2, shortcut 1x1 stride 2): every layer is centred, so
#   stem conv:  [2i - 3, 2i + 3]                                   centre 2i    jump 2
#   max pool:   [2(2i - 1) - 3, 2(2i + 1) + 3]   = [4i - 5, 4i + 5]  centre 4i    jump 4
#   layer1:     two convs at jump 4: +-8         = [4i - 13, 4i + 13]  centre 4i
#   layer2:     [8i - 4 - 13, ...], conv at jump 8 = [8i - 25, 8i + 25]  centre 8i  (4 cells at 32^3: default)
#   layer3:     +-8, +-16                        = [16i - 49, 16i + 49]  centre 16i
#   layer4:     +-16, +-32                       = [32i - 97, 32i + 97]  centre 32i  (195 voxels: 6x the patch)
RESNET_CENTRES = {"layer1": 4.0, "layer2": 8.0, "layer4": 32.0}


@pytest.mark.parametrize("layer", sorted(RESNET_CENTRES))
def test_resnet10_cells_sit_at_their_receptive_field_centres(layer):
    net = create_network("resnet10", spatial_size=PATCH).eval()
    jump = RESNET_CENTRES[layer]
    assert layer_cell_geometry(net, layer, PATCH) == CellGeometry((0.0,) * 3, (jump,) * 3)


def test_resnet10_default_layer_was_half_a_cell_off_in_monai():
    net = create_network("resnet10", spatial_size=PATCH).eval()
    assert default_target_layer(net, PATCH) == "layer2"
    truth, cells = CellGeometry((0.0,) * 3, (8.0,) * 3), (4, 4, 4)
    assert _placement_error(layer_cell_geometry(net, "layer2", PATCH), truth, cells) == 0.0
    # MONAI: cell i at 8 i + 3.5
    assert _placement_error(CellGeometry.even_tiling(cells, PATCH), truth, cells) == pytest.approx(3.5)


def test_probe_leaves_the_network_alone():
    net = create_network("resnet10", spatial_size=PATCH).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layer_cell_geometry(net, "layer2", PATCH)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert next(net.parameters()).dtype == torch.float32 and not net.training


# ---------------------------------------------------------------------------------------------------- other networks


class _GlobalGate(nn.Module):
    """Squeeze-and-excitation-like: every voxel is scaled by the volume's mean, so every cell sees everything."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean(dim=(2, 3, 4), keepdim=True))


def test_instance_norm_is_measured_and_a_global_gate_falls_back_to_monai_with_a_warning():
    normed = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2), nn.Conv3d(2, 2, 3, stride=2, padding=1))
    assert layer_cell_geometry(normed, "2", (16, 16, 16)) == CellGeometry((1.0,) * 3, (2.0,) * 3)
    gated = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2), _GlobalGate(), nn.Conv3d(2, 2, 3))
    with pytest.warns(UserWarning, match="cannot place the cells of layer '2'.*every|depend"):
        g = layer_cell_geometry(gated, "2", (16, 16, 16))
    assert g == CellGeometry.even_tiling((5, 5, 5), (16, 16, 16)) and not g.exact


def test_a_network_that_only_runs_on_its_patch_size_is_probed_at_that_size():
    # seed_cnn3d checks its input size; features.4 (conv padded 1 after a 2x pool): cell i at 2 i + 0.5
    net = create_network("seed_cnn3d", spatial_size=(16, 16, 16)).eval()
    g = layer_cell_geometry(net, "features.4", (16, 16, 16))
    assert g == CellGeometry((0.5,) * 3, (2.0,) * 3) and g.exact


# ---------------------------------------------------------------------------------------------------- upsampling


def test_interpolation_is_exact_at_the_centres_linear_between_and_clamped_beyond():
    w = interpolation_matrix([6.5, 8.5, 10.5], 14)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    values = np.array([1.0, 3.0, 2.0])
    np.testing.assert_allclose(w @ values, [1.0] * 7 + [1.5, 2.5, 3.0 - 0.25, 2.25] + [2.0] * 3)
    np.testing.assert_allclose(interpolation_matrix([4.0], 3), np.ones((3, 1)))


def test_even_tiling_reproduces_monai_default_upsampler():
    """The convention used to quantify MONAI's placement is the one F.interpolate follows."""
    cam = torch.rand(2, 1, 4, 5, 10, dtype=torch.float64)
    size = (32, 30, 32)
    ours = upsample_cells(cam, CellGeometry.even_tiling(cam.shape[2:], size), size)
    np.testing.assert_allclose(ours.numpy(), default_upsampler(size)(cam).numpy(), atol=1e-12)


# ---------------------------------------------------------------------------------------------------- end to end


class BlobNet(nn.Sequential):
    """Unpadded box filters: ``conv5 -> ReLU -> avgpool2 -> conv5 -> ReLU -> mean -> linear``, logits ``(-f, f)``.

    Its Grad-CAM at the last conv (``"3"``, 10^3 cells at 32^3, cell i centred at 2 i + 6.5 like valid_cnn3d's
    default layer) is proportional to that conv's output, a symmetric smoothing of the input centred on each
    cell: it peaks at the cell nearest a bright blob.
    """

    def __init__(self) -> None:
        super().__init__(
            nn.Conv3d(1, 1, 5, bias=False),
            nn.ReLU(),
            nn.AvgPool3d(2),
            nn.Conv3d(1, 1, 5, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(1, 2, bias=False),
        )
        with torch.no_grad():
            self[0].weight.fill_(1 / 125)
            self[3].weight.fill_(1 / 125)
            self[7].weight.copy_(torch.tensor([[-1.0], [1.0]]))


BLOB_VOXEL = np.array([9, 22, 13])  # off the patch centre (16) along every axis


def _blob_patch() -> torch.Tensor:
    idx = np.indices(PATCH).astype(np.float64)
    d2 = sum((idx[a] - BLOB_VOXEL[a]) ** 2 for a in range(3))
    return torch.as_tensor(np.exp(-d2 / (2 * 2.0**2)), dtype=torch.float32)[None]  # (1, 32, 32, 32)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_saliency_peaks_on_the_blob_where_monai_misses_it(method):
    net = BlobNet().eval()
    patch = _blob_patch()
    explainer = Explainer(net, PATCH, method=method)
    assert explainer.target_layer == "3" and explainer.cell_geometry == CellGeometry((6.5,) * 3, (2.0,) * 3)
    # the whole volume is the patch: the finding at voxel 16 gives patch voxel = volume voxel
    e = explainer.explain(patch, (16.0, 16.0, 16.0))
    np.testing.assert_array_equal(e.patch_affine, np.eye(4))
    peak = np.array(np.unravel_index(int(np.argmax(e.saliency)), PATCH))
    assert np.abs(peak - BLOB_VOXEL).max() <= 1, peak

    # MONAI's own Grad-CAM with its default upsampler, same layer and network: several voxels off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_map = GradCAM(BlobNet().eval(), "3", postprocessing=lambda m: m)(patch[None], class_idx=1)[0, 0]
    monai_peak = np.array(np.unravel_index(int(torch.argmax(monai_map)), PATCH))
    assert np.abs(monai_peak - BLOB_VOXEL).max() >= 3, monai_peak
    assert np.linalg.norm(monai_peak - BLOB_VOXEL) > 3 * np.linalg.norm(peak - BLOB_VOXEL) + 3


def test_cells_keep_their_values_at_their_centres_and_the_edges_extend():
    cam = F.relu(torch.randn(1, 1, 10, 10, 10, dtype=torch.float64))
    g = CellGeometry((2.0, 2.0, 2.0), (3.0, 3.0, 3.0))  # centres 2, 5, ..., 29
    up = upsample_cells(cam, g, PATCH)[0, 0]
    assert up.shape == PATCH
    centres = slice(2, 30, 3)
    torch.testing.assert_close(up[centres, centres, centres], cam[0, 0])
    torch.testing.assert_close(up[:2, centres, centres], cam[0, 0, :1].expand(2, 10, 10))
    torch.testing.assert_close(up[30:, centres, centres], cam[0, 0, -1:].expand(2, 10, 10))
    assert float(up.max()) == pytest.approx(float(cam.max()))
