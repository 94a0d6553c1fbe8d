"""A model's probability calibration, fitted on the validation patients and stored with its weights.

The classifier is trained with class-weighted loss on candidate patches (few nodules, many negatives), so its
softmax probability is a score, not a frequency: the demo model gave p > 0.89 to 20 findings of one real CT. Platt
scaling maps the positive-class probability ``p`` to ``sigmoid(a * logit(p) + b)``, with ``a`` and ``b`` fitted by
maximum likelihood (scikit-learn's ``LogisticRegression`` on ``logit(p)``, practically unregularised, against Platt's
soft targets so that a separable validation set gives a finite slope) on the validation patients' candidates, which
training never used. ``a`` undoes over- or under-confidence (a temperature, ``T = 1 / a``), ``b`` the prior shift
that class weighting introduces. The map is monotonic, so it changes no
ranking: AUCs and FROC curves stay as they are; what changes is what a probability means.

The evaluate overlay fits it (``RUN/calibration.json``), ``volcnn package`` copies it to
``BUNDLE/models/calibration.json``, and inference applies it to the heat map before findings are read off
(``findings.json`` then reports calibrated probabilities and names the calibration it used).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_json
from volcnn.core.errors import VolcnnError

__all__ = ["CALIBRATION_FILE", "Calibration", "CalibrationError", "fit_platt", "read_calibration"]

#: file name of a calibration, in a run folder and in a bundle's ``models/``
CALIBRATION_FILE = "calibration.json"
#: probabilities are clipped to [EPS, 1 - EPS] before the logit (a float32 softmax saturates at 0 and 1)
EPS = 1e-7


class CalibrationError(VolcnnError, ValueError):
    """A calibration file cannot be used; the message names it (exit code 1)."""


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the probability of ``class_index``: ``sigmoid(a * logit(p) + b)``.

    Attributes:
        a: slope on the logit (``1 / temperature``).
        b: offset on the logit.
        class_index: the class whose probability is calibrated (1 = nodule).
        method: ``"platt"``.
        fitted_on: the cases it was fitted on (``"validation"``).
        num_cases: how many, and ``num_positive`` of them positive.
    """

    a: float
    b: float
    class_index: int = 1
    method: str = "platt"
    fitted_on: str = "validation"
    num_cases: int = 0
    num_positive: int = 0

    def apply(self, p: np.ndarray | float) -> np.ndarray:
        """Calibrated probabilities of ``p`` (any shape), float32 where ``p`` is float32, float64 otherwise."""
        x = np.asarray(p)
        dtype = np.float32 if x.dtype == np.float32 else np.float64
        q = np.clip(x.astype(np.float64), EPS, 1.0 - EPS)
        z = self.a * (np.log(q) - np.log1p(-q)) + self.b
        return (1.0 / (1.0 + np.exp(-z))).astype(dtype)

    def invert(self, q: float) -> float:
        """The uncalibrated probability whose calibrated value is ``q`` (``q`` in (0, 1); 0 and 1 map to 0, 1)."""
        if q <= 0.0 or q >= 1.0:
            return float(q)
        z = (math.log(q) - math.log1p(-q) - self.b) / self.a
        return float(1.0 / (1.0 + math.exp(-z)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON, atomically; returns the path."""
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "calibration") -> Calibration:
        """The calibration of a dict as :meth:`to_dict` writes it.

        Raises:
            CalibrationError: an unknown method, or ``a`` / ``b`` missing or not finite, naming ``source``.
        """
        if doc.get("method", "platt") != "platt":
            raise CalibrationError(f"{source}: unknown calibration method {doc.get('method')!r} (expected 'platt')")
        try:
            a, b = float(doc["a"]), float(doc["b"])
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"{source}: a calibration needs numbers 'a' and 'b' ({e})") from e
        if not (math.isfinite(a) and math.isfinite(b)) or a <= 0:
            raise CalibrationError(f"{source}: a = {a}, b = {b}: a must be positive and both finite")
        return cls(
            a=a,
            b=b,
            class_index=int(doc.get("class_index", 1)),
            fitted_on=str(doc.get("fitted_on", "validation")),
            num_cases=int(doc.get("num_cases", 0)),
            num_positive=int(doc.get("num_positive", 0)),
        )


def fit_platt(
    probs: np.ndarray, labels: np.ndarray, class_index: int = 1, fitted_on: str = "validation"
) -> Calibration:
    """Fit Platt scaling to the probabilities of ``class_index`` and their labels.

    Args:
        probs: ``(N,)`` probabilities of ``class_index``.
        labels: ``(N,)`` class indices (positive: ``== class_index``).
        class_index: the class calibrated.
        fitted_on: recorded in the result.

    Raises:
        ValueError: fewer than two cases of either outcome (the fit is undefined), or non-finite probabilities.
    """
    from sklearn.linear_model import LogisticRegression

    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = (np.asarray(labels).reshape(-1) == class_index).astype(np.int64)
    if p.shape != y.shape or not np.all(np.isfinite(p)):
        raise ValueError(f"expected finite probabilities and labels of the same length, got {p.shape}, {y.shape}")
    positives = int(y.sum())
    if positives < 2 or len(y) - positives < 2:
        raise ValueError(f"calibration needs at least two cases of each outcome, got {positives} of {len(y)} positive")
    order = np.lexsort((y, p))  # the fit's last digits depend on the cases' order (DDP gathers reorder): fix it
    p, y = p[order], y[order]
    q = np.clip(p, EPS, 1.0 - EPS)
    logit = (np.log(q) - np.log1p(-q))[:, None]
    # Platt's (1999) targets: (N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives, not 1 and 0. Validation
    # sets are small and often separable (AUC 1.0), where hard targets drive the slope towards infinity and every
    # calibrated probability to 0 or 1; the soft targets keep it finite. Each case enters twice, as a positive with
    # weight t and a negative with weight 1 - t (cross-entropy against the soft target t).
    target = np.where(y == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (len(y) - positives + 2.0))
    model = LogisticRegression(C=1e6, tol=1e-10, max_iter=10000).fit(
        np.concatenate([logit, logit]),
        np.concatenate([np.ones_like(y), np.zeros_like(y)]),
        sample_weight=np.concatenate([target, 1.0 - target]),
    )
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:  # the scores rank the outcomes backwards: a calibration would invert them
        raise ValueError(f"the probabilities do not increase with the outcome (fitted slope {a:.3g}); not calibrating")
    return Calibration(a, b, class_index, "platt", fitted_on, len(y), positives)


def read_calibration(path: str | os.PathLike[str] | None) -> Calibration | None:
    """The calibration in ``path``; None when ``path`` is None or the file does not exist (an uncalibrated model).

    Raises:
        CalibrationError: the file exists but cannot be read or used, naming it.
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the calibration ({e})") from e
    if not isinstance(doc, Mapping):
        raise CalibrationError(f"{path}: a calibration is a JSON object")
    return Calibration.from_dict(doc, str(path))
