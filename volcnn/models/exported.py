"""Loading an exported classifier (TorchScript ``.ts``, ONNX ``.onnx``, or a bundle's ``.pt``) with its settings.

An exported model carries the preprocessing it was trained with, so it can run without its bundle::

    .ts    MONAI ``ckpt_export`` extra files: ``metadata.json`` (the bundle metadata, to which
           :func:`~volcnn.bundle.export_bundle` adds the description under the key ``"volcnn"``) and
           ``inference.json`` (the bundle's inference config)
    .onnx  ONNX ``metadata_props``: ``"volcnn"`` (the description, JSON), ``"metadata.json"``, ``"inference.json"``
    .pt    a state dict: the network definition and settings come from the bundle it belongs to

The description (:func:`~volcnn.models.describe_bundle`) holds ``patch_size``, ``pixdim``, ``hu_window``,
``in_channels``, ``num_classes``, ``class_names``, ``network_def``, the inference ``mode`` (``candidate`` or
``volume``, as the model was trained) with the ``margin`` of its preprocessing, the bundle's name and version, and,
once exported, the source checkpoint's sha256 and the exporter. :func:`load_exported` returns a module
``(B, C, *patch_size)`` -> logits ``(B, K)`` and the :class:`~volcnn.inference.InferenceRunner` keyword arguments of
the model::

    >>> net, settings = load_exported("bundle/models/model.onnx")  # doctest: +SKIP
    >>> runner = InferenceRunner(net, **settings, stride_mm=8.0)  # doctest: +SKIP

A model trained with clinical features (``modality`` ``clinical`` or ``fusion``) takes them as a second input, the
raw encoding ``(B, C)`` of :meth:`~volcnn.io.features.FeatureSpec.encode` (NaN where missing); its description holds
their declaration under ``features``, and the settings pass it on, so the runner gives each case its values.

A ``.ts`` or ``.onnx`` module is opaque (it cannot be split into a feature extractor and a head), so whole-volume
inference of a candidate-mode model runs it window by window; a volume-mode model runs once per volume either way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.core.errors import VolcnnError
from volcnn.core.hashing import sha256_file
from volcnn.io.features import FeatureError, parse_feature_spec
from volcnn.models.bundle_config import (
    CONFIG_FILE,
    INFERENCE_MODES,
    META_FILE,
    check_mode,
    describe_bundle,
    load_bundle_network,
    parser_from,
)
from volcnn.models.weights import WeightsMismatchError
from volcnn.transforms.intensity import INTENSITY_MODES, check_intensity

__all__ = [
    "EXPORTED_SUFFIXES",
    "METADATA_KEY",
    "ExportedModel",
    "ExportedModelError",
    "OnnxModel",
    "feature_columns",
    "TorchScriptModel",
    "load_exported",
    "read_description",
]

logger = logging.getLogger(__name__)

#: key of the model description in ``metadata.json`` (TorchScript) and in the ONNX ``metadata_props``
METADATA_KEY = "volcnn"
#: the extra files / metadata_props holding the bundle's metadata and inference config are ``META_FILE`` and
#: ``CONFIG_FILE`` of :mod:`volcnn.models.bundle_config`
EXPORTED_SUFFIXES = (".ts", ".onnx", ".pt")


class ExportedModelError(VolcnnError, ValueError):
    """An exported model cannot be used: unknown extension, corrupt file, missing or invalid metadata."""


def _description_from_files(
    path: Path, meta_text: str | None, config_text: str | None, described_text: str | None = None
) -> dict[str, Any]:
    """The description from an exported file's embedded metadata: the ``volcnn`` entry, else the inference config.

    Args:
        path: the file, for messages.
        meta_text: the embedded ``metadata.json`` (for TorchScript, with the description under ``volcnn``).
        config_text: the embedded ``inference.json``.
        described_text: the description as its own JSON text (ONNX ``metadata_props["volcnn"]``).
    """
    try:
        meta = json.loads(meta_text) if meta_text else {}
        config = json.loads(config_text) if config_text else None
        described = json.loads(described_text) if described_text else None
    except json.JSONDecodeError as e:
        raise ExportedModelError(f"{path}: embedded metadata is not valid JSON ({e})") from e
    meta = meta if isinstance(meta, dict) else {}
    described = meta.pop(METADATA_KEY, None) if described is None else described
    if isinstance(described, dict):
        _settings(path, described, "")  # raises on missing or mistyped settings
        return described
    if isinstance(config, dict) and "patch_size" in config:  # e.g. a model.ts written by MONAI's ckpt_export alone
        try:
            return describe_bundle(parser_from(config, meta))
        except Exception as e:
            raise ExportedModelError(f"{path}: cannot read the settings from its embedded {CONFIG_FILE} ({e})") from e
    raise ExportedModelError(
        f"{path}: no model settings embedded (neither a '{METADATA_KEY}' entry nor an {CONFIG_FILE} with patch_size); "
        "export it with `volcnn.bundle.export_bundle` (or `monai.bundle ckpt_export` with the bundle's configs)"
    )


def _settings(path: Path, description: Mapping[str, Any], sha256: str) -> dict[str, Any]:
    """InferenceRunner keyword arguments from a description: patch_size, pixdim, intensity, hu_window, mode, margin,
    model_info.

    A description written before ``mode`` existed (version 1) is a candidate-mode model with the default margin; one
    written before ``intensity`` existed windows HU (``hu``).
    """
    try:
        patch = tuple(int(p) for p in description["patch_size"])
        pixdim = tuple(float(p) for p in description["pixdim"])
        window = tuple(float(w) for w in description["hu_window"])
        margin = int(description.get("margin", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportedModelError(f"{path}: embedded model settings lack or mistype {e}") from e
    if len(patch) != 3 or len(pixdim) != 3 or len(window) != 2:
        raise ExportedModelError(
            f"{path}: bad embedded settings patch_size {patch}, pixdim {pixdim}, hu_window {window}"
        )
    try:
        mode = check_mode(description.get("mode", INFERENCE_MODES[0]), f"{path}: embedded settings")
    except ValueError as e:
        raise ExportedModelError(str(e)) from e
    try:
        intensity = check_intensity(str(description.get("intensity", INTENSITY_MODES[0])))
    except ValueError as e:
        raise ExportedModelError(f"{path}: embedded settings: {e}") from e
    info = {"name": description.get("bundle_name"), "version": description.get("bundle_version"), "sha256": sha256}
    feature_columns(path, description)  # a bad embedded declaration is refused here, naming the file
    extra = {} if description.get("features") is None else {"features": description["features"]}
    return {
        **extra,
        "patch_size": patch,
        "pixdim": pixdim,
        "intensity": intensity,
        "hu_window": window,
        "mode": mode,
        "margin": margin,
        "model_info": info,
    }


def _finding_settings(path: Path, description: Mapping[str, Any]) -> dict[str, Any]:
    """InferenceRunner keyword arguments of the findings (threshold, calibration, ...) a version-3 description embeds
    (:func:`~volcnn.models.describe_bundle`); ``{}`` for an older one, which runs on the runner's defaults."""
    findings = description.get("findings") or {}
    if not isinstance(findings, Mapping):
        raise ExportedModelError(f"{path}: embedded 'findings' settings are not an object")
    # the bundle's name of the runner's option: tta_flips -> flips
    return {("flips" if k == "tta_flips" else k): v for k, v in findings.items() if v is not None}


