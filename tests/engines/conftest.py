"""Fixtures shared by the engine tests."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_global_rngs():
    """Trainers, data loaders (MONAI's reseeds) and resumes draw from and restore the global generators; put them
    back after every test so no test depends on another's draws."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
