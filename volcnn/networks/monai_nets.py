"""MONAI's 3D classifiers, registered under timm-like names.

The ResNets use a stride-2 stem (``conv1_t_stride=2``): MONAI's default stride-1 stem costs 3-8x more
compute at 32-96 voxel patches for no gain (../shared/PERF.md: resnet18 at 64^3 on 2 CPU cores,
0.8 -> 5.8 patches/s).
"""

from __future__ import annotations

from monai.networks.nets import DenseNet121, resnet10, resnet18, resnet34
from torch import nn

from volcnn.networks.registry import register_network

__all__: list[str] = []


@register_network("densenet121")
def _densenet121(
    in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object
) -> nn.Module:
    return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, **kwargs)  # type: ignore[arg-type]


def _resnet(factory, in_channels: int, num_classes: int, **kwargs: object) -> nn.Module:  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
        "shortcut_type": "B",
        "bias_downsample": False,
    }
    options.update(kwargs)
    return factory(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, feed_forward=True, **options)


@register_network("resnet10")
def _resnet10(in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object) -> nn.Module:
    return _resnet(resnet10, in_channels, num_classes, **kwargs)


@register_network("resnet18")
def _resnet18(in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object) -> nn.Module:
    return _resnet(resnet18, in_channels, num_classes, **kwargs)


@register_network("resnet34")
def _resnet34(in_channels: int, num_classes: int, spatial_size: tuple[int, ...] | None, **kwargs: object) -> nn.Module:
    return _resnet(resnet34, in_channels, num_classes, **kwargs)
