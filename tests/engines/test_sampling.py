"""Unit tests of :func:`volcnn.engines.sampling.make_sampler` (class-balanced sampling of rare nodules)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from monai.data import DataLoader, Dataset
from torch.utils.data import WeightedRandomSampler

from volcnn.engines.sampling import ShardSampler, make_sampler

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


# --- ShardSampler (DDP) ------------------------------------------------------------------------------------------


def _order(sampler: ShardSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_shard_sampler_is_a_function_of_seed_rank_and_epoch():
    """The same (seed, rank, epoch) gives the same order whatever the global RNG did (so a resumed rank repeats
    the uninterrupted run's draws); another epoch, rank or seed gives another order."""
    entries = _entries(positives=5, negatives=35)
    sampler = ShardSampler(entries, "shuffle", seed=7, rank=0)
    first = _order(sampler, 1)
    torch.manual_seed(123)
    assert _order(ShardSampler(entries, "shuffle", seed=7, rank=0), 1) == first
    assert sorted(first) == list(range(len(entries)))  # a permutation: each entry once per epoch
    assert _order(sampler, 2) != first
    assert _order(ShardSampler(entries, "shuffle", seed=7, rank=1), 1) != first
    assert _order(ShardSampler(entries, "shuffle", seed=8, rank=0), 1) != first


@pytest.mark.parametrize("mode, expected", [("balanced", 0.5), ("sqrt", 5**0.5 / (5**0.5 + 95**0.5))])
def test_shard_sampler_draws_classes_at_the_configured_rate(mode, expected):
    entries = _entries(positives=5, negatives=95)
    sampler = ShardSampler(entries, mode, seed=0, rank=1, num_samples=DRAWS)
    drawn = _order(sampler, 3)
    assert len(drawn) == len(sampler) == DRAWS
    assert Counter(int(entries[i]["label"]) for i in drawn)[1] / DRAWS == pytest.approx(expected, abs=0.015)


def test_shard_sampler_warns_when_its_shard_lacks_a_class(caplog):
    population = _entries(positives=1, negatives=9)
    with caplog.at_level(logging.WARNING):
        ShardSampler(population[1:], "balanced", rank=1, population=population)
    assert "rank 1's training shard has no entry of class [1]" in caplog.text
    with pytest.raises(ValueError, match="empty"):
        ShardSampler([], "shuffle")
    with pytest.raises(ValueError, match="not one of"):
        ShardSampler(population, "oversample")


def test_monai_workflows_reshuffle_a_shard_sampler_every_epoch():
    """MONAI's Workflow calls ``set_epoch`` on DistributedSampler instances at each epoch start; ShardSampler is one,
    so a trainer sees a different order each epoch, and the order of epoch e is that of ``set_epoch(e)``."""
    from monai.engines import SupervisedTrainer

    entries = [{"image": torch.full((1, 2), float(i)), "label": torch.tensor(i % 2)} for i in range(12)]
    sampler = ShardSampler(entries, "shuffle", seed=3, rank=0)
    loader = DataLoader(Dataset(entries), batch_size=12, sampler=sampler)
    seen: list[list[int]] = []
    net = torch.nn.Linear(2, 2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=loader, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0), loss_function=torch.nn.CrossEntropyLoss(),
        iteration_update=lambda engine, batch: seen.append(batch["image"][:, 0, 0].long().tolist()),
    )  # fmt: skip
    trainer.run()
    reference = ShardSampler(entries, "shuffle", seed=3, rank=0)
    assert seen == [_order(reference, e) for e in (1, 2, 3)]
    assert len({tuple(s) for s in seen}) == 3
