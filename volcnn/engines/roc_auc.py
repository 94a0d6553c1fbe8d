"""The training and validation ROC AUC (``train_auc``/``val_auc``): the evaluation's scikit-learn AUC as an Ignite
metric, gathered over every rank.

The best model is chosen on ``val_auc``, so it must be the same AUC the evaluation report computes
(:func:`volcnn.evaluation.mean_ovr_auc`, scikit-learn's ``roc_auc_score``), not a second implementation (MONAI's
``ROCAUC`` handler has its own). Ignite's ``ROC_AUC`` calls scikit-learn too, but gathers with
``idist.all_gather``, which needs the same number of cases on every rank; validation splits a section over the
ranks without padding (``volcnn.data.shard(..., even_divisible=False)``), so the ranks' counts differ: with 15 and
8 cases on two gloo ranks, pytorch-ignite 0.5.5's ``ROC_AUC.compute`` aborts the processes (``gloo::EnforceNotMet``,
SIGABRT). :class:`RocAuc` keeps Ignite's storage and gathers the ranks' cases as objects instead
(``tests/distributed/test_roc_auc_gather.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from ignite.exceptions import NotComputableError
from ignite.metrics import EpochMetric

from volcnn.engines.dist import world_size
from volcnn.evaluation import mean_ovr_auc, roc_auc

__all__ = ["RocAuc", "auc_of_outputs"]


def auc_of_outputs(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """ROC AUC of an epoch's outputs, or NaN (with a warning) where it is undefined.

    Args:
        preds: ``(N, K)`` class scores (the evaluator's softmax probabilities), or ``(N,)`` positive-class scores.
        targets: ``(N, K)`` one-hot labels (the bundle's ``AsDiscreted(to_onehot=K)``) or ``(N,)`` class indices.

    Returns:
        ``mean_ovr_auc`` of ``(N, K)`` scores, ``roc_auc`` of ``(N,)`` scores; NaN when a class is absent or is
        the only one present, as MONAI's ``ROCAUC`` returned, so that a small validation set of one class logs a
        NaN instead of stopping training.
    """
    labels = targets.argmax(dim=1) if targets.ndim == 2 else targets.reshape(-1).round().long()
    try:
        return mean_ovr_auc(preds, labels) if preds.ndim == 2 else roc_auc(preds, labels)
    except ValueError as err:
        if "undefined" not in str(err):  # a one-class section; bad scores (NaN, wrong shape) still raise
            raise
        warnings.warn(f"ROC AUC is NaN: {err}", stacklevel=2)
        return math.nan


class RocAuc(EpochMetric):
    """Ignite metric: ROC AUC (:func:`auc_of_outputs`) of all the cases an engine saw in an epoch, on all ranks.

    Use it where MONAI's ``ROCAUC`` was, with the same output transform (``from_engine(["pred", "label"])``:
    lists of ``(K,)`` probabilities and one-hot labels, which Ignite stacks into ``(N, K)``). Under DDP every
    rank's cases are gathered (in rank order; the AUC does not depend on the order) and every rank computes the
    same value from them, so the metric describes the whole section, not a mean of per-rank AUCs.

    Args:
        output_transform: engine output -> ``(preds, targets)``.
        device: where the outputs are stored during the epoch.
    """

    def __init__(self, output_transform: Callable[[Any], Any] = lambda x: x, device: str | torch.device = "cpu"):
        super().__init__(auc_of_outputs, output_transform=output_transform, check_compute_fn=False, device=device)

    def compute(self) -> float:
        if self._result is None:
            preds, targets = self._predictions, self._targets
            if world_size() > 1:  # a collective: every rank calls it, also one that saw no case
                parts: list[Any] = [None] * world_size()
                dist.all_gather_object(parts, ([p.cpu() for p in preds], [t.cpu() for t in targets]))
                preds = [p for rank_preds, _ in parts for p in rank_preds]
                targets = [t for _, rank_targets in parts for t in rank_targets]
            if not preds:
                raise NotComputableError("RocAuc must have at least one example before it can be computed.")
            self._result = self.compute_fn(torch.cat(preds), torch.cat(targets))
        return self._result
