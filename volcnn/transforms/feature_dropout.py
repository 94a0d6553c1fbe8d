"""Training-time dropout of clinical feature values: each value is hidden (set to NaN, the network's "missing") with
probability ``p``, so that a clinical or fusion model learns to work with the gaps real records have instead of
leaning on one feature that a patient may lack (the tabular counterpart of modality dropout).

It runs on the batch's raw features ``(B, C)`` in the trainer's ``prepare_batch``
(:class:`volcnn.engines.AugmentOnDevice`), draws from its own ``self.R`` like every MONAI ``Randomizable`` (so
an exact resume restores it, :mod:`volcnn.engines.rng_state`), and with ``p = 0`` draws nothing and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import Randomizable
from monai.utils import get_seed

__all__ = ["FeatureDropout"]


class FeatureDropout(Randomizable):
    """Hide each feature value of a batch with probability ``p``.

    Args:
        p: probability in [0, 1) that one feature of one sample is hidden.
        groups: for each raw column ``(C,)``, the index of its feature (one-hot columns of a categorical share one,
            so a hidden categorical is NaN in all its columns, as a missing value is encoded); None: one feature
            per column.

    Shapes:
        ``(B, C)`` float -> ``(B, C)``, the hidden values NaN.
    """

    def __init__(self, p: float = 0.0, groups: Sequence[int] | None = None) -> None:
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"feature dropout p must be in [0, 1), got {p}")
        self.p = float(p)
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        seed = get_seed()  # set by monai.utils.set_determinism; offset so that this stream is not the augmenter's
        self.set_random_state(seed=None if seed is None else seed + 1)

    def randomize(self, data: tuple[int, int]) -> np.ndarray:
        """A ``(B, F)`` bool mask of the values to hide, for ``data = (B, F)``."""
        return self.R.random_sample(data) < self.p

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return raw
        groups = self.groups if self.groups is not None else np.arange(raw.shape[1])
        if len(groups) != raw.shape[1]:
            raise ValueError(f"features have {raw.shape[1]} columns, the dropout was built for {len(groups)}")
        hide = self.randomize((int(raw.shape[0]), int(groups.max()) + 1))[:, groups]
        return raw.masked_fill(torch.from_numpy(hide).to(raw.device), float("nan"))
