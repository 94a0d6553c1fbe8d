"""Synthetic scores and labels for the metric tests."""

from __future__ import annotations

import numpy as np
import pytest


def binary_data(kind: str, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float64 (N,), labels int64 (N,))`` of a given flavour, informative but imperfect."""
    rng = np.random.default_rng(seed)
    if kind == "imbalanced":  # one positive among 500
        labels = np.zeros(500, dtype=np.int64)
        labels[rng.integers(500)] = 1
        return rng.random(500), labels
    labels = (rng.random(n) < 0.4).astype(np.int64)
    scores = rng.normal(labels * 0.8, 1.0)
    if kind == "random":
        return scores, labels
    if kind == "tied":  # probabilities rounded to one decimal: ~11 distinct values, many ties across classes
        return np.round(1 / (1 + np.exp(-scores)), 1), labels
    if kind == "integer":
        return np.clip(np.round(scores * 2), -3, 3), labels
    raise ValueError(kind)


BINARY_KINDS = ["random", "tied", "imbalanced", "integer"]


@pytest.fixture(params=BINARY_KINDS)
def binary_case(request) -> tuple[np.ndarray, np.ndarray]:
    return binary_data(request.param)


def multiclass_data(k: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(probs float64 (N, K) rows summing to 1, labels int64 (N,))`` with some signal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True), labels
