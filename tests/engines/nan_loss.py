"""A loss that becomes NaN after a given number of calls, for the NaN-handling tests (imported by the bundle)."""

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
