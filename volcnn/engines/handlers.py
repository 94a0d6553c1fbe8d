"""Small Ignite handlers the bundles use."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from ignite.engine import Engine, Events

from volcnn.io.atomic import atomic_write_json

__all__ = ["MetricsJSONWriter"]

logger = logging.getLogger(__name__)


class MetricsJSONWriter:
    """At the end of a run, write ``engine.state.metrics`` (and the sample count) to ``metrics.json`` atomically.

    Args:
        output_dir: folder of ``metrics.json``.
        filename: file name.
        extra: constant fields added to the JSON (e.g. the datalist section evaluated).
    """

    def __init__(self, output_dir: str | os.PathLike[str], filename: str = "metrics.json", extra: dict | None = None):
        self.path = os.path.join(os.fspath(output_dir), filename)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        metrics: dict[str, Any] = {}
        for name, value in engine.state.metrics.items():
            try:
                v = float(value)
                metrics[name] = v if math.isfinite(v) else None
            except (TypeError, ValueError):
                continue
        dataloader = getattr(engine, "data_loader", None)
        n = len(dataloader.dataset) if dataloader is not None and hasattr(dataloader, "dataset") else None
        payload = {"metrics": metrics, "num_samples": n, **self.extra}
        atomic_write_json(self.path, payload)
        logger.info("metrics written to %s: %s", self.path, metrics)
