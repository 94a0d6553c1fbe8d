"""volcnn: a MONAI pipeline for 3D CT classification.

Importing the package has no side effects; subpackages follow the stages of the pipeline:
``io`` (reading and writing volumes, datalists), ``transforms``, ``networks``, ``engines``,
``inference``, ``data`` (synthetic cohort) and ``bundle`` (packaging and offline checks). They are loaded on
first attribute access, so a bundle config needs only ``"$import volcnn"`` to use ``volcnn.io.load_datalist``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.2.0"
__all__ = ["__version__", "bundle", "data", "engines", "inference", "io", "metrics", "networks", "report", "transforms"]

_SUBPACKAGES = {"bundle", "data", "engines", "inference", "io", "metrics", "networks", "report", "transforms"}


def __getattr__(name: str) -> ModuleType:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"volcnn.{name}")
    raise AttributeError(f"module 'volcnn' has no attribute {name!r}")
