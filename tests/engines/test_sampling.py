"""Unit tests of :func:`volcnn.engines.sampling.make_sampler` (class-balanced sampling of rare nodules)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from monai.data import DataLoader, Dataset
from torch.utils.data import WeightedRandomSampler

from volcnn.engines.sampling import make_sampler

DRAWS = 20_000


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    """The samplers draw from torch's global generator, which the tests seed; put it back afterwards."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _entries(positives: int = 1, negatives: int = 50) -> list[dict]:
    return [{"image": f"p{i}.nii.gz", "label": 1} for i in range(positives)] + [
        {"image": f"n{i}.nii.gz", "label": 0} for i in range(negatives)
    ]


def _positive_fraction(entries: list[dict], mode: str, seed: int = 0) -> float:
    sampler = make_sampler(entries, mode, num_samples=DRAWS)
    assert isinstance(sampler, WeightedRandomSampler)
    torch.manual_seed(seed)
    drawn = list(sampler)
    assert len(drawn) == DRAWS
    counts = Counter(int(entries[i]["label"]) for i in drawn)
    return counts[1] / DRAWS


def test_shuffle_gives_no_sampler():
    assert make_sampler(_entries(), "shuffle") is None
    assert make_sampler([], "shuffle") is None  # plain shuffling needs no labels


def test_balanced_draws_each_class_about_equally_often():
    entries = _entries(1, 50)
    assert _positive_fraction(entries, "balanced") == pytest.approx(0.5, abs=0.02)
    # every sample of a class is equally likely
    torch.manual_seed(1)
    negatives = Counter(i for i in make_sampler(entries, "balanced", num_samples=DRAWS) if i >= 1)
    assert len(negatives) == 50
    assert max(negatives.values()) < 2 * min(negatives.values())


def test_sqrt_lies_between_shuffle_and_balanced():
    entries = _entries(1, 50)
    fraction = _positive_fraction(entries, "sqrt")
    natural = 1 / 51
    assert natural * 3 < fraction < 0.5 * 0.5
    assert fraction == pytest.approx(1 / (1 + 50**0.5), abs=0.015)  # 1 : sqrt(50)


def test_balanced_with_three_classes_and_string_labels():
    entries = [{"label": "2"}] * 3 + [{"label": "1"}] * 30 + [{"label": "0"}] * 300
    sampler = make_sampler(entries, "balanced", num_samples=DRAWS)
    torch.manual_seed(2)
    counts = Counter(int(entries[i]["label"]) for i in sampler)
    for k in (0, 1, 2):
        assert counts[k] / DRAWS == pytest.approx(1 / 3, abs=0.02)


def test_num_samples_defaults_to_the_dataset_size():
    entries = _entries(3, 17)
    sampler = make_sampler(entries, "balanced")
    assert sampler.num_samples == len(entries)
    assert sampler.replacement
    assert make_sampler(entries, "sqrt", num_samples=7).num_samples == 7


def test_draws_follow_torchs_global_generator():
    sampler = make_sampler(_entries(), "balanced")
    torch.manual_seed(5)
    first = list(sampler)
    torch.manual_seed(5)
    assert list(sampler) == first
    assert list(sampler) != first  # the generator moved on


def test_sampler_works_in_a_data_loader():
    entries = [{"x": torch.tensor([float(i)]), "label": int(i < 2)} for i in range(40)]
    torch.manual_seed(3)
    loader = DataLoader(Dataset(entries), batch_size=10, sampler=make_sampler(entries, "balanced", num_samples=400))
    labels = torch.cat([batch["label"] for batch in loader])
    assert len(labels) == 400
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("mode", ["oversample", "Balanced", "", None])
def test_unknown_mode_is_refused(mode):
    with pytest.raises(ValueError, match="not one of"):
        make_sampler(_entries(), mode)


@pytest.mark.parametrize("mode", ["balanced", "sqrt"])
def test_empty_training_set_is_refused(mode):
    with pytest.raises(ValueError, match="empty"):
        make_sampler([], mode)


def test_sampler_and_class_weighting_together_warn(caplog):
    with caplog.at_level(logging.INFO, logger="volcnn.engines.sampling"):
        make_sampler(_entries(), "balanced", class_weighting="inverse")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "class_weighting=inverse" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="volcnn.engines.sampling"):
        make_sampler(_entries(), "balanced", class_weighting="none")
        make_sampler(_entries(), "sqrt", class_weighting=None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "class counts {0: 50, 1: 1}" in caplog.text
