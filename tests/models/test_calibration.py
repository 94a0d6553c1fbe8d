"""Platt scaling (``volcnn.models.calibration.fit_platt``): recovers a known miscalibration, stays finite on a
separable validation set, does not depend on the cases' order, refuses what it cannot fit."""

from __future__ import annotations

import numpy as np
import pytest

from volcnn.models.calibration import Calibration, fit_platt


def _miscalibrated(n: int, a: float, b: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``p`` whose true probability of the positive class is ``sigmoid(a * logit(p) + b)``."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    truth = Calibration(a, b).apply(p)
    return p, (rng.uniform(size=n) < truth).astype(int)


def test_recovers_a_known_miscalibration():
    p, y = _miscalibrated(20000, a=0.5, b=-1.0)
    fitted = fit_platt(p, y)
    assert fitted.a == pytest.approx(0.5, abs=0.05) and fitted.b == pytest.approx(-1.0, abs=0.08)
    assert (fitted.num_cases, fitted.num_positive) == (20000, int(y.sum()))
    grid = np.linspace(0.05, 0.95, 19)
    assert np.abs(fitted.apply(grid) - Calibration(0.5, -1.0).apply(grid)).max() < 0.03


def test_same_fit_as_scikit_learns_platt_scaling():
    """``CalibratedClassifierCV(method="sigmoid")`` fits the same soft-target model (its private helper, on logits)."""
    calibration = pytest.importorskip("sklearn.calibration")
    if not hasattr(calibration, "_sigmoid_calibration"):
        pytest.skip("this scikit-learn has no _sigmoid_calibration to compare with")
    p, y = _miscalibrated(300, a=1.4, b=-0.8, seed=2)
    minus_a, minus_b = calibration._sigmoid_calibration(np.log(p) - np.log1p(-p), y)
    fitted = fit_platt(p, y)
    assert fitted.a == pytest.approx(-minus_a, rel=1e-5) and fitted.b == pytest.approx(-minus_b, rel=1e-5, abs=1e-6)


def test_separable_validation_set_gives_a_finite_slope():
    """Hard 0/1 targets have no maximum-likelihood slope here; Platt's soft targets do."""
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.7, 0.9])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    fitted = fit_platt(p, y)
    assert np.isfinite(fitted.a) and 0 < fitted.a < 20
    calibrated = fitted.apply(p)
    # no calibrated probability reaches the soft targets' bounds: 1/(N- + 2) = 1/6 and (N+ + 1)/(N+ + 2) = 4/5
    assert calibrated.min() > 0.02 and calibrated.max() < 0.98
    assert np.all(np.diff(calibrated) > 0)  # monotonic: no ranking changes


def test_order_of_the_cases_does_not_change_the_fit():
    p, y = _miscalibrated(50, a=2.0, b=0.3, seed=4)
    order = np.random.default_rng(1).permutation(50)
    assert fit_platt(p, y) == fit_platt(p[order], y[order])


@pytest.mark.parametrize(
    "p, y, message",
    [
        ([0.2, 0.8, 0.9], [0, 1, 1], "at least two cases of each outcome"),
        ([0.2, np.nan, 0.5, 0.9], [0, 0, 1, 1], "finite"),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], "do not increase with the outcome"),
    ],
)
def test_refuses_what_it_cannot_fit(p, y, message):
    with pytest.raises(ValueError, match=message):
        fit_platt(np.asarray(p), np.asarray(y))
