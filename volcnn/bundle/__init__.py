"""MONAI bundle support: packaging a trained bundle, and offline verification against a vendored, hash-pinned
metadata schema."""

from __future__ import annotations

from volcnn.bundle.export import EXPORT_FORMATS, export_bundle
from volcnn.bundle.package import (
    PackageError,
    PackageResult,
    configure_bundle,
    install_model,
    package_crossval,
    package_run,
)
from volcnn.bundle.verify import (
    SCHEMA_NAME,
    SCHEMA_SHA256,
    CheckResult,
    MetadataValidationError,
    SchemaIntegrityError,
    check_export,
    check_network_io,
    load_schema,
    validate_metadata,
    verify_bundle,
)

__all__ = [
    "EXPORT_FORMATS",
    "PackageError",
    "PackageResult",
    "configure_bundle",
    "export_bundle",
    "install_model",
    "package_crossval",
    "package_run",
    "SCHEMA_NAME",
    "SCHEMA_SHA256",
    "CheckResult",
    "MetadataValidationError",
    "SchemaIntegrityError",
    "check_export",
    "check_network_io",
    "load_schema",
    "validate_metadata",
    "verify_bundle",
]
