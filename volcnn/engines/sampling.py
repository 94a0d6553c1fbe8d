"""Class-balanced sampling for training sets where nodules are rare (LUNA16: about 1 in 500 candidates)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import WeightedRandomSampler

__all__ = ["make_sampler", "SAMPLING_MODES"]

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("shuffle", "balanced", "sqrt")


def make_sampler(
    entries: Sequence[dict[str, Any]],
    mode: str = "shuffle",
    class_weighting: str | None = None,
    num_samples: int | None = None,
) -> WeightedRandomSampler | None:
    """A sampler drawing each class about equally often (``"balanced"``) or in proportion to the square root
    of its frequency (``"sqrt"``); ``None`` for plain shuffling (``"shuffle"``).

    Samples are drawn with replacement, ``num_samples`` per epoch (default: the dataset size), using torch's
    global RNG, which the checkpoints save. Combining it with ``class_weighting`` corrects the imbalance twice;
    that is allowed but logged as a warning.

    Raises:
        ValueError: for an unknown mode or an empty training set.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling {mode!r} is not one of: {', '.join(SAMPLING_MODES)}")
    if mode == "shuffle":
        return None
    if not entries:
        raise ValueError("cannot build a class-balanced sampler for an empty training set")
    labels = [int(e["label"]) for e in entries]
    counts = Counter(labels)
    power = 1.0 if mode == "balanced" else 0.5
    weight_list = [1.0 / counts[k] ** power for k in labels]
    weights = torch.tensor(weight_list, dtype=torch.double)
    if class_weighting not in (None, "none"):
        logger.warning(
            "sampling=%s and class_weighting=%s both correct class imbalance; set one of them to none",
            mode, class_weighting,
        )  # fmt: skip
    n = int(num_samples or len(labels))
    expected = {k: round(float(weights[torch.tensor(labels) == k].sum() / weights.sum()) * n, 1) for k in counts}
    logger.info("class counts %s; %s sampling draws about %s per epoch", dict(sorted(counts.items())), mode, expected)
    return WeightedRandomSampler(weight_list, num_samples=n, replacement=True)
