from __future__ import annotations

import pytest
import torch

from volcnn.networks import create_network, list_networks


def test_required_networks_registered():
    assert {"seed_cnn3d", "densenet121", "resnet18"} <= set(list_networks())


@pytest.mark.parametrize("name", list_networks())
def test_forward_backward(name):
    torch.manual_seed(0)
    net = create_network(name, in_channels=1, num_classes=3, spatial_size=(32, 32, 32))
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3)
    y.sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_resnet_stem_has_stride_two():
    net = create_network("resnet18", spatial_size=(32, 32, 32))
    assert tuple(net.conv1.stride) == (2, 2, 2)


def test_unknown_network_lists_known_names():
    with pytest.raises(ValueError, match="seed_cnn3d"):
        create_network("no_such_net")


def test_seed_cnn_rejects_wrong_patch():
    net = create_network("seed_cnn3d", spatial_size=(16, 16, 16))
    with pytest.raises(ValueError, match="built for patches"):
        net(torch.zeros(1, 1, 32, 32, 32))


def test_valid_cnn3d_sees_exactly_its_patch():
    """One feature cell at 32^3 whose receptive field is the whole patch: voxels on all six faces change the logits;
    a larger input gives more cells, each seeing 32^3 voxels."""
    torch.manual_seed(0)
    net = create_network("valid_cnn3d", spatial_size=(32, 32, 32)).eval()
    trunk = net[:-3]
    x = torch.rand(1, 1, 32, 32, 32, requires_grad=True)
    assert tuple(trunk(x).shape[2:]) == (1, 1, 1)
    net(x)[0, 1].backward()
    assert x.grad is not None
    g = x.grad[0, 0] != 0
    for axis in range(3):
        assert bool(g.select(axis, 0).any()) and bool(g.select(axis, 31).any())
    assert tuple(trunk(torch.zeros(1, 1, 48, 40, 33)).shape[2:]) == (5, 3, 1)
    with pytest.raises(ValueError, match="at least 32"):
        create_network("valid_cnn3d", spatial_size=(24, 32, 32))
