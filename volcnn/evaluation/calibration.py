"""Calibration: reliability diagram bins and expected calibration error (ECE).

Binning: ``n_bins`` equal-width bins on ``[0, 1]`` with edges ``i * (1 / n_bins)`` (as ``numpy.linspace``), each
bin ``(lower, upper]`` closed on the right and the first one also containing 0 - the same assignment as
``sklearn.calibration.calibration_curve(strategy="uniform")``, which the tests compare with.

Kept hand-written (one ``bucketize`` and three bin sums): scikit-learn has no ECE, and ``calibration_curve``
returns the means of the non-empty bins only, without their counts, which both the reliability diagram (bar
heights) and the ECE (bin weights) need; recovering the counts would mean binning a second time. The ECE is
summed as ``sum_b |sum of confidences_b - sum of outcomes_b| / N``, one division instead of two per bin.

What is calibrated depends on the shape of ``probs``:

* ``(N,)``: the probability of the positive class against the 0/1 label, i.e. the reliability of P(y = 1)
  (``observed_frequency`` is the fraction of positives in a bin; bins span the whole ``[0, 1]``).
* ``(N, K)`` (K >= 2, including K = 2): the top-label confidence ``max_k probs[:, k]`` against whether the
  argmax prediction is correct (``observed_frequency`` is the accuracy in a bin; the confidence is >= 1/K).
"""

from __future__ import annotations

import torch

from volcnn.evaluation._checks import TensorLike, as_labels, as_probs, check_same_length

__all__ = ["expected_calibration_error", "reliability_bins"]


def _confidence_and_outcome(probs: TensorLike, labels: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and the matching 0/1 outcome, both float64 ``(N,)`` (see the module docstring)."""
    p = as_probs(probs)
    if p.ndim == 1:
        y = as_labels(labels, num_classes=2)
        check_same_length(probs=p, labels=y)
        return p.contiguous(), y.to(torch.float64)
    y = as_labels(labels, num_classes=p.shape[1])
    check_same_length(probs=p, labels=y)
    pred = torch.argmax(p, dim=1)
    conf = p.gather(1, pred[:, None])[:, 0]
    return conf, (pred == y).to(torch.float64)


def _bin_edges(n_bins: int) -> torch.Tensor:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    edges = torch.arange(int(n_bins) + 1, dtype=torch.float64) * (1.0 / n_bins)
    edges[-1] = 1.0
    return edges


def _bin_sums(
    conf: torch.Tensor, outcome: torch.Tensor, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_bins = edges.numel() - 1
    ids = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(ids, minlength=n_bins)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, ids, conf)
    sum_outcome = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, ids, outcome)
    return count, sum_conf, sum_outcome


def reliability_bins(probs: TensorLike, labels: TensorLike, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Per-bin statistics for a reliability diagram.

    Args:
        probs: ``(N,)`` positive-class probabilities or ``(N, K)`` class probabilities (rows sum to 1).
        labels: ``(N,)`` class indices (0/1 for ``(N,)`` probs).
        n_bins: number of equal-width bins.

    Returns:
        Tensors of shape ``(n_bins,)``: ``bin_lower``, ``bin_upper`` (float64 edges), ``mean_confidence`` and
        ``observed_frequency`` (float64; NaN for an empty bin) and ``count`` (int64, 0 for an empty bin).

    Raises:
        ValueError: for invalid probabilities or labels, mismatched lengths or ``n_bins < 1``.
    """
    edges = _bin_edges(n_bins)
    conf, outcome = _confidence_and_outcome(probs, labels)
    count, sum_conf, sum_outcome = _bin_sums(conf, outcome, edges)
    nan = torch.full_like(sum_conf, float("nan"))
    denom = count.clamp(min=1).to(torch.float64)
    return {
        "bin_lower": edges[:-1].clone(),
        "bin_upper": edges[1:].clone(),
        "mean_confidence": torch.where(count > 0, sum_conf / denom, nan),
        "observed_frequency": torch.where(count > 0, sum_outcome / denom, nan),
        "count": count,
    }


def expected_calibration_error(probs: TensorLike, labels: TensorLike, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / N) |mean_confidence_b - observed_frequency_b|``.

    Equal-width bins as in ``reliability_bins``; empty bins contribute nothing. For ``(N,)`` probs this is the
    calibration of P(y = 1); for ``(N, K)`` probs the top-label ECE of Guo et al. (2017).

    Args:
        probs: ``(N,)`` positive-class probabilities or ``(N, K)`` class probabilities (rows sum to 1).
        labels: ``(N,)`` class indices (0/1 for ``(N,)`` probs).
        n_bins: number of equal-width bins.

    Raises:
        ValueError: for invalid probabilities or labels, mismatched lengths or ``n_bins < 1``.
    """
    edges = _bin_edges(n_bins)
    conf, outcome = _confidence_and_outcome(probs, labels)
    _, sum_conf, sum_outcome = _bin_sums(conf, outcome, edges)
    return float((sum_conf - sum_outcome).abs().sum()) / conf.numel()
