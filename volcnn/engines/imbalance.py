"""Class-imbalance handling from the label counts of a datalist."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["class_weights"]

logger = logging.getLogger(__name__)


def class_weights(
    entries: Sequence[dict[str, Any]], num_classes: int, mode: str = "balanced", device: str | torch.device = "cpu"
) -> torch.Tensor | None:
    """Loss weights ``(K,)`` from the label counts of ``entries``, or ``None`` for ``mode="none"``.

    ``"balanced"`` gives class k the weight ``n / (K * n_k)`` (scikit-learn's convention), so every class
    contributes equally to the loss whatever its frequency; ``"sqrt"`` is the square root of that (a milder
    correction). Classes absent from the data get weight 0 and a warning.

    Raises:
        ValueError: for an unknown mode or a label outside ``[0, num_classes)``.
    """
    if mode in (None, "none"):
        return None
    if mode not in ("balanced", "sqrt"):
        raise ValueError(f"class weighting {mode!r} is not one of: balanced, sqrt, none")
    counts = Counter(int(e["label"]) for e in entries)
    bad = sorted(k for k in counts if not 0 <= k < num_classes)
    if bad:
        raise ValueError(f"labels {bad} are outside [0, {num_classes}) (num_classes={num_classes})")
    n = sum(counts.values())
    weights = torch.zeros(num_classes, dtype=torch.float32)
    for k in range(num_classes):
        if counts.get(k, 0) == 0:
            logger.warning("class %d has no training samples; its loss weight is 0", k)
            continue
        weights[k] = n / (num_classes * counts[k])
    if mode == "sqrt":
        weights = weights.sqrt()
    logger.info("class counts %s -> loss weights %s", dict(sorted(counts.items())), weights.tolist())
    return weights.to(device)
