"""A packaged bundle's ``metadata.json``, made to describe the model it holds: input and output of
``network_data_format``, class names, and a changelog line saying where the weights came from.

MONAI's tools and the offline check (:func:`volcnn.bundle.verify_bundle`) read the network's input shape and its
output channels from ``network_data_format``; ``volcnn infer`` and the exports read the class names from the
output's ``channel_def``. A bundle copied from the source keeps the source's description, which is wrong as soon as
the run used another ``patch_size``, ``num_classes`` or datalist labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["class_names", "packaged_metadata", "packaged_version"]


def class_names(
    labels: Mapping[str, str] | None, num_classes: int, fallback: Mapping[str, Any] | None = None
) -> list[str]:
    """Names of the ``num_classes`` outputs: the datalist's label names, else the source bundle's ``channel_def``
    (``fallback``) when it names exactly that many classes, else ``class 0``, ``class 1``... A label the datalist
    does not name reads ``class i``."""
    if labels:
        return [str(labels.get(str(i), f"class {i}")) for i in range(num_classes)]
    fallback = fallback or {}
    if sorted(fallback) == [str(i) for i in range(num_classes)]:
        return [str(fallback[str(i)]) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def packaged_version(version: object, weights_sha256: str) -> str:
    """The source bundle's version with the weights' sha256 (12 hex digits) as a local label, ``0.3.0+1a2b3c4d5e6f``
    (PEP 440 local version, semver build metadata): the bundle code's release and which trained model it holds.
    A label already there (a packaged bundle packaged again) is replaced."""
    base = str(version or "0.0.0").split("+", 1)[0]
    return f"{base}+{weights_sha256[:12]}"


def _setting_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items())


def _raw_width(features: Any) -> int:
    from volcnn.io.features import parse_feature_spec

    return parse_feature_spec(features).n_columns


def packaged_metadata(
    meta: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    mode: str,
    labels: Mapping[str, str] | None,
    in_channels: int,
    weights_sha256: str,
    datalist_sha256: str | None,
    volcnn_version: str,
) -> dict[str, Any]:
    """``meta`` (the source bundle's metadata) describing the packaged model.

    Args:
        meta: the source metadata.
        settings: the train.json settings written into the configs (``patch_size``, ``num_classes`` and
            ``intensity`` used here).
        mode: ``"candidate"`` (the input is a patch around a candidate) or ``"volume"`` (the whole volume, fitted).
        labels: the training datalist's label names, ``{"0": "non-nodule", ...}``, or ``None``.
        in_channels: the network's input channels C.
        weights_sha256: sha256 of ``models/model.pt``.
        datalist_sha256: sha256 of the training datalist.
        volcnn_version: the volcnn that packages.

    Returns:
        A new dict: ``version`` from :func:`packaged_version` with a ``changelog`` entry for it;
        ``network_data_format``: input ``(C, *patch_size)`` (``is_patch_data`` in candidate mode), output
        ``num_classes`` channels named by :func:`class_names` (an input whose ``intensity`` is not ``hu`` has the
        ``format`` ``magnitude`` and an empty ``value_range``: no HU are assumed); ``label_classes`` /
        ``pred_classes`` naming the classes when the datalist has label names; for a clinical or fusion model
        (``settings["features"]``), ``modality`` and ``clinical_features`` (the declaration and the input layout).
    """
    out = json.loads(json.dumps(meta))  # a deep copy in JSON types
    num_classes = int(settings["num_classes"])
    fmt = out.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    pred = fmt.setdefault("outputs", {}).setdefault("pred", {})
    image["num_channels"] = int(in_channels)
    image["spatial_shape"] = [int(p) for p in settings["patch_size"]]
    image["is_patch_data"] = mode == "candidate"
    if str(settings.get("intensity", "hu")) != "hu":
        image["format"], image["value_range"] = "magnitude", []
    if len(image.get("channel_def", {})) != in_channels:
        image["channel_def"] = {str(i): "CT" if in_channels == 1 else f"channel {i}" for i in range(in_channels)}
    names = class_names(labels, num_classes, pred.get("channel_def"))
    pred["num_channels"] = num_classes
    pred["spatial_shape"] = [num_classes]
    pred["channel_def"] = {str(i): name for i, name in enumerate(names)}
    unit = "candidate patch" if mode == "candidate" else "volume"
    if labels:
        out["label_classes"] = f"integer class per {unit}: " + ", ".join(f"{i} = {n}" for i, n in enumerate(names))
        out["pred_classes"] = f"{num_classes}-channel class probabilities per {unit}: " + ", ".join(
            f"channel {i} = {n}" for i, n in enumerate(names)
        )
    features = settings.get("features")
    if features:  # a clinical or fusion model: its second input, declared beside the image's format
        out["modality"] = str(settings.get("modality", "fusion"))
        out["clinical_features"] = {
            "declaration": list(features),
            "input": f"raw vector (B, {_raw_width(features)}) float32 in declaration order (one-hot categoricals), "
            "NaN where missing; the network imputes and standardises with the training split's statistics",
            "supplied_by": "volcnn infer --features CSV (a 'case' column and one column per feature)",
        }
    source = f"{meta.get('name')} {meta.get('version')}"
    version = packaged_version(meta.get("version"), weights_sha256)
    datalist = f"; datalist sha256 {datalist_sha256[:12]}" if datalist_sha256 else ""
    out["version"] = version
    out["changelog"] = {
        **(meta.get("changelog") or {}),
        version: f"packaged by volcnn {volcnn_version} (volcnn package) from bundle {source} and a {mode}-mode "
        f"training run: {_setting_text(settings)}{datalist}; weights sha256 {weights_sha256[:12]}",
    }
    return out
