"""Losses that turn NaN on cue, for the NaN-handling tests (``NaNAfterLoss`` is imported by the bundle run)."""

from __future__ import annotations

import torch


class NaNAfterLoss(torch.nn.CrossEntropyLoss):
    """Cross-entropy for the first ``after`` calls, NaN from then on."""

    def __init__(self, weight: torch.Tensor | None = None, after: int = 3) -> None:
        super().__init__(weight=weight)
        self.after = int(after)
        self.calls = 0

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = super().forward(input, target)
        return loss * float("nan") if self.calls > self.after else loss


class NaNAtLoss(torch.nn.Module):
    """Cross-entropy that returns NaN on call number ``nan_at`` only (1-based; ``None``: never)."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.nan_at = nan_at
        self.calls = 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ce(pred, label)
        return loss * float("nan") if self.calls == self.nan_at else loss
