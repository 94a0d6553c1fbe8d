"""Dense heat maps: splitting classifiers, exactness of the a trous trunk, agreement with the window reference,
tiling, out-of-memory fallbacks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet, ResNet, resnet10
from torch import nn

from tests.inference.dense_nets import DenseBlobNet, padding_sensitive_net, tiny_strided_net
from volcnn.inference import (
    classifier_heatmap,
    dense_heatmap,
    dense_window_difference,
    heatmap_grid,
    plan_dense,
    split_classifier,
)
from volcnn.inference import tiling as tiling_mod
from volcnn.inference.tiling import Block, extract_tile, run_blocks
from volcnn.networks import create_network


def _smooth_volume(shape, seed=0) -> torch.Tensor:
    """``(1, *shape)`` in [0, 1], CT-like: blobs of soft tissue (0.75) of a few voxels on lung (0.1), with noise."""
    g = torch.Generator().manual_seed(seed)
    seeds = (torch.rand(1, 1, *shape, generator=g) < 0.01).float()
    blobs = torch.nn.functional.max_pool3d(seeds, 5, 1, 2)
    x = 0.1 + 0.65 * blobs + 0.05 * torch.randn(1, 1, *shape, generator=g)
    return torch.nn.functional.avg_pool3d(x, 3, 1, 1, count_include_pad=False)[0].clamp(0, 1)


# ---- split_classifier ----


@pytest.mark.parametrize(
    ("name", "stride", "patch", "cells"),
    [
        ("resnet10", 32, 48, 2),
        ("resnet18", 32, 32, 1),
        ("resnet34", 32, 64, 2),
        ("densenet121", 32, 48, 1),  # 48 -> 24 -> 12 -> 6 -> 3 -> 1: the last average pool drops the odd cell
        ("seed_cnn3d", 4, 32, 8),
        ("valid_cnn3d", 4, 48, 5),  # 48 -> 44 -> 22 -> 18 -> 9 -> 5
    ],
)
def test_registry_networks_split(name, stride, patch, cells):
    net = create_network(name, spatial_size=(patch,) * 3)
    split = split_classifier(net)
    assert split.total_stride == (stride,) * 3
    plan = plan_dense(split, (patch,) * 3, 4)
    assert plan.cells == (cells,) * 3
    assert plan.map_step == (4, 4, 4) and plan.grid_stride == (4, 4, 4)
    assert all(p is q for p, q in zip(split.trunk.parameters(), plan.trunk.parameters(), strict=True))  # shared
    assert not any(p.device.type == "meta" for p in net.parameters())


def test_grid_step_is_a_divisor_of_the_trunk_stride_or_a_multiple_of_one():
    net = create_network("resnet10")
    assert plan_dense(net, (32,) * 3, 8).map_step == (8, 8, 8)
    plan = plan_dense(net, (32,) * 3, (5, 6, 64))
    assert plan.map_step == (4, 4, 32) and plan.grid_stride == (4, 4, 64)  # never coarser than asked
    assert plan_dense(DenseBlobNet((6, 6, 6)), (6, 6, 6), 3).grid_stride == (3, 3, 3)  # stride-1 trunk: subsampled


def _pooled(*trunk: nn.Module) -> nn.Sequential:
    return nn.Sequential(*trunk, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False), "no linear head"),
        (lambda: _pooled(nn.Conv3d(1, 2, 3), nn.GroupNorm(1, 2)), "GroupNorm"),
        (lambda: _pooled(nn.Conv3d(1, 2, 3, padding=1, padding_mode="reflect")), "zero padding"),
        (lambda: _pooled(nn.Conv3d(1, 2, 3), nn.AvgPool3d(3, 2, padding=1)), "padded average pool"),
        (lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), "cannot be evaluated densely"),
        (lambda: nn.Linear(3, 2), "cannot be evaluated densely"),
    ],
)
def test_unsupported_networks_are_refused_with_the_reason(make, message):
    with pytest.raises(ValueError, match=message):
        split_classifier(make())


# ---- agreement with the window-by-window reference ----


@pytest.mark.parametrize("stride", [1, 2, 3, 4, (1, 2, 4), 8])
def test_unpadded_pooling_net_agrees_exactly_with_windows(stride):
    """A trunk without padding sees exactly its window's voxels (and the same replicated border voxels outside the
    volume) in both methods, so the maps agree at every point, borders included: float rounding only (the dense
    path sums the same products in another order)."""
    net, patch = tiny_strided_net(), (10, 10, 10)
    vol = _smooth_volume((23, 19, 17))
    dense, dense_aff = dense_heatmap(vol, net, patch, stride_vox=stride)
    step = dense_aff.diagonal()[:3].astype(int)
    ref, ref_aff = classifier_heatmap(vol, net, patch, stride_vox=tuple(step), skip_air=False, batch_size=4096)
    np.testing.assert_allclose(dense_aff, ref_aff)
    assert dense.shape == ref.shape and dense.std() > 0.02
    assert np.abs(dense - ref).max() < 1e-5
    # tiles of one grid row: the same map
    tiled, _ = dense_heatmap(vol, net, patch, stride_vox=stride, tile_mb=1e-4)
    assert np.abs(tiled - dense).max() < 1e-6


def _trained_like(net: nn.Module, seed: int = 0, logit_gain: float = 1.0) -> nn.Module:
    """``net`` in eval mode with batch-norm statistics as after training (random init leaves them at 0 / 1, and
    valid_cnn3d's probabilities then hardly vary, std 0.001) and its linear layers scaled by ``logit_gain``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.05 + 0.1 * torch.rand(m.num_features, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.mul_(logit_gain)
    return net.eval()


@pytest.mark.parametrize(("patch", "stride"), [(32, 4), (32, 6), (40, 8)])
def test_valid_cnn3d_dense_map_equals_window_by_window_everywhere(patch, stride):
    """The registry's unpadded network: the dense map equals the window reference at every grid point of a CT-like
    volume, the volume's borders and a body mask included, for grid steps that are and are not multiples of the
    trunk's stride, and in several tiles. (The padded resnet10 differs by up to 0.95 in the same setting, test
    below.)"""
    net = _trained_like(create_network("valid_cnn3d", spatial_size=(patch,) * 3))
    vol = _smooth_volume((52, 44, 36), seed=2)
    mask = torch.zeros(52, 44, 36, dtype=torch.bool)
    mask[4:48, 6:40, 2:30] = True
    size = (patch,) * 3
    dense, aff = dense_heatmap(vol, net, size, stride_vox=stride, tile_mb=0.5)
    step = tuple(aff.diagonal()[:3].astype(int))
    ref, ref_aff = classifier_heatmap(vol, net, size, stride_vox=step, skip_air=False, batch_size=64)
    np.testing.assert_allclose(aff, ref_aff)
    assert dense.shape == ref.shape and dense.std() > 0.05
    assert np.abs(dense - ref).max() < 1e-5
    masked, _ = dense_heatmap(vol, net, size, stride_vox=stride, mask=mask)
    inside = masked != 0
    assert inside.any() and np.abs(masked[inside] - ref[inside]).max() < 1e-5
    diff, n = dense_window_difference(vol, net, dense, aff, size, n_points=16)
    assert n == 16 and diff < 1e-5


def _context_reference(split, vol, centres, patch, context, cells):
    """The quantity the dense map computes, window by window with the *native* trunk: each window with ``context``
    real voxels around it (replicated outside the volume), so that its feature cells see what they see in the whole
    volume; the head reads the window's own cells."""
    s = split.total_stride
    out = []
    for c in centres:
        start = [int(c[a]) - patch[a] // 2 - context for a in range(3)]
        tile = extract_tile(vol, start, [start[a] + patch[a] + 2 * context for a in range(3)])
        with torch.no_grad():
            features = split.trunk(tile)[:, :, context // s[0] :, context // s[1] :, context // s[2] :]
            logits = split.head(features, cells, (1, 1, 1), (1, 1, 1))
        out.append(torch.softmax(logits[0, :, 0, 0, 0], 0)[1].item())
    return np.asarray(out)


def _narrow_resnet10() -> nn.Module:
    """resnet10's exact layout (stride-2 7^3 stem, max pool, four basic blocks, 1x1 shortcuts, receptive field 195
    voxels), with 4-8 channels so that context windows of 288^3 are cheap."""
    torch.manual_seed(0)
    net = ResNet(
        "basic",
        [1, 1, 1, 1],
        [4, 8, 8, 8],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=2,
        bias_downsample=False,
        num_classes=2,
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _seed_cnn3d() -> nn.Module:
    torch.manual_seed(0)
    net = create_network("seed_cnn3d", spatial_size=(8, 8, 8))
    with torch.no_grad():
        net.classifier[-1].weight.mul_(20.0)
    return net.eval()


def _small_densenet() -> nn.Module:
    torch.manual_seed(0)
    net = DenseNet(3, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
    with torch.no_grad():
        net.class_layers.out.weight.mul_(20.0)
    return net.eval()


@pytest.mark.parametrize(
    ("make", "patch", "stride", "shape"),
    [
        (_narrow_resnet10, (32, 32, 32), (8, 4, 8), (20, 18, 12)),  # dilation 2-4 in layers 2-4, 1x1 shortcuts
        (_small_densenet, (16, 16, 16), (2, 2, 2), (14, 12, 10)),  # dilated average pool in the transition
        (_seed_cnn3d, (8, 8, 8), (4, 4, 4), (18, 14, 12)),  # its dense layer as a convolution
    ],
)
def test_dense_map_is_exact_for_padded_networks_given_the_context(make, patch, stride, shape):
    """Real architectures with padding: the dense map (tiles with a receptive-field halo, in several tiles) equals the
    native trunk run window by window on windows widened by the receptive field (the cells see the same voxels),
    at every grid point including the volume's border. Tolerance 1e-5: float32 sums in another order."""
    net = make()
    split = split_classifier(net)
    vol = _smooth_volume(shape, seed=1)
    heat, aff = dense_heatmap(vol, net, patch, stride_vox=stride, halo="receptive_field", tile_mb=2.0)
    plan = plan_dense(split, patch, stride, halo="receptive_field")
    context = max(plan.halo)
    context += -context % max(split.total_stride)
    _, centres = heatmap_grid(shape, plan.grid_stride)
    pick = np.random.default_rng(0).choice(len(centres), size=min(6, len(centres)), replace=False)
    pick = np.r_[pick, 0, len(centres) - 1]  # the first and last corner
    ref = _context_reference(split, vol, centres[pick], patch, context, plan.cells)
    np.testing.assert_allclose(heat.ravel()[pick], ref, atol=1e-5)
    assert heat.std() > 0.01


def test_padding_dependent_networks_disagree_with_windows_and_the_check_sees_it():
    """Where a window's trunk zero-pads, the dense trunk sees the neighbouring tissue: for a network whose response
    depends on that padding the maps differ, which :func:`dense_window_difference` measures.

    Measured on synthetic chest CTs at 1 mm: a trained resnet10 (patch 32^3, receptive field 195 voxels, validation
    AUC 0.99) differs by up to 0.95 over a whole scan (its dense map is ~0 where windows give 0.1-0.9); an untrained
    densenet121 (patch 48^3) by 0.14, the registry resnet10 untrained by 0.02 and by 0.47 with its logits scaled to
    a trained network's range (below); an unpadded trunk by 6e-8. No tolerance makes a padded real network "agree":
    what is exact for them is the context reference of the test above."""
    vol = _smooth_volume((40, 40, 40))
    torch.manual_seed(0)
    r10 = create_network("resnet10").eval()
    with torch.no_grad():
        r10.fc.weight.mul_(20.0)
    heat, aff = dense_heatmap(vol, r10, (32, 32, 32), stride_vox=8)
    diff, n = dense_window_difference(vol, r10, heat, aff, (32, 32, 32), n_points=8)
    assert n == 8 and diff > 0.1
    box = padding_sensitive_net()
    heat, aff = dense_heatmap(vol, box, (12, 12, 12), stride_vox=4)
    assert dense_window_difference(vol, box, heat, aff, (12, 12, 12))[0] > 0.3
    tiny = tiny_strided_net()
    heat, aff = dense_heatmap(vol, tiny, (10, 10, 10), stride_vox=4)
    diff, n = dense_window_difference(vol, tiny, heat, aff, (10, 10, 10))
    assert n == 32 and diff < 1e-5


# ---- masks, tiles, memory ----


def test_mask_limits_the_points_and_the_trunk_to_its_bounding_box(monkeypatch):
    net, patch = tiny_strided_net(), (10, 10, 10)
    vol = _smooth_volume((40, 30, 20))
    mask = torch.zeros(40, 30, 20, dtype=torch.bool)
    mask[20:31, 5:9, 8:12] = True
    seen = []
    forward = tiling_mod.forward_tile
    monkeypatch.setattr(tiling_mod, "forward_tile", lambda *a: seen.append(a[2].shape) or forward(*a))
    heat, _ = dense_heatmap(vol, net, patch, stride_vox=2, mask=mask)
    full, _ = dense_heatmap(vol, net, patch, stride_vox=2)
    inside = np.zeros(heat.shape, dtype=bool)
    inside[10:16, 3:5, 4:6] = True  # grid points 2 * g inside the mask
    np.testing.assert_array_equal(heat != 0, inside)
    np.testing.assert_allclose(heat[inside], full[inside], atol=1e-6)
    # the first tile covers the windows of the masked points only: 11 x 3 x 3 points at step 2, plus the patch
    assert tuple(seen[0][2:]) == (2 * 5 + 10, 2 * 1 + 10, 2 * 1 + 10)
    empty, _ = dense_heatmap(vol, net, patch, stride_vox=2, mask=torch.zeros(40, 30, 20, dtype=torch.bool))
    assert not empty.any()


def test_out_of_memory_splits_the_tile_then_falls_back_to_cpu(monkeypatch, caplog):
    """A tile that does not fit is split (every later tile too); on an accelerator the smallest tile's failure moves
    the evaluation to the CPU. The "accelerator" here is the meta device, whose tiles always run out of memory."""
    net, patch = tiny_strided_net(), (10, 10, 10)
    vol = _smooth_volume((30, 24, 20))
    expected, _ = dense_heatmap(vol, net, patch, stride_vox=2)
    forward = tiling_mod.forward_tile
    sizes = []

    def limited(trunk, head, tile, plan):
        sizes.append(tile.numel())
        if tile.device.type == "meta" or tile.numel() > 12000:
            raise torch.OutOfMemoryError("simulated")
        return forward(trunk, head, tile, plan)

    monkeypatch.setattr(tiling_mod, "forward_tile", limited)
    caplog.set_level(logging.WARNING)
    heat, _ = dense_heatmap(vol, net, patch, stride_vox=2)
    np.testing.assert_allclose(heat, expected, atol=1e-6)
    assert sizes[0] > 12000 and max(sizes[-3:]) <= 12000
    assert "retrying in smaller tiles" in caplog.text
    caplog.clear()
    heat, _ = dense_heatmap(vol, net, patch, stride_vox=2, device="meta")
    np.testing.assert_allclose(heat, expected, atol=1e-6)
    assert "falling back to the CPU" in caplog.text


def test_run_blocks_fallback_order_and_cpu_failure():
    calls = []

    def evaluate(block, device):
        calls.append((block.size, device.type))
        if device.type == "cuda" or max(block.size) > 2:
            raise torch.OutOfMemoryError("simulated")
        return np.zeros(1)

    covered = []
    last = run_blocks(
        [Block((0, 0, 0), (4, 1, 1))],
        evaluate,
        torch.device("cuda"),
        lambda b, r: covered.extend(range(b.lo[0], b.hi[0])),
        lambda b: int(np.prod(b.size)),
    )
    assert last.type == "cpu"
    assert calls[:4] == [((4, 1, 1), "cuda"), ((2, 1, 1), "cuda"), ((1, 1, 1), "cuda"), ((1, 1, 1), "cpu")]
    assert sorted(covered) == [0, 1, 2, 3]

    def no_memory(block, device):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        run_blocks([Block((0, 0, 0), (1, 1, 1))], no_memory, torch.device("cpu"), lambda b, r: None, lambda b: 1)


def test_network_mode_is_restored_and_no_gradients():
    net = tiny_strided_net().train()
    vol = _smooth_volume((12, 12, 12))
    heat, _ = dense_heatmap(vol, net, (10, 10, 10), stride_vox=4)
    assert net.training and all(p.grad is None for p in net.parameters())
    net.eval()
    again, _ = dense_heatmap(vol, net, (10, 10, 10), stride_vox=4)
    np.testing.assert_array_equal(heat, again)  # train mode (batch statistics) was not used
