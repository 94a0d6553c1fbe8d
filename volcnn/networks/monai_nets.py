"""MONAI's 3D classifiers, registered under timm-like names, with their families' facts.

The ResNets use a stride-2 stem (``conv1_t_stride=2``): MONAI's default stride-1 stem costs several times more
compute at 32-96 voxel patches for no gain (resnet18 measured with both stems; figures in
``pipelines/PERFORMANCE.md``, "ResNet stem"). ``python -m pipelines.bench_compute --networks resnet18`` measures the
stem kept here.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import DenseNet, DenseNet121, ResNet, resnet10, resnet18, resnet34
from torch import nn

from volcnn.networks.families import Family, TrunkHead, is_global_pool, register_family
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


def _resnet_split(net: Any) -> TrunkHead:
    """MONAI ``ResNet``: stem and ``layer1..4`` as the trunk, ``fc`` after global pooling as the head."""
    name = type(net).__name__
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"{name} has no linear head (built with feed_forward=False): nothing to evaluate densely")
    if not is_global_pool(net.avgpool):
        raise ValueError(f"{name}: expected global average pooling before the head, got {net.avgpool}")
    stem = [net.conv1, net.bn1, net.act] + ([] if net.no_max_pool else [net.maxpool])
    return TrunkHead(nn.Sequential(*stem, net.layer1, net.layer2, net.layer3, net.layer4), fc)


def _densenet_split(net: Any) -> TrunkHead:
    """MONAI ``DenseNet``: ``features`` and the final ReLU as the trunk, the linear ``out`` after pooling as head."""
    name = type(net).__name__
    cls = dict(net.class_layers.named_children())
    if set(cls) != {"relu", "pool", "flatten", "out"} or not is_global_pool(cls["pool"]):
        raise ValueError(f"{name}: expected class layers relu, global average pool, flatten, linear")
    if not isinstance(cls["out"], nn.Linear):
        raise ValueError(f"{name}: expected a linear output layer, got {type(cls['out']).__name__}")
    return TrunkHead(nn.Sequential(net.features, cls["relu"]), cls["out"])


# Grad-CAM layers, deepest first: with the stride-2 stem, ``layer4`` has cells of 32 voxels, ``layer2`` of 8;
# DenseNet121's ``class_layers.relu`` follows the final norm, its dense blocks halve the grid each
register_family(ResNet, Family("resnet", _resnet_split, ("layer4", "layer3", "layer2", "layer1")))
register_family(
    DenseNet,
    Family(
        "densenet",
        _densenet_split,
        ("class_layers.relu", "features.denseblock3", "features.denseblock2", "features.denseblock1"),
    ),
)
