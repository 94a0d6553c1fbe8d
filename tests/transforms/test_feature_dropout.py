"""FeatureDropout: hides whole features (all one-hot columns together) at the rate asked, from its own state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.utils import set_determinism

from volcnn.engines.rng_state import transform_random_states
from volcnn.transforms import FeatureDropout

GROUPS = [0, 1, 1, 1, 2]  # age, sex (3 one-hot columns), smoker


def _batch(n: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 5, generator=g)


def test_p_zero_changes_nothing_and_draws_nothing():
    drop = FeatureDropout(0.0, GROUPS)
    state = drop.R.get_state()[1].copy()
    x = _batch()
    assert drop(x) is x
    assert np.array_equal(drop.R.get_state()[1], state)


def test_hides_whole_features_at_the_rate_asked():
    out = FeatureDropout(0.3, GROUPS)(_batch())
    hidden = torch.isnan(out)
    sex = hidden[:, 1:4]
    assert bool((sex.all(1) | ~sex.any(1)).all())  # a categorical is hidden in all its columns or none
    for cols in ([0], [1], [4]):
        assert abs(hidden[:, cols].float().mean().item() - 0.3) < 0.04
    kept = ~hidden
    assert torch.equal(out[kept], _batch()[kept])  # the rest untouched


def test_seeded_by_monai_determinism_and_found_for_resume():
    set_determinism(seed=5)
    a, b = FeatureDropout(0.5, GROUPS), FeatureDropout(0.5, GROUPS)
    set_determinism(seed=None)
    x = _batch(50)
    assert torch.equal(torch.isnan(a(x)), torch.isnan(b(x)))
    assert transform_random_states(a) == [a.R]  # the checkpoint captures and restores it


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FeatureDropout(1.0)
    with pytest.raises(ValueError, match="built for 5"):
        FeatureDropout(0.2, GROUPS)(torch.zeros(3, 4))
