"""A MONAI bundle's configs read for its model: the parser, the network with its trained weights, and the
description of the settings needed to run it without the bundle.

Every place that opens a bundle to get at its network (``volcnn infer``, ``volcnn export``, the offline check,
a ``.pt`` loaded by :func:`~volcnn.models.load_exported`) parses it here, with ``bundle_root`` made absolute so
that the config's paths resolve from any working directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volcnn.models.calibration import read_calibration
from volcnn.models.weights import WeightsMismatchError, find_weights_mismatch, load_weights
from volcnn.transforms.intensity import INTENSITY_MODES, check_intensity

__all__ = [
    "CONFIG_FILE",
    "DESCRIPTION_VERSION",
    "INFERENCE_MODES",
    "META_FILE",
    "bundle_network_label",
    "bundle_overrides",
    "bundle_parser",
    "bundle_weights_error",
    "check_mode",
    "describe_bundle",
    "load_bundle_network",
    "parser_from",
]

#: the bundle configs that define the model for inference, and its metadata (under ``configs/``)
CONFIG_FILE, META_FILE = "inference.json", "metadata.json"
#: version of the description's layout (2: ``mode`` and ``margin`` added; a description without them is candidate mode;
#: 3: ``findings``, the findings settings and calibration; without them an exported model runs on the runner's defaults)
DESCRIPTION_VERSION = 3
#: ``inference.json`` keys of candidate mode's findings that an export embeds (description version 3)
FINDING_KEYS = (
    "threshold", "operating_threshold", "min_distance_mm", "nms", "max_findings", "score", "tta_flips", "refine_mm",
    "scales", "snap_mm",
)  # fmt: skip
#: how a model is inferred, as it was trained: ``candidate`` (patches around datalist centres: a heat map of windows
#: over the CT) or ``volume`` (whole volumes fitted into one patch: one prediction per volume). ``inference.json``
#: states it as the top-level key ``mode``; the first is the default.
INFERENCE_MODES = ("candidate", "volume")


def check_mode(mode: object, where: str = "mode") -> str:
    """``mode`` when it is one of :data:`INFERENCE_MODES`.

    Raises:
        ValueError: naming ``where`` (e.g. the config or file) and the modes known.
    """
    if not isinstance(mode, str) or mode not in INFERENCE_MODES:
        raise ValueError(f"{where}: unknown inference mode {mode!r}; choose one of {', '.join(INFERENCE_MODES)}")
    return mode


def bundle_overrides(bundle_dir: str | os.PathLike[str], device: str | torch.device | None = None) -> dict[str, str]:
    """Config overrides that pin a bundle: ``bundle_root`` made absolute and, when given, ``device`` (as a
    ``$torch.device(...)`` expression, since configs use it as a device)."""
    overrides = {"bundle_root": str(Path(bundle_dir).resolve())}
    if device is not None:
        overrides["device"] = f"$torch.device({str(device)!r})"
    return overrides


def parser_from(config: Mapping[str, Any], meta: Mapping[str, Any], bundle_root: str | None = None) -> Any:
    """A ``monai.bundle.ConfigParser`` of a config and metadata given as dicts (e.g. embedded in an exported file)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(dict(config))
    parser.read_meta(dict(meta))
    if bundle_root is not None:
        parser["bundle_root"] = bundle_root
    return parser


