"""Facts read off any 3D network by looking at it: the module inside wrappers, its input channels, shape-only
copies on the meta device and the output size for an input size.

Used by the dense heat maps (:mod:`volcnn.inference.dense_split`) and Grad-CAM (:mod:`volcnn.explain`), which
both reason about a network's receptive fields without running it on real data.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["detached_copy", "in_channels", "output_size", "unwrap"]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(network, "_orig_mod", None) or (
            network.module if isinstance(network, nn.DataParallel | nn.parallel.DistributedDataParallel) else None
        )
        if not isinstance(inner, nn.Module):
            return network
        network = inner


def in_channels(network: nn.Module, default: int | None = None) -> int:
    """Input channels C of the first ``Conv3d`` of ``network``.

    Raises:
        ValueError: the network has no ``Conv3d`` and no ``default`` is given.
    """
    for m in network.modules():
        if isinstance(m, nn.Conv3d):
            return int(m.in_channels)
    if default is None:
        raise ValueError(f"{type(network).__name__} has no Conv3d: its input channels are unknown")
    return default


def detached_copy(
    module: nn.Module, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> nn.Module:
    """An eval-mode copy of ``module`` with its tensors on ``device`` (``meta``: shapes only, no data copied), floating
    ones cast to ``dtype`` when given; parameters do not require gradients. ``module`` itself is not touched."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, dtype or p.dtype), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.detach().to(device, dtype if dtype is not None and b.is_floating_point() else b.dtype)
    return copy.deepcopy(module, memo).eval()


def output_size(module: nn.Module, channels: int, size: Sequence[int]) -> tuple[int, ...]:
    """Spatial size of ``module``'s output for a ``(1, channels, *size)`` input, from a shape-only run (free)."""
    with torch.no_grad():
        out = detached_copy(module)(torch.empty(1, channels, *(int(s) for s in size), device="meta"))
    return tuple(int(v) for v in out.shape[2:])
