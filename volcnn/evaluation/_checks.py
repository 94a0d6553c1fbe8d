"""Input conversion and validation shared by the metric modules (private).

Every public metric converts its inputs here so that the error messages are the same everywhere: a tensor is
detached and moved to the CPU (metrics are cheap and return Python numbers), anything else goes through
``numpy.asarray`` first so that a list of Python floats stays float64 instead of becoming float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

__all__ = [
    "PROB_SUM_ATOL",
    "TensorLike",
    "as_labels",
    "as_probs",
    "as_scores",
    "as_scores_2d",
    "binary_inputs",
    "check_same_length",
    "require_both_classes",
    "to_tensor",
]

TensorLike: TypeAlias = torch.Tensor | np.ndarray | Sequence[Any]
"""Anything ``torch.as_tensor`` accepts: a tensor, a NumPy array or a (nested) sequence of numbers."""

PROB_SUM_ATOL = 1e-3
"""How far a row of class probabilities may sum from 1 (float32 softmax is within ~1e-6; logits are far off)."""


def to_tensor(x: TensorLike, name: str) -> torch.Tensor:
    """``x`` as a CPU tensor (detached; the dtype of a tensor or array is kept)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        arr = np.asarray(x)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise TypeError(f"unsupported element type {arr.dtype}")
        return torch.tensor(arr)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} could not be converted to a tensor: {err}") from err


def _check_1d(t: torch.Tensor, name: str) -> None:
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (N,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")


def _check_real_finite(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    t = t.to(torch.float64)
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite values (NaN or inf)")
    return t


def as_scores(x: TensorLike, name: str = "scores") -> torch.Tensor:
    """Scores as a finite float64 tensor of shape ``(N,)``, ``N >= 1``.

    Raises:
        ValueError: for a shape other than ``(N,)``, an empty input, or NaN/inf values.
    """
    t = to_tensor(x, name)
    _check_1d(t, name)
    return _check_real_finite(t, name)


def as_scores_2d(x: TensorLike, name: str = "scores") -> torch.Tensor:
    """Per-class scores as a finite float64 tensor of shape ``(N, K)``, ``N >= 1``, ``K >= 2``.

    Unlike ``as_probs`` the values may be any real numbers (logits, or half-precision probabilities whose rows are
    further from 1 than ``PROB_SUM_ATOL``): rank metrics only compare them.

    Raises:
        ValueError: for another shape, an empty input, or NaN/inf values.
    """
    t = to_tensor(x, name)
    if t.ndim != 2 or t.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, K) with K >= 2, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample")
    return _check_real_finite(t, name)


def as_labels(x: TensorLike, name: str = "labels", num_classes: int | None = None) -> torch.Tensor:
    """Integer class indices as an int64 tensor of shape ``(N,)``.

    Booleans become 0/1; floating-point input is accepted only when every value is a whole number.

    Raises:
        ValueError: for a shape other than ``(N,)``, non-integer values, or (with ``num_classes``) values outside
            ``[0, num_classes)``.
    """
    t = to_tensor(x, name)
    _check_1d(t, name)
    if t.dtype == torch.bool:
        t = t.long()
    elif t.is_complex():
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    elif t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != torch.round(t))
        if bad.any():
            example = float(t[bad][0])
            raise ValueError(f"{name} must be integer class indices, got non-integer value {example}")
        t = t.long()
    else:
        t = t.long()
    if num_classes is not None:
        bad = (t < 0) | (t >= num_classes)
        if bad.any():
            values = torch.unique(t[bad])[:5].tolist()
            raise ValueError(f"{name} has values {values} outside [0, {num_classes}) (num_classes={num_classes})")
    return t


def as_probs(x: TensorLike, name: str = "probs") -> torch.Tensor:
    """Probabilities as float64: ``(N,)`` positive-class probabilities or ``(N, K)`` rows summing to 1, K >= 2.

    Raises:
        ValueError: for another shape, values outside ``[0, 1]`` or NaN, or (2-D) rows that do not sum to 1
            within ``PROB_SUM_ATOL``.
    """
    t = to_tensor(x, name)
    if t.ndim == 1:
        _check_1d(t, name)
    elif t.ndim == 2:
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty; metrics need at least one sample")
        if t.shape[1] < 2:
            raise ValueError(f"{name} of shape (N, K) needs K >= 2 classes, got shape {tuple(t.shape)}")
    else:
        raise ValueError(f"{name} must have shape (N,) or (N, K), got shape {tuple(t.shape)}")
    t = _check_real_finite(t, name)
    outside = (t < 0) | (t > 1)
    if outside.any():
        raise ValueError(
            f"{name} must be probabilities in [0, 1]; {int(outside.sum())} values are outside "
            f"(min {float(t.min()):.4g}, max {float(t.max()):.4g}) - pass softmax/sigmoid outputs, not logits"
        )
    if t.ndim == 2:
        dev = (t.sum(dim=1) - 1).abs()
        if (dev > PROB_SUM_ATOL).any():
            raise ValueError(
                f"{name} rows must sum to 1 (class probabilities); {int((dev > PROB_SUM_ATOL).sum())} rows are off "
                f"by up to {float(dev.max()):.4g}"
            )
    return t


def check_same_length(**tensors: torch.Tensor) -> int:
    """The common length ``N`` of the first dimension of ``tensors``.

    Raises:
        ValueError: naming the inputs whose lengths differ.
    """
    lengths = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(lengths.values())) > 1:
        parts = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inputs must have the same number of samples: {parts}")
    return next(iter(lengths.values()))


def binary_inputs(scores: TensorLike, labels: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated binary inputs: float64 scores ``(N,)`` and int64 0/1 labels ``(N,)`` of the same length."""
    s = as_scores(scores)
    y = as_labels(labels, num_classes=2)
    check_same_length(scores=s, labels=y)
    return s, y


def require_both_classes(y: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` saying that ``what`` is undefined unless the 0/1 labels ``y`` have both classes."""
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{what} is undefined when only one class is present: labels have {n_pos} positives and {n_neg} negatives"
        )
