"""Evaluating a strided trunk at every ``t``-th shift ("a trous"): the standard exact rewrite behind dense maps.

The trunk runs natively up to stride ``t``; every later strided layer runs at stride 1 with its kernel (and
padding) dilated by its native input stride over ``t``. Map cell ``q`` then holds exactly what the native trunk
computes for the lattice whose first cell starts at input voxel ``q * t``. :func:`receptive_halo` bounds the
voxels a cell depends on, for tiles that stitch exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volcnn.inference.dense_split import Strides, triple
from volcnn.inference.window_heads import Triple, window_mean

__all__ = ["atrous_trunk", "receptive_halo"]


class _DilatedMaxPool3d(nn.Module):
    """Max pooling with explicit ``-inf`` padding (``F.max_pool3d`` limits padding to half the *undilated* kernel)."""

    def __init__(self, kernel: Triple, stride: Triple, dilation: Triple, padding: Triple) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation, self.padding = kernel, stride, dilation, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if any(p):
            x = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride, 0, self.dilation)


class _DilatedAvgPool3d(nn.Module):
    """Unpadded average pooling with a dilated kernel (``F.avg_pool3d`` has no dilation)."""

    def __init__(self, kernel: Triple, stride: Triple, dilation: Triple) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = kernel, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_mean(x, self.kernel, self.dilation, self.stride)


def atrous_trunk(trunk: nn.Module, strides: Strides, t: Triple) -> nn.Module:
    """A copy of ``trunk`` (sharing its parameters) whose output has stride ``t`` instead of ``strides.total``."""
    memo: dict[int, object] = {id(p): p for p in trunk.parameters()}
    memo.update({id(b): b for b in trunk.buffers()})
    out = copy.deepcopy(trunk, memo).eval()
    for name, m in list(out.named_modules()):
        if name not in strides.inputs:
            continue
        r = strides.inputs[name]
        k = triple(m.kernel_size)
        st = triple(m.stride if m.stride is not None else m.kernel_size)
        dil = triple(getattr(m, "dilation", 1))
        pad = triple(m.padding) if not isinstance(m.padding, str) else (0, 0, 0)
        new_st, new_dil, new_pad = [], [], []
        for a in range(3):
            if r[a] >= t[a]:  # the input is already dense at step t: stride 1, kernel spread over r / t cells
                if r[a] % t[a]:
                    raise ValueError(f"{name}: input stride {r[a]} is not a multiple of the dense step {t[a]}")
                f = r[a] // t[a]
                new_st.append(1)
                new_dil.append(dil[a] * f)
                new_pad.append(pad[a] * f)
            else:  # still native: keep the stride unless it would step past t
                if r[a] * st[a] > t[a] and t[a] % r[a]:
                    raise ValueError(f"{name}: input stride {r[a]} does not divide the dense step {t[a]}")
                new_st.append(min(st[a], t[a] // r[a]))
                new_dil.append(dil[a])
                new_pad.append(pad[a])
        if (tuple(new_st), tuple(new_dil), tuple(new_pad)) == (st, dil, pad):
            continue
        if isinstance(m, nn.Conv3d):
            m.stride, m.dilation = tuple(new_st), tuple(new_dil)
            if not isinstance(m.padding, str):
                m.padding = tuple(new_pad)
            continue
        repl: nn.Module
        if isinstance(m, nn.MaxPool3d):
            repl = _DilatedMaxPool3d(k, tuple(new_st), tuple(new_dil), tuple(new_pad))  # type: ignore[arg-type]
        else:
            repl = _DilatedAvgPool3d(k, tuple(new_st), tuple(new_dil))  # type: ignore[arg-type]
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, repl)
    return out


def receptive_halo(trunk: nn.Module, strides: Strides) -> tuple[Triple, Triple]:
    """Voxels before / after a cell's first input that the cell depends on, summed over every spatial layer.

    An upper bound on the receptive field (exact for chains, and for ResNet and DenseNet blocks, whose shortcuts are
    1x1 or identity).
    """
    before, after = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for name, m in trunk.named_modules():
        if name not in strides.inputs:
            continue
        r = np.asarray(strides.inputs[name])
        k, dil = np.asarray(triple(m.kernel_size)), np.asarray(triple(getattr(m, "dilation", 1)))
        span = (k - 1) * dil
        pad = span // 2 if isinstance(m.padding, str) and m.padding == "same" else np.asarray(triple(m.padding))
        if isinstance(m.padding, str) and m.padding == "valid":
            pad = np.zeros(3, dtype=np.int64)
        before += pad * r
        after += (span - pad) * r
    return tuple(int(v) for v in before), tuple(int(v) for v in after)  # type: ignore[return-value]
