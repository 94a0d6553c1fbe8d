"""The seed documents' small Keras CNN, translated to 3D.

Keras original (2D): conv 32 -> pool -> conv 64 -> pool -> dense 128 -> softmax. Here: 3x3x3 convolutions
with ReLU, 2x max-pooling, a dense layer of 128 over the flattened feature grid, dropout, and a final linear
layer giving logits (softmax is applied by the loss / post-processing, as MONAI does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from volcnn.networks.families import Family, TrunkHead, register_family
from volcnn.networks.registry import register_network

__all__ = ["SeedCNN3d"]


class SeedCNN3d(nn.Module):
    """conv(32) - pool - conv(64) - pool - dense(128) - dense(K).

    Args:
        in_channels: input channels C.
        num_classes: number of logits K.
        spatial_size: patch size ``(D, H, W)``, each divisible by 4; fixes the dense layer's width.
        dropout: dropout before the last layer.

    Shapes:
        input ``(B, C, D, H, W)`` -> logits ``(B, K)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_size: Sequence[int] = (32, 32, 32),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        size = tuple(int(s) for s in spatial_size)
        if len(size) != 3 or any(s < 4 or s % 4 for s in size):
            raise ValueError(f"seed_cnn3d needs a 3D spatial_size divisible by 4, got {spatial_size}")
        self.spatial_size = size
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
        )
        n_flat = 64 * (size[0] // 4) * (size[1] // 4) * (size[2] // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_flat, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, K)``; the spatial size must equal the constructor's."""
        d, h, w = self.spatial_size
        if x.shape[2] != d or x.shape[3] != h or x.shape[4] != w:
            raise ValueError(f"seed_cnn3d was built for patches {self.spatial_size}, got {x.shape[2:]}")
        return self.classifier(self.features(x))


@register_network("seed_cnn3d")
def _seed_cnn3d(
    in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object
) -> nn.Module:
    return SeedCNN3d(in_channels, num_classes, spatial_size or (32, 32, 32), **kwargs)  # type: ignore[arg-type]


def _seed_split(net: Any) -> TrunkHead:
    """``features`` as the trunk; the dense layer over the flattened feature grid, then the rest, as the head."""
    flat, first, *rest = list(net.classifier)
    if not isinstance(flat, nn.Flatten) or not isinstance(first, nn.Linear):
        raise ValueError(f"{type(net).__name__}: expected flatten then linear in its classifier")
    return TrunkHead(net.features, first, pooled=False, rest=nn.Sequential(*rest), input_size=net.spatial_size)


# ``features.4`` is the ReLU after the last convolution (a 16^3 grid at 32^3), ``features.1`` the first one's
register_family(SeedCNN3d, Family("seed_cnn", _seed_split, ("features.4", "features.1")))
