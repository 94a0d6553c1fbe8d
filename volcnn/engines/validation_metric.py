"""The key validation metric of a training epoch, as the best-model saver and early stopping both read it."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["epoch_metric"]


def epoch_metric(validator: Any, epoch: int, key: str | None) -> float | None:
    """``validator.state.metrics[key]`` when the validator ran in trainer epoch ``epoch`` and the value is finite.

    ``None`` when there is no validator or key, when the validator did not run this epoch (``val_interval`` > 1:
    MONAI's ``ValidationHandler`` runs it with the trainer's epoch, so a stale ``state.epoch`` means no validation), or
    when the value is NaN or infinite (e.g. ROC AUC of a validation set holding one class only).
    """
    if validator is None or key is None:
        return None
    if getattr(validator.state, "epoch", None) != epoch:
        return None
    value = (getattr(validator.state, "metrics", None) or {}).get(key)
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
