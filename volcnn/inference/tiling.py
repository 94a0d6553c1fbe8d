"""Tiles of a dense heat map: blocks of grid points sized to a memory budget, cut from the volume with their
windows' context, run through the trunk and head, split again (and at last moved to the CPU) on out-of-memory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from volcnn.inference.dense_plan import DensePlan
from volcnn.inference.window_heads import Triple, WindowHead

__all__ = ["Block", "evaluate_block", "extract_tile", "forward_tile", "plan_blocks", "run_blocks", "tile_voxels"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """Grid indices ``lo[a] <= g < hi[a]``."""

    lo: Triple
    hi: Triple

    @property
    def size(self) -> Triple:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi, strict=True))  # type: ignore[return-value]

    def split(self) -> tuple[Block, Block]:
        a = int(np.argmax(self.size))
        mid = self.lo[a] + self.size[a] // 2
        hi0, lo1 = list(self.hi), list(self.lo)
        hi0[a], lo1[a] = mid, mid
        return Block(self.lo, tuple(hi0)), Block(tuple(lo1), self.hi)  # type: ignore[arg-type]


def tile_voxels(plan: DensePlan, size: Sequence[int]) -> int:
    sizes = zip(size, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    return math.prod((n - 1) * o + p + 2 * h for n, o, p, h in sizes)


def plan_blocks(plan: DensePlan, keep: np.ndarray, max_voxels: int) -> list[Block]:
    """Blocks covering the kept grid points: the bounding box, halved along its longest extent until it fits.

    An axis is halved only while its block extent is at least the tile's fixed overhead on that axis (the patch plus
    twice the halo), since below that halving saves little memory and doubles the work; a block that cannot be
    split further runs over the budget (logged).
    """
    idx = np.argwhere(keep)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    size = [int(v) for v in hi - lo]
    overhead = [p + 2 * h for p, h in zip(plan.patch_size, plan.halo, strict=True)]
    while tile_voxels(plan, size) > max_voxels:
        extent = [(n - 1) * o for n, o in zip(size, plan.grid_stride, strict=True)]
        worth = [a for a in range(3) if size[a] > 1 and extent[a] >= overhead[a]]
        if not worth:
            logger.info(
                "dense tiles of %d voxels exceed the budget of %d (patch %s, halo %s)",
                *(tile_voxels(plan, size), max_voxels, plan.patch_size, plan.halo),
            )
            break
        a = max(worth, key=lambda i: extent[i])
        size[a] = -(-size[a] // 2)
    blocks = []
    ranges = [range(int(lo[a]), int(hi[a]), size[a]) for a in range(3)]
    for x0 in ranges[0]:
        for y0 in ranges[1]:
            for z0 in ranges[2]:
                b0 = (x0, y0, z0)
                b1 = tuple(min(int(hi[a]), b0[a] + size[a]) for a in range(3))
                if keep[b0[0] : b1[0], b0[1] : b1[1], b0[2] : b1[2]].any():
                    blocks.append(Block(b0, b1))  # type: ignore[arg-type]
    return blocks


def extract_tile(volume: torch.Tensor, start: Sequence[int], stop: Sequence[int]) -> torch.Tensor:
    """``volume[:, start:stop]`` (per axis) with the border voxels replicated outside the volume: ``(1, C, *size)``."""
    shape = volume.shape[1:]
    inner = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(start, stop, shape, strict=True))
    part = volume[(slice(None), *inner)][None]
    pads: list[int] = []
    for a in (2, 1, 0):
        pads += [max(0, -start[a]), max(0, stop[a] - shape[a])]
    return F.pad(part, pads, mode="replicate") if any(pads) else part


def forward_tile(trunk: nn.Module, head: WindowHead, tile: torch.Tensor, plan: DensePlan) -> torch.Tensor:
    """Window logits ``(1, K, *n)`` of one tile, the first window starting ``halo`` voxels into the tile."""
    features = trunk(tile)
    skip = [h // t for h, t in zip(plan.halo, plan.map_step, strict=True)]
    features = features[:, :, skip[0] :, skip[1] :, skip[2] :]
    return head(features, plan.cells, plan.spacing, plan.step)


def evaluate_block(
    volume: torch.Tensor, block: Block, plan: DensePlan, modules: tuple[nn.Module, WindowHead], device: torch.device
) -> np.ndarray:
    """Softmax logits ``(K, *block.size)`` of the windows centred on the block's grid points."""
    start = [
        lo * o - p // 2 - h for lo, o, p, h in zip(block.lo, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    ]
    stop = [
        (hi - 1) * o - p // 2 + p + h
        for hi, o, p, h in zip(block.hi, plan.grid_stride, plan.patch_size, plan.halo, strict=True)
    ]
    tile = extract_tile(volume, start, stop).to(device)
    logits = forward_tile(modules[0], modules[1], tile, plan)
    n = block.size
    if any(got < want for got, want in zip(logits.shape[2:], n, strict=True)):
        raise RuntimeError(f"dense map {tuple(logits.shape[2:])} is smaller than the block {n} (internal error)")
    probs = torch.softmax(logits[0, :, : n[0], : n[1], : n[2]].float(), dim=0)
    return probs.cpu().numpy()


def run_blocks(
    blocks: Iterable[Block],
    evaluate: Callable[[Block, torch.device], np.ndarray],
    device: torch.device,
    on_result: Callable[[Block, np.ndarray], None],
    max_voxels: Callable[[Block], int],
    progress: bool = False,
) -> torch.device:
    """Evaluate blocks, splitting a block on an out-of-memory error and at last falling back to the CPU.

    After an out-of-memory error, every later block larger than half the failed one is split before it is tried.

    Returns:
        The device the last block ran on.
    """
    from tqdm.auto import tqdm

    todo = list(blocks)[::-1]
    cap: int | None = None
    with tqdm(total=len(todo), unit="tile", disable=not progress) as bar:
        while todo:
            block = todo.pop()
            if cap is not None and max_voxels(block) > cap and max(block.size) > 1:
                todo.extend(block.split()[::-1])
                bar.total += 1
                continue
            try:
                result = evaluate(block, device)
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if max(block.size) > 1:
                    cap = max_voxels(block) // 2
                    logger.warning(
                        "out of memory on %s for a tile of %d voxels; retrying in smaller tiles",
                        device,
                        max_voxels(block),
                    )
                    todo.extend(block.split()[::-1])
                    bar.total += 1
                    continue
                if device.type == "cpu":
                    raise
                logger.warning("out of memory on %s for the smallest tile; falling back to the CPU", device)
                device, cap = torch.device("cpu"), None
                todo.append(block)
                continue
            on_result(block, result)
            bar.update(1)
    return device
