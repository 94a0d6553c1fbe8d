"""Reliability bins and ECE against scikit-learn's calibration_curve, a NumPy re-implementation and hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve

from tests.evaluation.conftest import multiclass_data
from volcnn.evaluation import expected_calibration_error, reliability_bins


def numpy_ece(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    """Straightforward ECE with ``(lower, upper]`` equal-width bins (first bin includes 0)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for b in range(n_bins):
        lower, upper = edges[b], edges[b + 1]
        in_bin = (confidence > lower) & (confidence <= upper) if b else (confidence <= upper)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidence[in_bin].mean() - outcome[in_bin].mean())
    return float(ece)


def binary_probs(n: int = 500, seed: int = 0, on_edges: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.integers(0, 11, n) / 10 if on_edges else rng.beta(2, 3, n)  # on_edges: 0, 0.1, ..., 1.0
    labels = (rng.random(n) < np.clip(probs * 1.2, 0, 1)).astype(np.int64)  # somewhat miscalibrated
    return probs, labels


@pytest.mark.parametrize(("n_bins", "on_edges"), [(10, False), (15, False), (10, True), (5, True)])
def test_binary_bins_match_sklearn_calibration_curve(n_bins, on_edges):
    probs, labels = binary_probs(on_edges=on_edges)
    bins = reliability_bins(torch.as_tensor(probs), torch.as_tensor(labels), n_bins=n_bins)
    assert set(bins) == {"bin_lower", "bin_upper", "mean_confidence", "observed_frequency", "count"}
    assert all(v.shape == (n_bins,) for v in bins.values())
    assert bins["count"].dtype == torch.int64 and bins["mean_confidence"].dtype == torch.float64
    prob_true, prob_pred = calibration_curve(labels, probs, n_bins=n_bins, strategy="uniform")
    nonempty = bins["count"] > 0
    np.testing.assert_allclose(bins["observed_frequency"][nonempty].numpy(), prob_true, rtol=1e-12)
    np.testing.assert_allclose(bins["mean_confidence"][nonempty].numpy(), prob_pred, rtol=1e-12)
    assert int(bins["count"].sum()) == probs.size
    assert bins["bin_lower"][0] == 0.0 and bins["bin_upper"][-1] == 1.0
    ece = expected_calibration_error(probs, labels, n_bins=n_bins)
    assert ece == pytest.approx(numpy_ece(probs, labels.astype(float), n_bins), abs=1e-12)
    assert ece > 0.02


@pytest.mark.parametrize("k", [2, 3, 4])
def test_top_label_ece_matches_numpy(k):
    probs, labels = multiclass_data(k, seed=k)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(
        numpy_ece(confidence, correct, 10), abs=1e-12
    )
    bins = reliability_bins(probs, labels, n_bins=10)
    assert torch.isnan(bins["mean_confidence"][0])  # top-label confidence is >= 1/K: the lowest bin is empty
    assert bins["count"][0] == 0


def test_ece_is_zero_for_perfectly_calibrated_bins():
    # 10 cases at 0.2 with 2 positives, 20 at 0.55 with 11, 4 at 1.0 with 4
    probs = np.r_[np.full(10, 0.2), np.full(20, 0.55), np.full(4, 1.0)]
    labels = np.r_[[1] * 2 + [0] * 8, [1] * 11 + [0] * 9, [1] * 4]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # top label: confidence 0.5 right half the time, 0.75 right three times in four
    rows = np.array([[0.5, 0.3, 0.2]] * 4 + [[0.1, 0.75, 0.15]] * 4)
    labels_k = np.array([0, 0, 1, 2, 1, 1, 1, 0])
    assert expected_calibration_error(rows, labels_k) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_computed():
    # two bins: [0, 0.5] holds 0.1 (neg), 0.3 (pos): |0.2 - 0.5| = 0.3; (0.5, 1] holds 0.8 (pos), 0.9 (neg):
    # |0.85 - 0.5| = 0.35; ECE = 0.5 * 0.3 + 0.5 * 0.35
    assert expected_calibration_error([0.1, 0.3, 0.8, 0.9], [0, 1, 1, 0], n_bins=2) == pytest.approx(0.325)
    bins = reliability_bins([0.1, 0.3, 0.8, 0.9], [0, 1, 1, 0], n_bins=4)
    assert bins["count"].tolist() == [1, 1, 0, 2]
    assert bins["mean_confidence"][[0, 1, 3]].tolist() == pytest.approx([0.1, 0.3, 0.85])
    assert bins["observed_frequency"][[0, 1, 3]].tolist() == [0.0, 1.0, 0.5]
    assert torch.isnan(bins["mean_confidence"][2]) and torch.isnan(bins["observed_frequency"][2])
    assert bins["bin_lower"].tolist() == [0.0, 0.25, 0.5, 0.75]
    # 0.5 sits on an edge and belongs to the lower bin (right-closed)
    assert reliability_bins([0.5], [1], n_bins=2)["count"].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("probs", "labels", "kwargs", "match"),
    [
        ([0.2, 1.3], [0, 1], {}, r"probabilities in \[0, 1\]"),
        ([0.2, float("nan")], [0, 1], {}, "non-finite"),
        ([0.2, 0.3], [0, 2], {}, r"outside \[0, 2\)"),
        ([0.2, 0.3], [0, 1, 1], {}, "same number of samples"),
        ([[0.3, 0.3], [0.5, 0.5]], [0, 1], {}, "rows must sum to 1"),
        ([[1.0], [1.0]], [0, 0], {}, "K >= 2"),
        ([0.2, 0.3], [0, 1], {"n_bins": 0}, "n_bins must be a positive integer"),
    ],
)
def test_calibration_errors(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels, **kwargs)
    with pytest.raises(ValueError, match=match):
        reliability_bins(probs, labels, **kwargs)
