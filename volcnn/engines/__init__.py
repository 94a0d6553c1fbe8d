"""Trainer / evaluator pieces on MONAI + Ignite used by the bundles."""

from __future__ import annotations

from volcnn.engines.handlers import MetricsJSONWriter
from volcnn.engines.imbalance import class_weights
from volcnn.engines.options import as_bool

__all__ = ["MetricsJSONWriter", "as_bool", "class_weights"]
