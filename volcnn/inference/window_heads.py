"""A classifier's head applied to a dense feature map: the logits of every window at once.

A window's logits are ``head(trunk(window))``. When the trunk has run once over a whole tile, the window starting
at feature cell ``q`` is made of the cells ``q + i * spacing`` (``i < cells`` per axis); the heads here compute
all windows' logits from those cells: :class:`PooledLinearHead` for global average pooling then a linear layer
(MONAI ResNet and DenseNet, ``valid_cnn3d``), :class:`FlattenLinearHead` for a dense layer over the flattened
feature grid (``seed_cnn3d``), as a convolution whose kernel is that grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FlattenLinearHead", "PooledLinearHead", "Triple", "WindowHead", "window_mean"]

Triple = tuple[int, int, int]


class WindowHead(nn.Module):
    """The classifier's head applied to a dense feature map: window logits ``(B, K, *out)`` from cells ``(B, C, *F)``.

    ``forward(features, cells, spacing, step)``: the window starting at map cell ``q`` is made of the cells
    ``q + i * spacing`` for ``i < cells`` per axis; output ``j`` is the window starting at cell ``j * step``.
    """

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        raise NotImplementedError


class PooledLinearHead(WindowHead):
    """Global average pooling then ``linear``: the linear layer as a 1x1x1 convolution, then the window mean.

    Args:
        linear: the classifier's last layer, ``C -> K``.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        w = self.linear.weight.to(features.dtype)[:, :, None, None, None]
        logits = window_mean(F.conv3d(features, w), cells, spacing, step)
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.to(logits.dtype)[None, :, None, None, None]
        return logits


class FlattenLinearHead(WindowHead):
    """A dense layer over the flattened feature grid, as a convolution whose kernel is that grid (FCN trick).

    Args:
        linear: the first layer after the flatten, ``C * prod(grid) -> H``.
        grid: the feature grid of one window, ``(gx, gy, gz)``.
        rest: what follows, applied per cell over channels (activations, dropout, linear layers).
    """

    def __init__(self, linear: nn.Linear, grid: Triple, rest: nn.Module) -> None:
        super().__init__()
        self.linear, self.grid, self.rest = linear, tuple(grid), rest

    def forward(self, features: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
        if tuple(cells) != self.grid:
            raise ValueError(f"the dense layer was built for a feature grid {self.grid}, the patch gives {cells}")
        w = self.linear.weight.view(self.linear.out_features, -1, *self.grid).to(features.dtype)
        bias = None if self.linear.bias is None else self.linear.bias.to(features.dtype)
        h = F.conv3d(features, w, bias, stride=step, dilation=spacing)
        return self.rest(h.movedim(1, -1)).movedim(-1, 1)


def window_mean(x: torch.Tensor, cells: Triple, spacing: Triple, step: Triple) -> torch.Tensor:
    """Mean of ``x (B, C, *F)`` over the cells ``j * step + i * spacing`` (``i < cells``) of every window ``j``.

    Returns:
        ``(B, C, *n)`` with ``n = (F - 1 - (cells - 1) * spacing) // step + 1`` per axis.
    """
    n = [(f - 1 - (m - 1) * d) // st + 1 for f, m, d, st in zip(x.shape[2:], cells, spacing, step, strict=True)]
    if min(n) < 1:
        raise ValueError(f"feature map {tuple(x.shape[2:])} is smaller than one window of {cells} cells")
    out: torch.Tensor | None = None
    for i in range(cells[0]):
        for j in range(cells[1]):
            for k in range(cells[2]):
                lo = (i * spacing[0], j * spacing[1], k * spacing[2])
                view = x[
                    :,
                    :,
                    lo[0] : lo[0] + (n[0] - 1) * step[0] + 1 : step[0],
                    lo[1] : lo[1] + (n[1] - 1) * step[1] + 1 : step[1],
                    lo[2] : lo[2] + (n[2] - 1) * step[2] + 1 : step[2],
                ]
                out = view.clone() if out is None else out.add_(view)
    assert out is not None
    return out.div_(math.prod(cells))
