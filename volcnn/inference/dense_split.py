"""A classifier split into a convolutional trunk and a :class:`~volcnn.inference.window_heads.WindowHead`, and the
trunk's native strides: what a dense heat map needs to know about a network.

The split itself is a fact of the network's family (:mod:`volcnn.networks.families`); this module checks that the
trunk can run densely (convolutions, pools and pointwise layers only, zero padding) and measures its strides by
shape arithmetic on the meta device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from volcnn.inference.window_heads import FlattenLinearHead, PooledLinearHead, Triple, WindowHead
from volcnn.networks.families import split_trunk_head
from volcnn.networks.introspect import detached_copy, in_channels, output_size, unwrap

__all__ = ["SPATIAL_LAYERS", "SplitClassifier", "Strides", "probe_strides", "split_classifier", "triple"]

_POINTWISE = (
    nn.BatchNorm3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
SPATIAL_LAYERS = (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)
#: probe sizes for the shape arithmetic on the meta device (free): strides are size differences over _PROBE_STEP
_PROBE_BASE, _PROBE_STEP = 512, 512


class SplitClassifier(NamedTuple):
    """A classifier as ``head(trunk(x))``: ``trunk (B, C, *S) -> (B, C', *S / total_stride)``, a :class:`WindowHead`."""

    trunk: nn.Module
    head: WindowHead
    total_stride: Triple


def split_classifier(network: nn.Module) -> SplitClassifier:
    """Split a classifier into its convolutional trunk and a head that can be applied densely.

    The split comes from the network's family (:func:`volcnn.networks.split_trunk_head`: MONAI ``ResNet`` with a
    linear head and ``DenseNet``, ``seed_cnn3d`` whose dense layer becomes a convolution with the feature grid as
    its kernel, ``valid_cnn3d``), or for a network of no family from the structure
    ``nn.Sequential(*trunk, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear)``. The trunk may hold 3D
    convolutions, max / average pools and pointwise layers (batch norm, activations, dropout) only. Modules are
    shared with ``network``, not copied.

    Raises:
        ValueError: the network cannot be evaluated densely (its message says why).
    """
    net = unwrap(network)
    name = type(net).__name__
    parts = split_trunk_head(net)
    head: WindowHead
    if parts.pooled:
        head = PooledLinearHead(parts.linear)
    else:
        if parts.input_size is None:
            raise ValueError(f"{name}: a flattened head needs the patch size it was built for")
        grid = output_size(parts.trunk, in_channels(parts.trunk), parts.input_size)
        head = FlattenLinearHead(parts.linear, grid, parts.rest if parts.rest is not None else nn.Identity())  # type: ignore[arg-type]
    _check_trunk(parts.trunk, name)
    strides = probe_strides(parts.trunk)
    return SplitClassifier(parts.trunk, head, strides.total)


def _check_trunk(trunk: nn.Module, name: str) -> None:
    for sub_name, m in trunk.named_modules():
        if len(m._modules) or isinstance(m, _POINTWISE):
            continue
        if not isinstance(m, SPATIAL_LAYERS):
            raise ValueError(f"{name} cannot be evaluated densely: its trunk holds {sub_name} ({type(m).__name__})")
        if isinstance(m, nn.Conv3d) and m.padding_mode != "zeros":
            raise ValueError(f"{name}: {sub_name} pads with {m.padding_mode!r}; dense evaluation needs zero padding")
        if isinstance(m, nn.AvgPool3d) and (triple(m.padding) != (0, 0, 0) or m.divisor_override is not None):
            raise ValueError(f"{name}: {sub_name} is a padded average pool; dense evaluation needs padding 0")


def triple(v: int | Sequence[int]) -> Triple:
    t = tuple(int(x) for x in np.broadcast_to(np.asarray(v, dtype=np.int64), (3,)))
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Strides:
    total: Triple
    inputs: dict[str, Triple]  # native input stride of every spatial module, by name


def probe_strides(trunk: nn.Module) -> Strides:
    """Native strides, from two shape-only runs whose sizes differ by ``_PROBE_STEP`` voxels."""
    meta = detached_copy(trunk)
    names: dict[nn.Module, str] = {m: n for n, m in meta.named_modules() if isinstance(m, SPATIAL_LAYERS)}
    seen: list[dict[str, Triple]] = [{}, {}]
    outs = []
    for run, n in enumerate((_PROBE_BASE, _PROBE_BASE + _PROBE_STEP)):

        def record(mod: nn.Module, args: tuple[torch.Tensor, ...], run: int = run) -> None:
            seen[run].setdefault(names[mod], tuple(int(v) for v in args[0].shape[2:]))  # type: ignore[arg-type]

        hooks = [m.register_forward_pre_hook(record) for m in names]
        try:
            with torch.no_grad():
                outs.append(meta(torch.empty(1, in_channels(trunk), n, n, n, device="meta")).shape[2:])
        finally:
            for h in hooks:
                h.remove()

    def stride(a: Sequence[int], b: Sequence[int]) -> Triple:
        d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
        if min(d) < 1 or any(_PROBE_STEP % v for v in d):
            raise ValueError(f"the trunk's stride is not an integer (sizes {tuple(a)} -> {tuple(b)})")
        return tuple(_PROBE_STEP // v for v in d)  # type: ignore[return-value]

    if set(seen[0]) != set(names.values()):
        raise ValueError("some trunk layers are not used in its forward pass")
    inputs = {k: stride(seen[0][k], seen[1][k]) for k in seen[0]}
    return Strides(stride(outs[0], outs[1]), inputs)
