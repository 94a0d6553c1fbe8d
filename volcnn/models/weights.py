"""A trained network's weights: loading a state dict into a network (weights only), and what identifies a model.

Bundles store the best weights as a plain state dict (``models/model.pt``); other tools nest them under
``network`` / ``model`` / ``net`` next to optimiser state. Every load goes through ``torch.load(weights_only=True)``:
a checkpoint can hold tensors and plain containers, never code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volcnn.core.hashing import sha256_file

__all__ = ["WEIGHT_KEYS", "load_weights", "model_info", "read_state_dict", "weights_key"]

#: keys under which a nested checkpoint holds the network's state dict, in the order they are tried
WEIGHT_KEYS = ("network", "model", "net")


def weights_key(state: Any) -> str:
    """The key of the network's weights in a nested checkpoint (one of :data:`WEIGHT_KEYS`), ``""`` for a plain
    state dict. ``state`` is the loaded checkpoint or its path (then loaded weights-only on the CPU)."""
    if isinstance(state, str | os.PathLike):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping):
        for key in WEIGHT_KEYS:
            if isinstance(state.get(key), Mapping):
                return key
    return ""


def read_state_dict(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Mapping[str, Any]:
    """The network's state dict in ``path`` (plain, or nested under a :data:`WEIGHT_KEYS` key), weights only.

    Raises:
        FileNotFoundError: naming ``path`` when it is missing.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model weights not found (expected the trained network's state dict)")
    state = torch.load(path, map_location=device, weights_only=True)
    key = weights_key(state)
    return state[key] if key else state


def load_weights(network: nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Load the state dict in ``path`` (see :func:`read_state_dict`) into ``network``; returns it in eval mode.

    Raises:
        FileNotFoundError: naming ``path`` when it is missing.
        RuntimeError: the weights do not fit the network (PyTorch names the mismatched keys and shapes).
    """
    network.load_state_dict(read_state_dict(path, device))
    return network.eval()


def model_info(ckpt_path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "version", "sha256"}`` of a model: name and version from bundle metadata, sha256 of the file."""
    meta = meta or {}
    return {"name": meta.get("name"), "version": meta.get("version"), "sha256": sha256_file(ckpt_path)}