def bundle_parser(
    bundle_dir: str | os.PathLike[str],
    config_file: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """A ``monai.bundle.ConfigParser`` of a bundle's config (default ``configs/inference.json``) and metadata.

    Args:
        bundle_dir: the bundle root.
        config_file: the config to read; default ``configs/inference.json``.
        device: pins the config's ``device`` (see :func:`bundle_overrides`).
        overrides: config ids to replace afterwards (``{"stride_mm": 8.0}``), as on the ``monai.bundle`` command
            line.

    Raises:
        FileNotFoundError: naming the config when it is missing.
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    config = root / "configs" / CONFIG_FILE if config_file is None else Path(config_file)
    meta = root / "configs" / META_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config}: bundle config not found")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta) if meta.is_file() else {})
    parser.update(bundle_overrides(root, device))
    if overrides:
        parser.update(dict(overrides))
    return parser


def describe_bundle(parser: Any) -> dict[str, Any]:
    """The model description of a bundle: the settings needed to run its network without the bundle.

    Args:
        parser: a ``monai.bundle.ConfigParser`` holding the inference config and the metadata (``_meta_``).

    Returns:
        ``{"description_version", "patch_size", "pixdim", "intensity", "hu_window", "in_channels", "num_classes",
        "class_names", "network_def", "ensemble", "bundle_name", "bundle_version", "output", "mode", "margin",
        "modality", "features", "findings"}`` (plain JSON types); ``intensity`` is the config's intensity
        setting (default ``hu``); ``ensemble`` its number of members (default 1: one network); ``mode`` is the
        config's ``mode`` (default ``candidate``), ``margin`` its ``margin`` (default 8, as ``train.json``),
        which volume mode's preprocessing takes; ``modality`` (``image``, ``clinical`` or ``fusion``) and
        ``features``, the ordered declaration of the clinical features the network takes besides the image (None
        for an image network); ``findings`` the config's :data:`FINDING_KEYS` it sets and ``calibration`` (the
        dict of ``calibration_file``, None without one), so an exported model reports the findings the bundle
        does.

    Raises:
        KeyError: when the config has no ``patch_size``.
        ValueError: an unknown ``mode`` or ``intensity``.
    """

    def get(key: str, default: Any = None) -> Any:
        return parser.get_parsed_content(key, default=default)

    meta = parser.get("_meta_", {}) or {}  # raw: metadata holds text, not config expressions
    fmt = meta.get("network_data_format", {})
    image = fmt.get("inputs", {}).get("image", {})
    pred = fmt.get("outputs", {}).get("pred", {})
    num_classes = int(get("num_classes", pred.get("num_channels", 2)))
    channel_def = pred.get("channel_def", {})
    names = [str(channel_def.get(str(i), i)) for i in range(num_classes)]
    network_def = get("network_def")
    return {
        "description_version": DESCRIPTION_VERSION,
        "patch_size": [int(p) for p in parser.get_parsed_content("patch_size")],
        "pixdim": [float(p) for p in get("pixdim", [1.0, 1.0, 1.0])],
        "intensity": check_intensity(str(get("intensity", INTENSITY_MODES[0]))),
        "hu_window": [float(w) for w in get("hu_window", [-1000.0, 400.0])],
        "in_channels": int(image.get("num_channels", 1)),
        "num_classes": num_classes,
        "class_names": names,
        "network_def": network_def if isinstance(network_def, str) else None,
        "ensemble": int(get("ensemble", 1)),
        "bundle_name": meta.get("name"),
        "bundle_version": meta.get("version"),
        "output": "logits",
        "mode": check_mode(get("mode", INFERENCE_MODES[0]), "config key 'mode'"),
        "margin": int(get("margin", 8)),
        "modality": str(get("modality", "image")),
        "features": _plain(get("features")),
        "findings": {
            **{k: get(k) for k in FINDING_KEYS if get(k) is not None},
            "calibration": _calibration_dict(get("calibration_file")),
        },
    }


def _plain(value: Any) -> Any:
    """``value`` (a parsed config list / dict, possibly of MONAI's config item types) as plain JSON types."""
    return None if value is None else json.loads(json.dumps(value))


def _calibration_dict(path: Any) -> dict[str, Any] | None:
    calibration = read_calibration(path) if isinstance(path, str | os.PathLike) else None
    return None if calibration is None else calibration.to_dict()


def bundle_network_label(parser: Any, bundle_dir: str | os.PathLike[str]) -> str:
    """``"the network of bundle B (network_def 'x', patch_size [..], num_classes K)"``: the settings that decide which
    weights fit, as the bundle's config gives them (a setting it cannot give reads ``?``)."""

    def get(key: str) -> Any:
        try:
            value = parser.get_parsed_content(key, default=None)
        except Exception:  # an expression that fails here fails again, with its own message, where it is used
            return "?"
        return "?" if value is None else value

    network_def, patch_size, num_classes = get("network_def"), get("patch_size"), get("num_classes")
    if isinstance(patch_size, list | tuple):
        patch_size = list(patch_size)
    settings = f"network_def {network_def!r}, patch_size {patch_size}, num_classes {num_classes}"
    return f"the network of bundle {Path(bundle_dir)} ({settings})"


def bundle_weights_error(
    error: BaseException, parser: Any, bundle_dir: str | os.PathLike[str]
) -> WeightsMismatchError | None:
    """The :class:`~volcnn.models.weights.WeightsMismatchError` behind ``error`` (raised directly, or from inside a
    config expression that MONAI wrapped), described with the bundle's settings (:func:`bundle_network_label`), or
    ``None`` when ``error`` is something else."""
    mismatch = find_weights_mismatch(error)
    return None if mismatch is None else mismatch.for_network(bundle_network_label(parser, bundle_dir))


def load_bundle_network(
    bundle_dir: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    net_id: str = "network",
) -> tuple[nn.Module, dict[str, Any], Any]:
    """The bundle's network (config id ``net_id`` of ``configs/inference.json``) with trained weights loaded.

    Args:
        bundle_dir: the bundle root.
        weights: the state dict; default ``models/model.pt``.
        device: where the network is built and the weights are loaded.
        net_id: config id of the instantiated network.

    Returns:
        ``(network, description, parser)``: the network in eval mode, :func:`describe_bundle`'s description,
        and the parser (for the caller's other config ids).

    Raises:
        FileNotFoundError: naming the missing config or weights.
        WeightsMismatchError: the weights do not fit the network; the message names the weights file, the bundle's
            ``network_def``, ``patch_size`` and ``num_classes``, and the first mismatched keys or shapes.
    """
    root = Path(bundle_dir).resolve()
    parser = bundle_parser(root, device=device)
    path = root / "models" / "model.pt" if weights is None else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model weights not found; train the bundle or copy its state dict there")
    try:
        network = load_weights(parser.get_parsed_content(net_id, instantiate=True), path, device)
    except WeightsMismatchError as e:
        raise e.for_network(bundle_network_label(parser, root)) from e
    return network.to(device), describe_bundle(parser), parser