def feature_columns(path: Path, description: Mapping[str, Any]) -> int:
    """C, the width of the raw clinical features the described network takes besides the image; 0 for none."""
    declared = description.get("features")
    if declared is None:
        return 0
    try:
        return parse_feature_spec(declared, f"{path}: embedded features").n_columns
    except FeatureError as e:
        raise ExportedModelError(str(e)) from e


class ExportedModel(nn.Module):
    """An exported classifier ``(B, C, *patch_size)`` [, features ``(B, F)``] -> logits ``(B, K)`` that checks its
    inputs.

    Attributes:
        path: the file it was loaded from.
        description: the embedded description (see :func:`~volcnn.models.bundle_config.describe_bundle`).
        input_shape: ``(C, *patch_size)``, the shape every sample must have.
        feature_columns: F, the width of the raw clinical features it takes (0: an image network).
    """

    def __init__(self, path: Path, description: Mapping[str, Any]) -> None:
        super().__init__()
        self.path = Path(path)
        self.description = dict(description)
        channels = int(self.description.get("in_channels", 1))
        self.input_shape = (channels, *(int(p) for p in self.description["patch_size"]))
        self.feature_columns = feature_columns(self.path, self.description)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, *patch_size)`` [and raw features ``(B, F)`` or ``(1, F)``, NaN where missing] -> logits ``(B, K)``.

        Raises:
            ValueError: naming the file when ``x`` does not have the exported input shape, or when features are
                missing, unwanted or of the wrong width.
        """
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.path}: the model takes input (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}"
            )
        if not self.feature_columns:
            if features is not None:
                raise ValueError(f"{self.path}: the model takes no clinical features")
            return self._run(x, None)
        if features is None:
            raise ValueError(f"{self.path}: the model takes clinical features (B, {self.feature_columns}) too")
        if features.ndim == 1:
            features = features[None]
        if features.ndim != 2 or features.shape[1] != self.feature_columns or features.shape[0] not in (1, len(x)):
            raise ValueError(
                f"{self.path}: the model takes features (B, {self.feature_columns}), got {tuple(features.shape)} "
                f"for {len(x)} images"
            )
        return self._run(x, features.to(x.device, torch.float32).expand(len(x), -1).contiguous())

    def _run(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        extra = f", feature_columns={self.feature_columns}" if self.feature_columns else ""
        return f"path={str(self.path)!r}, input_shape={self.input_shape}{extra}"


class TorchScriptModel(ExportedModel):
    """A TorchScript module with its description; the module is a submodule, so ``.to(device)`` moves it."""

    def __init__(self, path: Path, description: Mapping[str, Any], module: torch.jit.ScriptModule) -> None:
        super().__init__(path, description)
        self.module = module

    def _run(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.module(x) if features is None else self.module(x, features)
        return out


class OnnxModel(ExportedModel):
    """An ONNX model run by onnxruntime; inputs are copied to float32 numpy, outputs come back on the input's device.

    Args:
        path: the ``.onnx`` file.
        description: its embedded description.
        session: an ``onnxruntime.InferenceSession`` of the file.
    """

    def __init__(self, path: Path, description: Mapping[str, Any], session: Any) -> None:
        super().__init__(path, description)
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_name = session.get_outputs()[0].name
        self.providers = list(session.get_providers())
        if len(self.input_names) != (2 if self.feature_columns else 1):
            raise ExportedModelError(
                f"{path}: the graph has inputs {self.input_names}; its description "
                + ("declares clinical features (image, features)" if self.feature_columns else "an image network")
            )

    def _run(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        feeds = {self.input_names[0]: np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())}
        if features is not None:
            feeds[self.input_names[1]] = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([self.output_name], feeds)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, providers={self.providers}"


def _load_torchscript(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    extra = {META_FILE: "", CONFIG_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:
        raise ExportedModelError(f"{path}: cannot load the TorchScript model ({type(e).__name__}: {e})") from e
    texts = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in extra.items()}
    description = _description_from_files(path, texts[META_FILE], texts[CONFIG_FILE])
    return TorchScriptModel(path, description, module.eval()).to(device), description


def _load_onnx(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    import onnxruntime as ort  # type: ignore[import-untyped]

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        else:
            logger.warning("%s: onnxruntime has no CUDAExecutionProvider; running on the CPU", path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise ExportedModelError(f"{path}: cannot load the ONNX model ({type(e).__name__}: {e})") from e
    props = session.get_modelmeta().custom_metadata_map
    description = _description_from_files(path, props.get(META_FILE), props.get(CONFIG_FILE), props.get(METADATA_KEY))
    return OnnxModel(path, description, session), description


def _load_state_dict(
    path: Path, device: torch.device, bundle_dir: str | os.PathLike[str] | None
) -> tuple[nn.Module, dict[str, Any]]:
    if bundle_dir is None:
        guess = path.resolve().parent.parent
        if path.resolve().parent.name != "models" or not (guess / "configs" / CONFIG_FILE).is_file():
            raise ExportedModelError(f"{path}: a state dict needs its bundle (the network definition); pass bundle_dir")
        bundle_dir = guess
    try:
        network, description, _ = load_bundle_network(bundle_dir, path, device)
    except (FileNotFoundError, WeightsMismatchError):  # each names the file and the problem
        raise
    except Exception as e:
        raise ExportedModelError(f"{path}: cannot load the weights into the bundle's network ({e})") from e
    description.update(source_model=path.name, source_sha256=sha256_file(path))
    return network, description


def _load(
    path: Path, device: torch.device, bundle_dir: str | os.PathLike[str] | None
) -> tuple[nn.Module, dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in EXPORTED_SUFFIXES:
        raise ExportedModelError(f"{path}: unknown model format {suffix!r}; expected one of {EXPORTED_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if suffix == ".ts":
        return _load_torchscript(path, device)
    if suffix == ".onnx":
        return _load_onnx(path, device)
    return _load_state_dict(path, device, bundle_dir)


def read_description(
    path: str | os.PathLike[str], *, bundle_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The description of an exported model (see :func:`~volcnn.models.describe_bundle`); loads the model on the CPU.

    Raises:
        FileNotFoundError, ExportedModelError: as :func:`load_exported`.
    """
    return _load(Path(path), torch.device("cpu"), bundle_dir)[1]


