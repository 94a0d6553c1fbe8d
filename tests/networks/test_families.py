"""Tests for volcnn.networks.families: each registry network's family, its trunk/head split and Grad-CAM layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from volcnn.networks import Family, cam_layers, create_network, family_of, list_networks, split_trunk_head
from volcnn.networks.families import register_family

FAMILIES = {
    "densenet121": "densenet",
    "resnet10": "resnet",
    "resnet18": "resnet",
    "resnet34": "resnet",
    "seed_cnn3d": "seed_cnn",
    "valid_cnn3d": "valid_cnn",
}


def test_every_registered_network_has_a_family():
    assert set(FAMILIES) == set(list_networks())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_split_reproduces_the_network(name):
    """trunk then head (pooling + linear, or flatten + linear + rest) gives the network's own logits."""
    net = create_network(name, spatial_size=(32, 32, 32)).eval()
    family = family_of(net)
    assert family is not None and family.name == FAMILIES[name]
    parts = split_trunk_head(net)
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = parts.trunk(x)
        if parts.pooled:
            logits = parts.linear(features.mean(dim=(2, 3, 4)))
        else:
            logits = parts.rest(parts.linear(features.flatten(1)))
        torch.testing.assert_close(logits, net(x), rtol=1e-5, atol=1e-5)
    layers = dict(net.named_modules())
    assert all(layer in layers for layer in cam_layers(net))


def test_cam_layers_follow_the_family_else_the_convolutions():
    assert cam_layers(create_network("resnet10")) == ["layer4", "layer3", "layer2", "layer1"]
    assert cam_layers(create_network("densenet121"))[0] == "class_layers.relu"
    plain = nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 3))
    assert family_of(plain) is None and cam_layers(plain) == ["2", "0"]


def test_wrappers_and_subclasses_find_the_family():
    net = create_network("resnet10")
    assert family_of(nn.DataParallel(net)).name == "resnet"

    class Tweaked(type(net)):  # a subclass without a family of its own
        pass

    tweaked = Tweaked.__new__(Tweaked)
    assert family_of(tweaked).name == "resnet"


def test_unknown_structures_are_refused_and_families_register_once():
    pooled = nn.Sequential(nn.Conv3d(1, 2, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 2))
    assert split_trunk_head(pooled).linear is pooled[3]
    with pytest.raises(ValueError, match="cannot be evaluated densely"):
        split_trunk_head(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="already belongs"):
        register_family(type(create_network("resnet10")), Family("again"))
