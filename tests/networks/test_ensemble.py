"""An ensemble is one classifier whose softmax is the mean of its members' softmax."""

from __future__ import annotations

import pytest
import torch

from volcnn.networks import EnsembleClassifier, create_network


def test_ensemble_probability_is_the_mean_of_its_members():
    torch.manual_seed(0)
    net = create_network("seed_cnn3d", spatial_size=(16, 16, 16), ensemble=3).eval()
    assert isinstance(net, EnsembleClassifier) and len(net.members) == 3
    assert any(key.startswith("members.2.") for key in net.state_dict())
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.inference_mode():
        members = torch.stack([torch.softmax(m(x), dim=1) for m in net.members])
        assert members.std(dim=0).max() > 1e-3  # members differ (independent initialisations)
        torch.testing.assert_close(torch.softmax(net(x), dim=1), members.mean(dim=0), atol=1e-6, rtol=0)
    assert not isinstance(create_network("seed_cnn3d", spatial_size=(16, 16, 16)), EnsembleClassifier)


def test_ensemble_sizes_below_two_are_refused():
    with pytest.raises(ValueError, match="ensemble must be >= 1"):
        create_network("seed_cnn3d", ensemble=0)
    with pytest.raises(ValueError, match="at least 2 members"):
        EnsembleClassifier([create_network("seed_cnn3d")])
