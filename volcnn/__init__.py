"""volcnn: a MONAI pipeline for 3D CT classification.

Importing the package has no side effects. Its subpackages follow the stages of the pipeline (see
``ARCHITECTURE.md``): ``core`` (errors, options, hashing, atomic writes, geometry), ``io`` (reading and
writing volumes, datalists), ``transforms``, ``networks``, ``models`` (weights, bundles, exported files), ``data``
(synthetic cohort, caching, loading), ``explain``, ``inference``, ``evaluation``, ``engines`` (training), ``bundle``
(packaging and offline checks) and ``commands`` (the ``volcnn`` command). Each is loaded on first attribute access,
so a bundle config needs only ``"$import volcnn"`` to use ``volcnn.io.load_datalist`` or ``volcnn.explain``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.7.0"

#: the subpackages, lowest layer first
SUBPACKAGES = (
    "core",
    "io",
    "networks",
    "transforms",
    "models",
    "data",
    "evaluation",
    "planning",
    "explain",
    "inference",
    "engines",
    "bundle",
    "commands",
)
__all__ = ["SUBPACKAGES", "__version__", *SUBPACKAGES]


def __getattr__(name: str) -> ModuleType:
    if name in SUBPACKAGES:
        return importlib.import_module(f"volcnn.{name}")
    raise AttributeError(f"module 'volcnn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
