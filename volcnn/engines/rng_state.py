"""Every random-number state a training run consumes, in a form ``torch.load(weights_only=True)`` accepts.

Exact resume needs more than Ignite's engine state: Python's ``random``, NumPy's global generator, torch's CPU
and CUDA generators, any ``torch.Generator`` owned by the data loader or its sampler, and the private NumPy
``RandomState`` that every MONAI ``Randomizable`` transform keeps (``transform.R``). NumPy states hold
ndarrays, which the weights-only unpickler refuses, so they are stored as int64 tensors.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

__all__ = ["capture_rng", "restore_rng", "transform_random_states"]


def _np_state_to_tensor(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _np_state_from_tensor(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def transform_random_states(root: Any) -> list[np.random.RandomState]:
    """The distinct ``RandomState`` objects of every ``Randomizable`` reachable from ``root``, in a fixed order.

    Walks Compose chains and the attributes of transforms (dict transforms wrap array transforms that keep
    their own generator, e.g. ``RandAffined.rand_affine``). The order depends only on the transform chain,
    so it is the same in the run that saves and the run that resumes.
    """
    seen_objects: set[int] = set()
    seen_states: set[int] = set()
    found: list[np.random.RandomState] = []

    def walk(obj: Any, depth: int) -> None:
        if depth > 8 or id(obj) in seen_objects:
            return
        if isinstance(obj, list | tuple):
            for item in obj:
                walk(item, depth + 1)
            return
        ours = type(obj).__module__.startswith(("monai.transforms", "volcnn"))
        if not hasattr(obj, "__dict__") or not (ours or isinstance(obj, Transform | Randomizable)):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, Randomizable):
            state = getattr(obj, "R", None)
            if isinstance(state, np.random.RandomState) and id(state) not in seen_states:
                seen_states.add(id(state))
                found.append(state)
        for value in vars(obj).values():
            walk(value, depth + 1)

    walk(root, 0)
    return found


def capture_rng(transform: Any = None, generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of all RNG states; ``transform`` is the training transform chain, ``generators`` named
    ``torch.Generator`` objects (e.g. the data loader's)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state_to_tensor(tuple(np.random.get_state())),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "transforms": [_np_state_to_tensor(tuple(r.get_state())) for r in transform_random_states(transform)],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng(
    state: dict[str, Any], transform: Any = None, generators: dict[str, torch.Generator] | None = None
) -> None:
    """Put back a :func:`capture_rng` snapshot.

    Raises:
        ValueError: when the transform chain has a different number of random generators than the one saved
            (the training transforms changed since the checkpoint was written); nothing is restored then.
    """
    randoms = transform_random_states(transform)
    saved = state.get("transforms", [])
    if len(saved) != len(randoms):  # checked first, so a refused snapshot changes no generator
        raise ValueError(
            f"the checkpoint holds {len(saved)} random transform states but the training transforms have "
            f"{len(randoms)}: the augmentation chain changed since it was written"
        )
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_np_state_from_tensor(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    for r, s in zip(randoms, saved, strict=True):
        r.set_state(_np_state_from_tensor(s))
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


def _as_python_state(value: Any) -> tuple:
    """``random.setstate`` wants tuples; a weights-only load may give lists."""
    version, internal, gauss = value
    return (int(version), tuple(int(v) for v in internal), gauss)
