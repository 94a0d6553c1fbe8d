"""A 3D classifier of unpadded ("valid") convolutions: its dense heat map equals window-by-window evaluation.

A padded network (MONAI's ResNets and DenseNet) zero-pads every window at the window's faces; evaluated densely
over a volume, its trunk sees the neighbouring tissue there instead, so the two heat maps differ, by up to 0.9 in
probability for a trained resnet10 on 32^3 patches (:mod:`volcnn.inference.dense`). A network that pads nothing
computes, at every feature cell, a function of voxels inside the window only; one pass of its trunk over the volume
gives every window's cells exactly, and the window logits are the mean of the linear layer over them. This is the
fully convolutional screening design of the LUNA16-era 3D CNN detectors (e.g. Dou et al., IEEE TMI 2017), where the
classifier trained on patches is run over the whole CT as one convolution.

Layout for a 32^3 patch (three stages of two unpadded 3x3x3 convolutions with batch norm and ReLU, 2x max pooling
between stages)::

    32 -> 30 -> 28 -> pool 14 -> 12 -> 10 -> pool 5 -> 3 -> 1 -> global mean -> linear

The last cell's receptive field is 32 voxels: it sees the whole patch and nothing beyond it. Larger patches give
more cells (48^3: 5^3 cells), each seeing 32^3 voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from volcnn.networks.families import Family, pooled_sequential_split, register_family
from volcnn.networks.registry import register_network

__all__ = ["ValidCNN3d"]

#: per axis, the smallest patch giving one feature cell
MIN_PATCH = 32


class ValidCNN3d(nn.Sequential):
    """``trunk -> AdaptiveAvgPool3d(1) -> Flatten -> Linear``, the trunk of unpadded convolutions only.

    Args:
        in_channels: input channels C.
        num_classes: number of logits K.
        spatial_size: patch size ``(D, H, W)``, checked to be at least 32 per axis (one feature cell); the network
            itself accepts any input of at least that size.
        channels: widths of the three stages.
        dropout: dropout on the last feature cells during training.

    Shapes:
        input ``(B, C, D, H, W)`` -> logits ``(B, K)``; the trunk maps ``(B, C, S)`` to
        ``(B, channels[-1], ((S - 4) // 2 - 4) // 2 - 4)`` per axis.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        spatial_size: Sequence[int] | None = (32, 32, 32),
        channels: Sequence[int] = (16, 32, 64),
        dropout: float = 0.2,
    ) -> None:
        if spatial_size is not None:
            size = tuple(int(s) for s in spatial_size)
            if len(size) != 3 or min(size) < MIN_PATCH:
                raise ValueError(f"valid_cnn3d needs a 3D patch of at least {MIN_PATCH} voxels per axis, got {size}")
        widths = [int(c) for c in channels]
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"valid_cnn3d needs three positive stage widths, got {channels}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool3d(2))
            for _ in range(2):
                layers += [nn.Conv3d(c_in, width, 3, bias=False), nn.BatchNorm3d(width), nn.ReLU(inplace=True)]
                c_in = width
        layers += [nn.Dropout(dropout), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)

    def __getitem__(self, idx):  # type: ignore[no-untyped-def]
        """An index gives the layer, a slice a plain ``nn.Sequential`` (``net[:-3]`` is the trunk)."""
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)


@register_network("valid_cnn3d")
def _valid_cnn3d(
    in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object
) -> nn.Module:
    return ValidCNN3d(in_channels, num_classes, spatial_size, **kwargs)  # type: ignore[arg-type]


# its Grad-CAM candidates are its convolutions, last first (no family list needed)
register_family(ValidCNN3d, Family("valid_cnn", pooled_sequential_split))
