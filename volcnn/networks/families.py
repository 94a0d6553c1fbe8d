"""What volcnn knows about each family of classifiers, kept with the family (timm's ``pretrained_cfg`` idea):
how it splits into a convolutional trunk and a head that can be applied densely, and which layers Grad-CAM
prefers.

A family is registered for the network classes it covers, next to their factories (:mod:`volcnn.networks.monai_nets`,
:mod:`~volcnn.networks.seed_cnn`, :mod:`~volcnn.networks.valid_cnn`); :func:`family_of` finds it by the class of
a built network (wrappers removed), so the dense heat maps and Grad-CAM ask one table instead of testing
``isinstance`` against each architecture themselves. A network of no registered family still works where its
structure says enough: ``nn.Sequential(*trunk, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear)`` splits, and
Grad-CAM falls back to its ``Conv3d`` layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from volcnn.networks.introspect import unwrap

__all__ = [
    "Family",
    "TrunkHead",
    "cam_layers",
    "family_of",
    "is_global_pool",
    "pooled_sequential_split",
    "register_family",
    "split_trunk_head",
]


class TrunkHead(NamedTuple):
    """A classifier as ``head(trunk(x))``, the head made of a linear layer (modules shared with the network).

    Attributes:
        trunk: convolutional part, ``(B, C, *S)`` -> ``(B, C', *F)``.
        linear: the head's first linear layer.
        pooled: True when the head is global average pooling then ``linear`` (``C' -> K``); False when ``linear``
            acts on the flattened feature grid (``C' * prod(F) -> H``), followed by ``rest``.
        rest: what follows ``linear`` in a flattened head, applied per sample (activations, dropout, linear
            layers); None for a pooled head.
        input_size: the patch size a flattened head was built for (it fixes the feature grid); None when pooled.
    """

    trunk: nn.Module
    linear: nn.Linear
    pooled: bool = True
    rest: nn.Module | None = None
    input_size: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Family:
    """The facts of one architecture family.

    Attributes:
        name: the family's name (in messages).
        split: ``network -> TrunkHead``; raises ``ValueError`` saying why a network of the family cannot be split.
            None: the family has no dense form.
        cam_layers: Grad-CAM layers by module name, deepest first; those present in a network are its candidates.
    """

    name: str
    split: Callable[[nn.Module], TrunkHead] | None = None
    cam_layers: tuple[str, ...] = ()


_FAMILIES: dict[type, Family] = {}


def register_family(cls: type, family: Family) -> None:
    """Register ``family`` for networks of class ``cls`` (and its subclasses, unless they have their own)."""
    if cls in _FAMILIES:
        raise ValueError(f"{cls.__name__} already belongs to the family {_FAMILIES[cls].name!r}")
    _FAMILIES[cls] = family


def family_of(network: nn.Module) -> Family | None:
    """The family registered for the network's class (wrappers removed, nearest class first), or None."""
    for cls in type(unwrap(network)).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    return None


def is_global_pool(m: nn.Module) -> bool:
    """True for ``nn.AdaptiveAvgPool3d(1)``."""
    size = getattr(m, "output_size", None)
    return isinstance(m, nn.AdaptiveAvgPool3d) and size in (1, (1, 1, 1), [1, 1, 1])


def _pooled_sequential(net: nn.Module) -> TrunkHead | None:
    """``nn.Sequential(*trunk, AdaptiveAvgPool3d(1), Flatten(), Linear)`` as trunk and pooled head, else None."""
    if not (isinstance(net, nn.Sequential) and len(net) >= 4):
        return None
    pool, flat, linear = list(net)[-3:]
    if is_global_pool(pool) and isinstance(flat, nn.Flatten) and isinstance(linear, nn.Linear):
        return TrunkHead(nn.Sequential(*list(net)[:-3]), linear)
    return None


def split_trunk_head(network: nn.Module) -> TrunkHead:
    """Split a classifier into its convolutional trunk and a linear head, by its family or, for networks of no
    family, by the structure ``nn.Sequential(*trunk, AdaptiveAvgPool3d(1), Flatten(), Linear)``.

    Raises:
        ValueError: the network cannot be split (the message says why).
    """
    net = unwrap(network)
    family = family_of(net)
    if family is not None and family.split is not None:
        return family.split(net)
    found = _pooled_sequential(net)
    if found is not None:
        return found
    known = sorted({f.name for f in _FAMILIES.values() if f.split is not None})
    raise ValueError(
        f"{type(net).__name__} cannot be evaluated densely: supported are the families {', '.join(known)} and "
        "nn.Sequential(trunk..., AdaptiveAvgPool3d(1), Flatten(), Linear)"
    )


def pooled_sequential_split(network: nn.Module) -> TrunkHead:
    """The split of a family that is an ``nn.Sequential`` ending in global pooling, flatten and linear.

    Raises:
        ValueError: the network does not end that way.
    """
    found = _pooled_sequential(network)
    if found is None:
        raise ValueError(f"{type(network).__name__}: expected global average pooling, flatten and linear at its end")
    return found


def cam_layers(network: nn.Module) -> list[str]:
    """Grad-CAM layers preferred for ``network``, deepest first: its family's layers present in it, else its
    ``Conv3d`` modules, last first."""
    net = unwrap(network)
    family = family_of(net)
    names = {name for name, _ in net.named_modules()}
    found = [n for n in (family.cam_layers if family is not None else ()) if n in names]
    if found:
        return found
    return [name for name, m in reversed(list(net.named_modules())) if isinstance(m, nn.Conv3d)]