def load_exported(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    bundle_dir: str | os.PathLike[str] | None = None,
    findings: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load an exported classifier and the settings to run it.

    Args:
        path: ``.ts`` (TorchScript from :func:`~volcnn.bundle.export_bundle` or MONAI ``ckpt_export``), ``.onnx``
            (from :func:`~volcnn.bundle.export_bundle`) or ``.pt`` (a state dict; needs its bundle).
        device: where the model runs. ONNX models run on onnxruntime's CUDA provider when ``device`` is CUDA and the
            provider is installed, on the CPU otherwise.
        bundle_dir: the bundle of a ``.pt``; by default the bundle the file lies in (``BUNDLE/models/model.pt``).
            Ignored for ``.ts`` and ``.onnx``.
        findings: also return the findings settings the bundle had when it was exported (``threshold``,
            ``operating_threshold``, ``nms``, ``score``, ``refine_mm``, ``flips``, ``calibration``...), so that the
            model reports the findings its bundle does.

    Returns:
        ``(network, settings)``: ``network`` maps ``(B, C, *patch_size)`` to logits ``(B, K)`` and is in eval mode:
        an :class:`ExportedModel` for ``.ts`` / ``.onnx`` (opaque; checks the input shape), the bundle's eager
        network for ``.pt``. ``settings`` are the :class:`~volcnn.inference.InferenceRunner` keyword arguments
        ``patch_size``, ``pixdim``, ``hu_window``, ``mode``, ``margin`` and ``model_info`` (bundle name and version,
        sha256 of ``path``), and ``features`` (their declaration) for a network that takes clinical features.

    Raises:
        FileNotFoundError: naming ``path`` when it is missing.
        ExportedModelError: naming ``path`` for an unknown extension, a corrupt file or missing settings.
    """
    path = Path(path)
    network, description = _load(path, torch.device(device), bundle_dir)
    settings = _settings(path, description, sha256_file(path))
    if findings:
        settings = {**_finding_settings(path, description), **settings}
    logger.info("loaded %s (%s, input %s)", path, type(network).__name__, settings["patch_size"])
    return network.eval(), settings
