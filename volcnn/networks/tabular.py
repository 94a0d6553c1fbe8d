"""Networks over clinical features: the normaliser that carries the training split's statistics, a small MLP
branch, and the clinical-only classifier.

The raw features ``(B, C)`` are :func:`volcnn.io.features.FeatureSpec.encode`'s layout (NaN where missing).
:class:`FeatureNormalizer` holds the mean, scale and precision (for conditional imputation) of the columns as
*buffers*, learnt on the training split only (:func:`volcnn.io.features.fit_feature_stats`): they are saved in every
checkpoint and in the packaged ``model.pt``, so evaluation and inference apply exactly what training learnt, with
nothing to keep in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from volcnn.io.features import FeatureSpec, parse_feature_spec

__all__ = ["ClinicalClassifier", "FeatureNormalizer", "TabularBranch", "broadcast_features"]


class FeatureNormalizer(nn.Module):
    """Standardise, impute missing values from the present ones, and flag them.

    Args:
        spec: the declared features (their raw layout, ``C`` columns).
        stats: ``{"mean": (C,), "std": (C,), "precision": (C, C)}`` from
            :func:`~volcnn.io.features.fit_feature_stats`; None gives zeros, ones and the identity, to be replaced by
            a checkpoint's values (``load_state_dict``). Without ``precision`` (statistics or checkpoints of volcnn
            0.6 and earlier) the identity is used: every missing value is imputed by its training mean.

    Shapes:
        ``(B, C)`` raw (NaN = missing) -> ``(B, C + F)``: the columns ``z = (x - mean) / std``, where a missing
        column gets its conditional mean given the present ones, ``z_m = -P_mm^-1 P_mo z_o`` (``P`` the training
        precision; 0, the training mean, when nothing correlates), then one missingness indicator (0/1) per feature
        ``F``.

    The conditional means are solved by conjugate gradients with a fixed ``C + 2`` steps on elementwise products
    and sums (exact for ``C`` columns up to rounding): unlike ``torch.linalg.solve`` this traces to ONNX and
    TorchScript, and autocast leaves it in float32.
    """

    def __init__(self, spec: FeatureSpec | Mapping[str, Any], stats: Mapping[str, Any] | None = None):
        super().__init__()
        spec = parse_feature_spec(spec)
        c = spec.n_columns
        stats = stats or {}
        mean = torch.as_tensor(stats.get("mean", [0.0] * c), dtype=torch.float32)
        std = torch.as_tensor(stats.get("std", [1.0] * c), dtype=torch.float32)
        precision = torch.as_tensor(stats.get("precision", torch.eye(c)), dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,) or precision.shape != (c, c):
            raise ValueError(
                f"feature statistics have shapes {tuple(mean.shape)}, {tuple(std.shape)}, {tuple(precision.shape)}; "
                f"expected ({c},), ({c},), ({c}, {c})"
            )
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("feature statistics must be finite with std > 0")
        if not bool(torch.isfinite(precision).all()) or not bool((torch.diagonal(precision) > 0).all()):
            raise ValueError("the feature precision matrix must be finite with a positive diagonal")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("precision", (precision + precision.T) / 2)
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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints of volcnn 0.6 and earlier have no precision: they imputed training means, the identity's result
        state_dict.setdefault(prefix + "precision", torch.eye(self.n_columns))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.ndim != 2 or raw.shape[1] != self.n_columns:
            raise ValueError(f"features must be (B, {self.n_columns}), got {tuple(raw.shape)}")
        raw = raw.float()
        missing = torch.isnan(raw)
        z = (torch.where(missing, self.mean, raw) - self.mean) / self.std  # missing at 0
        z = z + self._conditional(z, missing.float())
        return torch.cat([z, missing[:, self.first_column].float()], dim=1)

    def _conditional(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The missing columns' conditional means ``(B, C)`` (0 at present columns): CG on ``A x = b`` with
        ``A = P * m m^T + diag(1 - m)`` and ``b = -m * (P z)`` per row, which is ``P_mm x_m = -P_mo z_o``."""
        p = self.precision
        a = p * (m[:, :, None] * m[:, None, :]) + torch.diag_embed(1.0 - m)  # (B, C, C)
        r = -m * (z[:, None, :] * p).sum(-1)  # b, and the residual of x = 0
        x = torch.zeros_like(z)
        d = r
        rr = (r * r).sum(1, keepdim=True)
        tiny = 1e-20
        for _ in range(self.n_columns + 2):
            ad = (a * d[:, None, :]).sum(-1)
            dad = (d * ad).sum(1, keepdim=True)
            alpha = torch.where(dad > tiny, rr / dad.clamp_min(tiny), torch.zeros_like(dad))
            x = x + alpha * d
            r = r - alpha * ad
            rr_next = (r * r).sum(1, keepdim=True)
            beta = torch.where(rr > tiny, rr_next / rr.clamp_min(tiny), torch.zeros_like(rr))
            d = r + beta * d
            rr = rr_next
        return x


class TabularBranch(nn.Module):
    """Normaliser then a two-layer MLP: ``(B, C)`` raw -> ``(B, hidden)`` embedding."""

    def __init__(
        self,
        spec: FeatureSpec | Mapping[str, Any],
        stats: Mapping[str, Any] | None = None,
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
        stats: Mapping[str, Any] | None = None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.tabular = TabularBranch(spec, stats, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.tabular(broadcast_features(features, image.shape[0]).to(image.device)))
