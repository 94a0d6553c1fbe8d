"""Percentile bootstrap intervals: coverage of the point estimate, reproducibility, stratification, failures."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.evaluation.conftest import binary_data
from volcnn.evaluation import bootstrap_ci, roc_auc, roc_auc_ci


def _auc_generic(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """``roc_auc`` wrapped so that ``bootstrap_ci`` takes its generic per-resample path."""
    return roc_auc(scores, labels)


@pytest.mark.parametrize("kind", ["random", "tied", "imbalanced"])
def test_auc_ci_contains_point_and_is_reproducible(kind):
    scores, labels = binary_data(kind)
    auc = roc_auc(scores, labels)
    lo, hi = roc_auc_ci(scores, labels, n_boot=300, seed=1)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo <= auc <= hi and lo < hi
    assert roc_auc_ci(scores, labels, n_boot=300, seed=1) == (lo, hi)
    assert roc_auc_ci(scores, labels, n_boot=300, seed=2) != (lo, hi)


@pytest.mark.parametrize("stratified", [True, False])
def test_vectorised_auc_path_equals_generic_path(stratified):
    scores, labels = binary_data("tied", n=150)
    stratify = labels if stratified else None
    fast = bootstrap_ci(roc_auc, scores, labels, n_boot=200, seed=3, stratify=stratify)
    slow = bootstrap_ci(_auc_generic, scores, labels, n_boot=200, seed=3, stratify=stratify)
    assert fast == pytest.approx(slow, abs=1e-12)
    if stratified:
        assert roc_auc_ci(scores, labels, n_boot=200, seed=3) == pytest.approx(fast, abs=1e-12)


def test_auc_ci_narrower_for_more_cases():
    small = roc_auc_ci(*binary_data("random", n=100, seed=4), n_boot=300)
    large = roc_auc_ci(*binary_data("random", n=2000, seed=4), n_boot=300)
    assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])


def test_auc_ci_level_nests():
    scores, labels = binary_data("random")
    lo95, hi95 = roc_auc_ci(scores, labels, n_boot=300, level=0.95)
    lo50, hi50 = roc_auc_ci(scores, labels, n_boot=300, level=0.5)
    assert lo95 < lo50 < hi50 < hi95


def test_auc_ci_perfect_separation_is_one():
    scores = np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 5)]
    labels = np.r_[np.zeros(20, dtype=int), np.ones(5, dtype=int)]
    assert roc_auc_ci(scores, labels, n_boot=200) == (1.0, 1.0)


def test_bootstrap_mean_matches_normal_theory():
    x = torch.as_tensor(np.random.default_rng(5).normal(10.0, 2.0, 400))
    lo, hi = bootstrap_ci(lambda v: float(v.mean()), x, n_boot=1000)
    se = float(x.std()) / np.sqrt(x.numel())
    mean = float(x.mean())
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.25 * se)


def test_stratified_resamples_keep_class_counts_and_rows_stay_paired():
    labels = torch.tensor([0] * 30 + [1] * 7)
    ids = torch.arange(37)
    seen: list[int] = []

    def positives(i: torch.Tensor, y: torch.Tensor) -> float:
        assert torch.equal(labels[i], y)  # the same rows of every tensor are drawn
        seen.append(int(y.sum()))
        return float(y.sum())

    assert bootstrap_ci(positives, ids, labels, n_boot=50, stratify=labels) == (7.0, 7.0)
    assert seen == [7] * 50
    lo, hi = bootstrap_ci(lambda i, y: float(y.sum()), ids, labels, n_boot=200)  # unstratified varies
    assert lo < 7 < hi


def test_failing_resamples_are_skipped_or_refused():
    scores, labels = binary_data("random", n=10, seed=6)
    labels = np.zeros(10, dtype=int)
    labels[0] = 1  # ~35% of unstratified resamples have no positive
    fast = roc_auc_ci(scores, labels, n_boot=200, stratified=False)
    slow = bootstrap_ci(_auc_generic, scores, labels, n_boot=200)
    assert fast == pytest.approx(slow, abs=1e-12)

    def always_fails(x: torch.Tensor) -> float:
        raise ValueError("no luck")

    with pytest.raises(ValueError, match=r"200 of 200 resamples.*no luck"):
        bootstrap_ci(always_fails, scores, n_boot=200)
    with pytest.raises(ValueError, match="resamples gave no metric value"):
        bootstrap_ci(lambda x: float("nan"), scores, n_boot=20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_boot": 0}, "n_boot must be a positive integer"),
        ({"level": 1.0}, r"level must be in \(0, 1\)"),
        ({"stratify": [0, 1]}, "same number of samples"),
    ],
)
def test_bootstrap_argument_errors(kwargs, match):
    scores, labels = binary_data("random", n=20)
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(roc_auc, scores, labels, **kwargs)


def test_bootstrap_input_errors():
    with pytest.raises(ValueError, match="same number of samples"):
        bootstrap_ci(roc_auc, [0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="at least one input"):
        bootstrap_ci(roc_auc)
    with pytest.raises(ValueError, match="only one class"):
        roc_auc_ci([0.1, 0.2, 0.3], [1, 1, 1])


def test_auc_ci_speed():
    scores, labels = binary_data("random", n=5000, seed=7)
    roc_auc_ci(scores, labels, n_boot=10)  # warm-up
    start = time.perf_counter()
    roc_auc_ci(scores, labels, n_boot=1000)
    assert time.perf_counter() - start < 2.0  # typically ~0.1-0.3 s; generous for loaded CI machines


@pytest.mark.parametrize("stratified", [False, True])
def test_resamples_are_the_documented_draws_of_the_seeded_generator(stratified):
    """The reported intervals stay the same across releases only if the resamples do: a generator seeded with
    ``seed``, one ``randint`` per chunk of resamples (per stratum, strata in sorted label order)."""
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    ids = torch.arange(labels.numel())
    drawn: list[list[int]] = []
    bootstrap_ci(lambda i, y: drawn.append(i.tolist()) or 0.0, ids, labels, n_boot=5, seed=11,
                 stratify=labels if stratified else None)  # fmt: skip
    g = torch.Generator().manual_seed(11)
    n, b = labels.numel(), 5
    if stratified:
        strata = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
        draws = [torch.randint(0, s.numel(), (b * s.numel(),), generator=g).view(b, -1) for s in strata]
        expected = torch.cat([s[d] for s, d in zip(strata, draws, strict=True)], dim=1)
    else:
        expected = torch.randint(0, n, (b * n,), generator=g).view(b, n)
    assert drawn == expected.tolist()
