"""A registry of 3D classifiers by name, in the manner of timm's ``create_model``.

Every registered factory builds an ``nn.Module`` that maps ``(B, C, D, H, W)`` to logits ``(B, K)``.
Factories build; they do not move the module to a device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["register_network", "create_network", "list_networks"]

NetworkFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, NetworkFactory] = {}


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator registering ``factory(in_channels, num_classes, spatial_size, **kwargs)`` under ``name``."""

    def _register(factory: NetworkFactory) -> NetworkFactory:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return _register


def list_networks() -> list[str]:
    """Names of all registered networks, sorted."""
    return sorted(_REGISTRY)


def create_network(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_size: Sequence[int] | None = None,
    ensemble: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered network ``name``, or an ensemble of ``ensemble`` of them.

    Args:
        name: registry name, e.g. ``"seed_cnn3d"``, ``"densenet121"``, ``"resnet18"``.
        in_channels: channels of the input ``(B, C, D, H, W)``.
        num_classes: K, the number of logits per sample.
        spatial_size: the patch size ``(D, H, W)``; needed by networks with a dense head over a fixed grid,
            ignored by networks that end in global pooling.
        ensemble: members of an :class:`~volcnn.networks.ensemble.EnsembleClassifier` (1: the network itself),
            whose output is the log of the members' mean probabilities.
        kwargs: passed to the factory.

    Returns:
        A module mapping ``(B, in_channels, D, H, W)`` to logits ``(B, num_classes)``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; registered networks: {', '.join(list_networks())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (softmax over K classes), got {num_classes}")
    size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
    if int(ensemble) < 1:
        raise ValueError(f"ensemble must be >= 1 member, got {ensemble}")
    if int(ensemble) > 1:
        from volcnn.networks.ensemble import EnsembleClassifier

        members = [create_network(name, in_channels=in_channels, num_classes=num_classes, spatial_size=size, **kwargs)
                   for _ in range(int(ensemble))]  # fmt: skip
        return EnsembleClassifier(members)
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, spatial_size=size, **kwargs)
