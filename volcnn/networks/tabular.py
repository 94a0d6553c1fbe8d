"""Networks over clinical features: the normaliser that carries the training split's statistics, a small MLP
branch, and the clinical-only classifier.

The raw features ``(B, C)`` are :func:`volcnn.io.features.FeatureSpec.encode`'s layout (NaN where missing).
:class:`FeatureNormalizer` holds the imputation value and scale of every column as *buffers*, learnt on the training
split only (:func:`volcnn.io.features.fit_feature_stats`): they are saved in every checkpoint and in the packaged
``model.pt``, so evaluation and inference apply exactly what training learnt, with nothing to keep in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from volcnn.io.features import FeatureSpec, parse_feature_spec

__all__ = ["ClinicalClassifier", "FeatureNormalizer", "TabularBranch", "broadcast_features"]


class FeatureNormalizer(nn.Module):
    """Impute, standardise and flag missing values.

    Args:
        spec: the declared features (their raw layout, ``C`` columns).
        stats: ``{"mean": (C,), "std": (C,)}`` from :func:`~volcnn.io.features.fit_feature_stats`; None gives
            zeros and ones, to be replaced by a checkpoint's values (``load_state_dict``).

    Shapes:
        ``(B, C)`` raw (NaN = missing) -> ``(B, C + F)``: the columns ``(x - mean) / std`` with a missing value at
        0 (its training mean), then one missingness indicator (0/1) per feature ``F``.
    """

    def __init__(self, spec: FeatureSpec | Mapping[str, Any], stats: Mapping[str, Sequence[float]] | None = None):
        super().__init__()
        spec = parse_feature_spec(spec)
        c = spec.n_columns
        mean = torch.zeros(c) if stats is None else torch.as_tensor(stats["mean"], dtype=torch.float32)
        std = torch.ones(c) if stats is None else torch.as_tensor(stats["std"], dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,):
            raise ValueError(f"feature statistics have shapes {tuple(mean.shape)}, {tuple(std.shape)}; expected ({c},)")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("feature statistics must be finite with std > 0")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        groups = torch.as_tensor(spec.column_groups(), dtype=torch.long)
        first = torch.as_tensor([spec.column_slice(n).start for n in spec.names], dtype=torch.long)
        self.register_buffer("first_column", first, persistent=False)
        self.register_buffer("groups", groups, persistent=False)
        self.n_columns = c
        self.n_features = len(spec.names)

    @property
    def out_features(self) -> int:
        """C + F."""
        return self.n_columns + self.n_features

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.ndim != 2 or raw.shape[1] != self.n_columns:
            raise ValueError(f"features must be (B, {self.n_columns}), got {tuple(raw.shape)}")
        raw = raw.float()
        missing = torch.isnan(raw)
        x = (torch.where(missing, self.mean, raw) - self.mean) / self.std
        return torch.cat([x, missing[:, self.first_column].float()], dim=1)


class TabularBranch(nn.Module):
    """Normaliser then a two-layer MLP: ``(B, C)`` raw -> ``(B, hidden)`` embedding."""

    def __init__(
        self,
        spec: FeatureSpec | Mapping[str, Any],
        stats: Mapping[str, Sequence[float]] | None = None,
        hidden: int = 32,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.normalize = FeatureNormalizer(spec, stats)
        self.mlp = nn.Sequential(
            nn.Linear(self.normalize.out_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.out_features = hidden

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normalize(raw))


def broadcast_features(features: torch.Tensor, batch: int) -> torch.Tensor:
    """``(1, C)`` or ``(B, C)`` features for a batch of ``batch`` images (one case's features for all its windows)."""
    if features.ndim == 1:
        features = features[None]
    if features.shape[0] == batch:
        return features
    if features.shape[0] == 1:
        return features.expand(batch, -1)
    raise ValueError(f"features for {features.shape[0]} samples, images for {batch}")


class ClinicalClassifier(nn.Module):
    """Clinical features only: :class:`TabularBranch` then a linear layer to K logits.

    Shapes:
        ``forward(image, features)``: ``image`` ``(B, ...)`` is not read (only its batch size), ``features``
        ``(B, C)`` or ``(1, C)`` -> logits ``(B, K)``. The signature matches the fusion network so that one
        bundle trains all modalities through the same engines.
    """

    def __init__(
        self,
        spec: FeatureSpec | Mapping[str, Any],
        num_classes: int = 2,
        stats: Mapping[str, Sequence[float]] | None = None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.tabular = TabularBranch(spec, stats, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.tabular(broadcast_features(features, image.shape[0]).to(image.device)))
