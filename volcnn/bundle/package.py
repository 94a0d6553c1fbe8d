"""Packaging a trained bundle: a configured copy of a bundle with its weights in ``models/``.

The configs of a packaged bundle describe the model it holds (network, patch size, spacing, window), so
``volcnn infer --bundle DIR`` and ``python -m monai.bundle run --config_file DIR/configs/inference.json`` need no
overrides. ``models/model.ts`` is written by :func:`volcnn.bundle.verify_bundle`'s export check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from volcnn.core.atomic import atomic_path, atomic_write_json

__all__ = ["configure_bundle", "install_model", "CONFIG_FILES"]

logger = logging.getLogger(__name__)

#: configs whose top-level keys hold the model and data settings (evaluate.json overlays train.json)
CONFIG_FILES = ("train.json", "inference.json")


def configure_bundle(src: str | os.PathLike[str], dst: str | os.PathLike[str], settings: dict[str, Any]) -> Path:
    """Copy the bundle ``src`` to ``dst`` (without weights or run outputs) and set top-level config keys.

    Args:
        src: a bundle folder (``configs/``, ``docs/``, ``LICENSE``).
        dst: the new bundle folder; replaced if it exists.
        settings: top-level keys written into every config of :data:`CONFIG_FILES`, e.g.
            ``{"network_def": "seed_cnn3d", "patch_size": [32, 32, 32]}``. ``patch_size`` and ``num_classes``
            are also written into ``metadata.json``'s ``network_data_format``.

    Returns:
        ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{src}: not a bundle (no configs/metadata.json)")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    for name in CONFIG_FILES:
        path = dst / "configs" / name
        config = json.loads(path.read_text())
        config.update(settings)
        atomic_write_json(path, config)
    meta_path = dst / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    fmt = meta.get("network_data_format", {})
    if "patch_size" in settings and "image" in fmt.get("inputs", {}):
        fmt["inputs"]["image"]["spatial_shape"] = list(settings["patch_size"])
    if "num_classes" in settings and "pred" in fmt.get("outputs", {}):
        fmt["outputs"]["pred"]["num_channels"] = int(settings["num_classes"])
        fmt["outputs"]["pred"]["spatial_shape"] = [int(settings["num_classes"])]
    atomic_write_json(meta_path, meta)
    logger.info("configured bundle %s from %s with %s", dst, src, sorted(settings))
    return dst


def install_model(bundle_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str]) -> Path:
    """Copy a trained state dict into ``bundle_dir/models/model.pt`` after checking it loads weights-only.

    Raises:
        ValueError: naming the checkpoint when it is not a weights-only loadable state dict.
    """
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{checkpoint}: not a weights-only loadable checkpoint ({e})") from e
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    dest = Path(bundle_dir) / "models" / "model.pt"
    with atomic_path(dest) as tmp:
        shutil.copyfile(checkpoint, tmp)
    return dest
