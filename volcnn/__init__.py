"""volcnn: a MONAI pipeline for 3D CT classification.

Importing the package has no side effects; subpackages follow the stages of the pipeline:
``io`` (reading and writing volumes, datalists), ``transforms``, ``networks``, ``engines``,
``inference``, ``data`` (synthetic cohort) and ``bundle`` (packaging and offline checks).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
