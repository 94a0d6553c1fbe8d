"""Model I/O in one place: weights (weights-only loading, model identity), a bundle's network and description,
its probability calibration, and exported models (TorchScript, ONNX) with the settings embedded in them."""

from __future__ import annotations

from volcnn.models.bundle_config import (
    CONFIG_FILE,
    INFERENCE_MODES,
    META_FILE,
    bundle_network_label,
    bundle_overrides,
    bundle_parser,
    bundle_weights_error,
    check_mode,
    describe_bundle,
    load_bundle_network,
    parser_from,
)
from volcnn.models.calibration import CALIBRATION_FILE, Calibration, CalibrationError, fit_platt, read_calibration
from volcnn.models.exported import (
    EXPORTED_SUFFIXES,
    METADATA_KEY,
    ExportedModel,
    ExportedModelError,
    OnnxModel,
    TorchScriptModel,
    load_exported,
    read_description,
)
from volcnn.models.weights import (
    WEIGHT_KEYS,
    WeightsMismatchError,
    find_weights_mismatch,
    load_weights,
    model_info,
    read_state_dict,
    weights_key,
    weights_mismatches,
)

__all__ = [
    "CALIBRATION_FILE",
    "CONFIG_FILE",
    "Calibration",
    "CalibrationError",
    "EXPORTED_SUFFIXES",
    "INFERENCE_MODES",
    "META_FILE",
    "METADATA_KEY",
    "WEIGHT_KEYS",
    "ExportedModel",
    "ExportedModelError",
    "OnnxModel",
    "TorchScriptModel",
    "WeightsMismatchError",
    "bundle_network_label",
    "bundle_overrides",
    "bundle_parser",
    "bundle_weights_error",
    "check_mode",
    "describe_bundle",
    "find_weights_mismatch",
    "fit_platt",
    "load_bundle_network",
    "load_exported",
    "load_weights",
    "model_info",
    "parser_from",
    "read_calibration",
    "read_description",
    "read_state_dict",
    "weights_key",
    "weights_mismatches",
]
