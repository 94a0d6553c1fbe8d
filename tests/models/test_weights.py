"""Weights that do not fit a network are refused before loading, naming the file, the network and what differs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from volcnn.models import (
    WeightsMismatchError,
    bundle_parser,
    find_weights_mismatch,
    load_bundle_network,
    load_weights,
    weights_mismatches,
)

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "lung_nodule_ct_classification"


def _net(out: int = 2, hidden: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, hidden, 3), nn.BatchNorm3d(hidden), nn.Flatten(), nn.LazyLinear(out))


def _save(net: nn.Module, path: Path) -> Path:
    net(torch.zeros(1, 1, 5, 5, 5))  # materialise the lazy layer
    torch.save(net.state_dict(), path)
    return path


def test_fitting_weights_load(tmp_path):
    torch.manual_seed(0)
    path = _save(_net(), tmp_path / "w.pt")
    net = _net()
    net(torch.zeros(1, 1, 5, 5, 5))
    assert load_weights(net, path) is net and not net.training
    assert torch.equal(net[0].weight, torch.load(path, weights_only=True)["0.weight"])


def test_mismatches_are_named_before_loading(tmp_path):
    path = _save(_net(out=2, hidden=4), tmp_path / "w.pt")
    other = _net(out=3, hidden=4)
    other(torch.zeros(1, 1, 5, 5, 5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(other, path)
    message = str(info.value)
    assert message.startswith(f"{path}: these weights do not fit the network Sequential: 2 shape mismatch(es)")
    assert (
        "3.weight: weights (2, 108) vs network (3, 108)" in message
        and "3.bias: weights (2,) vs network (3,)" in message
    )
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched

    extra = nn.Sequential(*_net(), nn.Linear(2, 2))
    extra(torch.zeros(1, 1, 5, 5, 5))
    problems = weights_mismatches(extra, torch.load(path, weights_only=True))
    assert problems == ["2 key(s) of the network missing from the weights (4.weight, 4.bias)"]
    wider = _net(hidden=8)
    wider(torch.zeros(1, 1, 5, 5, 5))
    shapes = weights_mismatches(wider, torch.load(path, weights_only=True))
    assert shapes[0].startswith("7 shape mismatch(es) (0.weight: weights (4, 1, 3, 3, 3) vs network (8, 1, 3, 3, 3)")
    assert shapes[0].endswith("and 4 more)")  # the first three named
    assert weights_mismatches(_net(), {"x": torch.zeros(1)})[1] == "1 key(s) the network does not have (x)"


def test_a_bundle_names_its_settings_and_monais_wrapping_is_undone(tmp_path):
    from volcnn.networks import create_network

    bundle = tmp_path / "b"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    torch.save(create_network("seed_cnn3d", num_classes=2, spatial_size=(16, 16, 16)).state_dict(),
               bundle / "models" / "model.pt")  # fmt: skip
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config.update(network_def="seed_cnn3d", patch_size=[16, 16, 16], num_classes=3)
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(WeightsMismatchError) as info:
        load_bundle_network(bundle)
    assert str(info.value).startswith(
        f"{bundle / 'models' / 'model.pt'}: these weights do not fit the network of bundle {bundle} "
        "(network_def 'seed_cnn3d', patch_size [16, 16, 16], num_classes 3): 2 shape mismatch(es)"
    )
    parser = bundle_parser(bundle, device="cpu")
    with pytest.raises(RuntimeError, match="Failed to evaluate") as wrapped:  # MONAI's parser wraps the error
        parser.get_parsed_content("trained_network")
    assert isinstance(find_weights_mismatch(wrapped.value), WeightsMismatchError)
    assert find_weights_mismatch(RuntimeError("other")) is None
