"""A trained network's weights: loading a state dict into a network (weights only), and what identifies a model.

Bundles store the best weights as a plain state dict (``models/model.pt``); other tools nest them under
``network`` / ``model`` / ``net`` next to optimiser state. Every load goes through ``torch.load(weights_only=True)``:
a checkpoint can hold tensors and plain containers, never code.

Weights that do not fit the network (another ``network_def``, ``num_classes`` or a patch size that changes a layer)
are refused with :class:`WeightsMismatchError`, which names the file, the network and the first mismatched keys and
shapes, before ``load_state_dict`` is called: PyTorch's own ``RuntimeError`` lists every key, and inside a bundle
config MONAI wraps it as an unclear "Failed to evaluate ConfigExpression".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volcnn.core.errors import VolcnnError
from volcnn.core.hashing import sha256_file

__all__ = [
    "WEIGHT_KEYS",
    "WeightsMismatchError",
    "find_weights_mismatch",
    "load_weights",
    "model_info",
    "read_state_dict",
    "weights_key",
    "weights_mismatches",
]

#: keys under which a nested checkpoint holds the network's state dict, in the order they are tried
WEIGHT_KEYS = ("network", "model", "net")
#: mismatched keys or shapes named per kind in a :class:`WeightsMismatchError` message
SHOWN = 3


class WeightsMismatchError(VolcnnError, ValueError):
    """A state dict does not fit the network it is loaded into (exit code 1; ``volcnn infer`` and ``volcnn export``
    report it as an unusable bundle, exit 2).

    Attributes:
        path: the weights file.
        network: what the weights were loaded into, e.g. ``"the network SeedCNN3d"`` or, from a bundle,
            ``"the network of bundle B (network_def 'valid_cnn3d', patch_size [16, 16, 16], num_classes 2)"``.
        problems: one phrase per kind of mismatch (missing keys, unexpected keys, shapes), each naming the first few.
    """

    def __init__(self, path: str | os.PathLike[str], network: str, problems: list[str]) -> None:
        self.path, self.network, self.problems = str(path), network, list(problems)
        super().__init__(f"{self.path}: these weights do not fit {network}: {'; '.join(self.problems)}")

    def for_network(self, network: str) -> WeightsMismatchError:
        """The same mismatch with ``network`` described otherwise (a bundle adds its settings)."""
        return WeightsMismatchError(self.path, network, self.problems)


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def weights_mismatches(network: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """What keeps ``network.load_state_dict(state)`` (strict) from loading: empty when the weights fit.

    Returns:
        Up to three phrases: keys the network has and the weights lack, keys the weights have and the network lacks,
        and tensors whose shapes differ (``key: weights (2, 64) vs network (3, 64)``), each naming the first
        :data:`SHOWN` of its kind in the network's order.
    """
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: weights {tuple(v.shape)} vs network {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} key(s) of the network missing from the weights ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the network does not have ({_names(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) ({_names(shapes)})")
    return problems


def find_weights_mismatch(error: BaseException) -> WeightsMismatchError | None:
    """The :class:`WeightsMismatchError` behind ``error``, following ``__cause__`` / ``__context__`` (MONAI's config
    parser raises ``RuntimeError("Failed to evaluate ...")`` from the error of a ``$`` expression), or ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, WeightsMismatchError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


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
        WeightsMismatchError: the weights do not fit the network (see :func:`weights_mismatches`); ``network`` is
            left untouched.
    """
    state = read_state_dict(path, device)
    problems = weights_mismatches(network, state)
    if problems:
        raise WeightsMismatchError(path, f"the network {type(network).__name__}", problems)
    network.load_state_dict(state)
    return network.eval()


def model_info(ckpt_path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"name", "version", "sha256"}`` of a model: name and version from bundle metadata, sha256 of the file."""
    meta = meta or {}
    return {"name": meta.get("name"), "version": meta.get("version"), "sha256": sha256_file(ckpt_path)}
