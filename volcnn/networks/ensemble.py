"""An ensemble of classifiers that is itself a classifier: its "logits" are the log of its members' mean softmax
probabilities, so that everything downstream (softmax, heat maps, evaluation, TorchScript and ONNX export) sees
one network whose probabilities are the members' average.

``volcnn package`` on a cross-validation folder stores the k folds' weights as one state dict of this module
(keys ``members.<i>.<member key>``) and ``inference.json``'s ``ensemble: k`` builds it through
:func:`~volcnn.networks.create_network`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["EnsembleClassifier"]

#: the smallest mean probability whose log is taken (float32's smallest normal number): a class every member rules
#: out gets a large negative logit instead of -inf
_TINY = float(torch.finfo(torch.float32).tiny)


class EnsembleClassifier(nn.Module):
    """The mean of the members' class probabilities, returned as log-probabilities.

    Args:
        members: classifiers ``(B, C, D, H, W)`` -> logits ``(B, K)``, all with the same K.

    Shapes:
        input ``(B, C, D, H, W)`` -> ``(B, K)``: ``log(mean_i softmax(member_i(x)))``; its softmax is the mean
        probability (the log-probabilities already sum to one in probability).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Further arguments (a multimodal member's ``features``) go to every member."""
        total = torch.softmax(self.members[0](x, *args, **kwargs).float(), dim=1)
        for member in self.members[1:]:
            total = total + torch.softmax(member(x, *args, **kwargs).float(), dim=1)
        return torch.log((total / len(self.members)).clamp_min(_TINY))
