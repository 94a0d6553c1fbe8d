"""Class-balanced sampling for training sets where nodules are rare (LUNA16: about 1 in 500 candidates).

One process: :func:`make_sampler` (a ``WeightedRandomSampler`` on torch's global RNG, which checkpoints save).
Under DDP: :class:`ShardSampler`, a ``DistributedSampler`` over the rank's own cached shard whose order is a
function of ``(seed, rank, epoch)``; MONAI's workflows call its ``set_epoch`` at every epoch start.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, WeightedRandomSampler

__all__ = ["make_sampler", "ShardSampler", "SAMPLING_MODES"]

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
    weight_list = _class_weights(entries, mode, class_weighting, num_samples)
    return WeightedRandomSampler(weight_list, num_samples=int(num_samples or len(entries)), replacement=True)


def _class_weights(
    entries: Sequence[dict[str, Any]], mode: str, class_weighting: str | None, num_samples: int | None
) -> list[float]:
    """Per-entry draw weights ``1 / count(class) ** power``; logs the expected draws per class."""
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
    return weight_list


class ShardSampler(DistributedSampler):
    """The sampler of one DDP rank over its own shard of the training set (:func:`volcnn.data.shard`).

    MONAI's recipe for cached DDP training (``partition_dataset`` + ``CacheDataset`` per rank) keeps each rank on
    its own part of the data, so that no rank caches the others'. This sampler draws from that part: a new
    permutation each epoch (``"shuffle"``), or with replacement at class-balanced (``"balanced"``) or
    square-root (``"sqrt"``) rates computed on the shard; stratified shards hold every class in the proportion
    of the whole set, so each rank's draws match a global sampler's. The order depends only on
    ``(seed, rank, epoch)``: ``set_epoch`` (called by MONAI's workflows at every epoch start, as for any
    ``DistributedSampler``) reshuffles, ranks draw independently, and a resumed run repeats the draws of the
    uninterrupted one without saved generator state.

    Args:
        entries: this rank's shard (the dataset's ``data``), each with a ``label`` unless ``mode`` is shuffle.
        mode: one of :data:`SAMPLING_MODES`.
        seed: the run's seed; the same on every rank (``None``: a fresh one, so a resumed run draws anew).
        rank: this rank (mixes into the stream); default torch.distributed's, else 0.
        num_samples: draws per epoch (default ``len(entries)``); must be the same on every rank.
        class_weighting: the loss weighting in use, only to warn when both correct the imbalance.
        population: the whole training datalist, to warn when this shard lacks a class that the set has.

    Raises:
        ValueError: an unknown mode or an empty shard.
    """

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        mode: str = "shuffle",
        seed: int | str | None = 0,
        rank: int | None = None,
        num_samples: int | None = None,
        class_weighting: str | None = None,
        population: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if mode not in SAMPLING_MODES:
            raise ValueError(f"sampling {mode!r} is not one of: {', '.join(SAMPLING_MODES)}")
        if not entries:
            raise ValueError("this rank's training shard is empty: fewer training entries than processes")
        unseeded = seed is None or str(seed).strip().lower() in ("none", "null", "")
        seed = int(torch.initial_seed() % 2**32) if unseeded else int(str(seed))
        super().__init__(entries, num_replicas=1, rank=0, shuffle=True, seed=seed)  # type: ignore[arg-type]
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.shard_rank = int(rank)
        self.mode = mode
        self.num_samples = int(num_samples or len(entries))
        self.total_size = self.num_samples
        self.weights: torch.Tensor | None = None
        if mode != "shuffle":
            self.weights = torch.tensor(_class_weights(entries, mode, class_weighting, num_samples), dtype=torch.double)
        if population is not None and mode != "shuffle":
            missing = {int(e["label"]) for e in population} - {int(e["label"]) for e in entries}
            if missing:
                logger.warning(
                    "rank %d's training shard has no entry of class %s: its batches never show them (the set has "
                    "fewer such entries than processes)", self.shard_rank, sorted(missing),
                )  # fmt: skip

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.shard_rank, self.epoch]).generate_state(1)[0]))
        return g

    def __iter__(self) -> Iterator[int]:
        g = self._generator()
        if self.weights is None:
            n = len(self.dataset)  # type: ignore[arg-type]
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-self.num_samples // n))])
            return iter(order[: self.num_samples].tolist())
        draws = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        return iter(draws.tolist())

    def __len__(self) -> int:
        return self.num_samples
