"""Building an :class:`~volcnn.inference.InferenceRunner` from a bundle or from an exported model.

The model itself comes from :mod:`volcnn.models` (the bundle's config, weights and metadata; an exported file and
its embedded settings); here it is wired into a runner with the settings of the bundle's ``inference.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from volcnn.inference.runner import InferenceRunner
from volcnn.models.bundle_config import bundle_parser, bundle_weights_error
from volcnn.models.exported import load_exported

__all__ = ["exported_runner", "load_bundle_runner"]


def load_bundle_runner(bundle_dir: str | os.PathLike[str], **overrides: Any) -> InferenceRunner:
    """Build the :class:`InferenceRunner` of a bundle from ``configs/inference.json`` and ``models/model.pt``.

    Args:
        bundle_dir: the bundle root.
        overrides: config ids to replace, e.g. ``device="cpu"``, ``stride_mm=8.0``, ``network_def="resnet18"``,
            ``heatmap_method="window"``, ``mode="volume"``. ``heatmap_method`` (``auto``, ``dense``, ``window``),
            ``mode`` (``candidate``, ``volume``) and ``margin``, taken from the config when it has the key, reach
            the runner even when the config's ``runner`` does not name them (a config that predates them); a
            config without ``mode`` is candidate mode.

    Raises:
        FileNotFoundError: naming the missing config or checkpoint.
        WeightsMismatchError: the checkpoint does not fit the config's network; raised as itself, not as the
            ``RuntimeError("Failed to evaluate ...")`` MONAI's parser wraps it in, and naming the bundle's
            ``network_def``, ``patch_size`` and ``num_classes`` besides the weights file and the first mismatches.
        TypeError: the config's ``runner`` is not an :class:`InferenceRunner`.
    """
    root = Path(bundle_dir)
    parser = bundle_parser(root, overrides=overrides)
    for key, arg in (("heatmap_method", "method"), ("mode", "mode"), ("margin", "margin")):
        if key in parser and arg not in parser["runner"]:  # a config that predates the key
            parser[f"runner#{arg}"] = f"@{key}"
    ckpt = Path(str(parser.get_parsed_content("ckpt_path")))
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: model weights not found; train the bundle or copy its state dict there")
    try:
        runner = parser.get_parsed_content("runner")
    except Exception as e:
        mismatch = bundle_weights_error(e, parser, root)
        if mismatch is None:
            raise
        raise mismatch from e
    if not isinstance(runner, InferenceRunner):
        raise TypeError(
            f"{root / 'configs' / 'inference.json'}: 'runner' must build a volcnn.inference.InferenceRunner, "
            f"got {type(runner)}"
        )
    return runner


def exported_runner(model: str | os.PathLike[str], **overrides: Any) -> InferenceRunner:
    """An :class:`InferenceRunner` around an exported ``.ts`` / ``.onnx`` model and its embedded settings.

    Args:
        model: the exported file.
        overrides: :class:`InferenceRunner` arguments (``device``, ``stride_mm``...); ``heatmap_method`` may only be
            ``window`` (an exported graph cannot be split into trunk and head). The ``mode`` comes from the file's
            description (a volume-mode model runs in volume mode).

    Raises:
        ValueError: ``heatmap_method="dense"``.
        FileNotFoundError, ExportedModelError: as :func:`~volcnn.models.load_exported`.
    """
    device = overrides.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if "tta_flips" in overrides:  # the bundle config's name of the runner's option
        overrides["flips"] = overrides.pop("tta_flips")
    if overrides.pop("heatmap_method", "window") == "dense":
        raise ValueError("an exported model runs window by window only (its graph cannot be split into trunk and head)")
    network, settings = load_exported(model, device=device, findings=True)
    return InferenceRunner(network, **{**settings, "device": device, "method": "window", **overrides})
