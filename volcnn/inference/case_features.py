"""Clinical features at inference: a multimodal network seen as an image network with the current case's features.

Every inference path (window and refined heat maps, test-time flips, volume mode, Grad-CAM) calls ``network(image)``.
A clinical or fusion network takes ``network(image, features=...)``; :class:`CaseFeatures` holds one case's raw
features ``(1, C)`` and passes them with every batch of windows, so those paths run unchanged. The runner sets the
case's features before each case (:meth:`CaseFeatures.set_features`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.io.features import FeatureSpec

__all__ = ["CaseFeatures", "features_record"]


class CaseFeatures(nn.Module):
    """``network(image, features)`` as ``forward(image)`` with the features of the case being processed.

    Shapes:
        ``forward(image)``: ``(B, C_img, D, H, W)`` -> the network's logits ``(B, K)``; the held features ``(1, C)``
        are expanded to the batch.
    """

    def __init__(self, network: nn.Module, n_columns: int) -> None:
        super().__init__()
        self.network = network
        self.n_columns = int(n_columns)
        self.features: torch.Tensor | None = None

    def set_features(self, raw: np.ndarray) -> None:
        """Hold ``raw`` ``(C,)`` (NaN where missing) for the following calls."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.shape != (self.n_columns,):
            raise ValueError(f"features of shape {raw.shape}, expected ({self.n_columns},)")
        self.features = torch.from_numpy(raw.copy())[None]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("no case features set: call set_features before running the network")
        feats = self.features.to(image.device).expand(image.shape[0], -1)
        return self.network(image, features=feats)


def features_record(spec: FeatureSpec, values: Mapping[str, Any] | None, csv_given: bool) -> dict[str, Any]:
    """What ``findings.json`` says about the features a case ran with: the names ``provided`` and ``missing`` (the
    network imputes those from the provided ones, with what it learnt on the training split), a ``note`` when the
    case had no row, and the sha256 of the raw encoding (a re-run with other values is not skipped as done). The
    values themselves are not copied into the outputs."""
    where = "features"
    raw = spec.encode(values, where)
    missing = spec.missing(values)
    out: dict[str, Any] = {
        "provided": [n for n in spec.names if n not in missing],
        "missing": missing,
        "sha256": hashlib.sha256(raw.tobytes()).hexdigest(),
    }
    if values is None:
        out["note"] = (
            "no row for this case in the features CSV: every feature missing (imputed with the training means)"
            if csv_given
            else "no features given (volcnn infer --features CSV): every feature missing (imputed)"
        )
    return out
