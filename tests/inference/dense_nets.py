"""Small classifiers that :func:`~volcnn.inference.split_classifier` accepts, for the dense heat-map tests.

Each is an ``nn.Sequential(trunk..., AdaptiveAvgPool3d(1), Flatten(), Linear)``. The ``Dense*`` twins of the
hand-made nets in ``tests.inference`` compute the same function of a window with an unpadded convolution whose kernel
is the whole patch, so window-by-window and dense evaluation agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class _PooledNet(nn.Sequential):
    """``conv -> global mean -> Linear(1, 2)`` with logits ``(0, gain * (conv - offset))``."""

    def __init__(self, conv: nn.Conv3d, gain: float, offset: float) -> None:
        linear = nn.Linear(1, 2)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([[0.0], [gain]]))
            linear.bias.copy_(torch.tensor([0.0, -gain * offset]))
        super().__init__(conv, nn.AdaptiveAvgPool3d(1), nn.Flatten(), linear)


class DenseBlobNet(_PooledNet):
    """:class:`tests.inference.BlobNet` as a pooling classifier: a patch-sized Gaussian kernel, no padding."""

    def __init__(self, patch_size: Sequence[int], sigma: float = 2.0, gain: float = 40.0, offset: float = 0.25):
        size = tuple(int(p) for p in patch_size)
        centre = torch.tensor([p // 2 for p in size], dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(*[torch.arange(p, dtype=torch.float32) for p in size], indexing="ij"), -1)
        w = torch.exp(-((grid - centre) ** 2).sum(-1) / (2 * sigma**2))
        conv = nn.Conv3d(1, 1, size, bias=False)
        with torch.no_grad():
            conv.weight.copy_((w / w.sum())[None, None])
        super().__init__(conv, gain, offset)


class DenseCentreVoxelNet(_PooledNet):
    """:class:`tests.inference.CentreVoxelNet` as a pooling classifier: a one-hot kernel at voxel ``size // 2``."""

    def __init__(self, patch_size: Sequence[int], gain: float = 50.0):
        size = tuple(int(p) for p in patch_size)
        conv = nn.Conv3d(1, 1, size, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[(0, 0, *(p // 2 for p in size))] = 1.0
        super().__init__(conv, gain, 0.5)


def tiny_strided_net(seed: int = 0) -> nn.Sequential:
    """Unpadded convolutions and a max pool, total stride 4: a 10^3 patch gives 2^3 feature cells."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3),
        nn.BatchNorm3d(4),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Conv3d(4, 8, 2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    with torch.no_grad():  # batch norm with non-trivial statistics: eval mode must be used
        bn = net[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        net[-1].weight.mul_(40.0)  # logits spread over a useful range of probabilities
    return net.eval()


def padding_sensitive_net(gain: float = 30.0, offset: float = 0.55) -> nn.Sequential:
    """A 5^3 box filter with zero padding 2, then the global mean: windows see zeros at their faces, dense tiles do
    not, so the two methods disagree by a wide margin (the kind of network ``method="auto"`` must catch)."""
    conv = nn.Conv3d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0 / 125)
    return _PooledNet(conv, gain, offset).eval()
