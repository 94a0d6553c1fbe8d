"""Datasets that cache the deterministic preprocessing: in RAM, on disk, or not at all.

:func:`make_dataset` builds ``CacheDataset`` (``"ram"``), :class:`SafePersistentDataset` (``"disk"``, for cohorts
larger than RAM) or a plain ``Dataset`` (``"none"``). Either cache keeps what the chain gives up to its first random
transform, i.e. :func:`~volcnn.transforms.deterministic_transforms`.

On disk a cached file is named ``<sha256 of the datalist entry><transform_fingerprint>.pt``.
:func:`transform_fingerprint` hashes the configuration of every cached transform (``pixdim``, ``hu_window``,
``patch_size``, ``margin``, ...), not only their class names as MONAI's ``json_hashing`` falls back to for our
transforms, so changing a setting writes a new cache instead of silently reusing a stale one. The entry's hash
covers its image path, not the file's content: rewrite the images in place and you must clear ``cache_dir``.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import logging
import math
import os
import pathlib
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import look_up_option

import volcnn

__all__ = ["CACHE_FORMAT", "CACHE_MODES", "SafePersistentDataset", "make_dataset", "shard", "transform_fingerprint"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bump when the layout of a cached item changes; it is part of :func:`transform_fingerprint`."""

CACHE_MODES = ("ram", "disk", "none")

_SMALL_ARRAY = 64  # arrays up to this many elements are described by value, larger ones by a digest of their bytes
_MAX_DEPTH = 16
_SKIP = object()  # marks an attribute left out of a description
_RUNTIME_TYPES = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Condition,
    np.random.RandomState,
    np.random.Generator,
    torch.Generator,
)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _describe_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    out: dict[str, Any] = {"dtype": str(a.dtype), "shape": list(a.shape)}
    if a.dtype != object and a.size <= _SMALL_ARRAY:
        out["values"] = [_describe(v, 0, set()) for v in a.ravel().tolist()]
    elif a.dtype != object:
        out["md5"] = hashlib.md5(a.tobytes(), usedforsecurity=False).hexdigest()
    return out


def _describe(obj: Any, depth: int, stack: set[int]) -> Any:
    """A JSON-able description of ``obj`` that is the same in every process (no ids, addresses or set order)."""
    if obj is None or isinstance(obj, bool | int | str) and not isinstance(obj, enum.Enum):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)  # "nan", "inf", "-inf"
    if isinstance(obj, enum.Enum):
        return f"{_qualname(type(obj))}.{obj.name}"
    if isinstance(obj, np.generic):
        return _describe(obj.item(), depth, stack)
    if isinstance(obj, np.ndarray):
        return _describe_array(obj)
    if isinstance(obj, torch.Tensor):
        t = torch.as_tensor(obj).detach().cpu()
        return _describe_array((t.float() if t.dtype == torch.bfloat16 else t).numpy())
    if isinstance(obj, torch.dtype | np.dtype | pathlib.PurePath):
        return str(obj)
    if isinstance(obj, type) or inspect.isroutine(obj):
        return _qualname(obj)
    if isinstance(obj, _RUNTIME_TYPES):
        return _SKIP
    if depth > _MAX_DEPTH:
        return {"class": _qualname(type(obj)), "truncated": True}
    if id(obj) in stack:
        return {"class": _qualname(type(obj)), "cycle": True}
    stack = stack | {id(obj)}
    if isinstance(obj, Mapping):
        items = ((k if isinstance(k, str) else json.dumps(_describe(k, depth + 1, stack)), v) for k, v in obj.items())
        return {k: d for k, v in items if (d := _describe(v, depth + 1, stack)) is not _SKIP}
    if isinstance(obj, list | tuple):
        return [d for v in obj if (d := _describe(v, depth + 1, stack)) is not _SKIP]
    if isinstance(obj, set | frozenset):
        return sorted(json.dumps(_describe(v, depth + 1, stack), sort_keys=True) for v in obj)
    if isinstance(obj, partial):
        return {
            "partial": _describe(obj.func, depth + 1, stack),
            "args": _describe(obj.args, depth + 1, stack),
            "keywords": _describe(obj.keywords, depth + 1, stack),
        }
    attrs = _attributes(obj)
    if attrs is None:  # an object without attributes: its class is all we can rely on
        return {"class": _qualname(type(obj))}
    out: dict[str, Any] = {"class": _qualname(type(obj))}
    for name in sorted(attrs):
        value = attrs[name]
        if name.startswith("_") and not (value is None or isinstance(value, bool | int | float | str | Transform)):
            continue  # other private objects are caches and locks; private scalars and transforms are settings
        if (d := _describe(value, depth + 1, stack)) is not _SKIP:
            out[name] = d
    return out


def _attributes(obj: Any) -> dict[str, Any] | None:
    if type(obj).__module__ == "builtins":
        return None
    attrs = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in attrs and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
    if not attrs and not hasattr(obj, "__dict__"):
        return None
    return attrs


def _cached_part(transforms: Any) -> list[Any]:
    """The transforms a MONAI cache keeps: the flattened chain up to its first random (or non-``Transform``) one."""
    if isinstance(transforms, Compose):
        flat = list(transforms.flatten().transforms)
    elif isinstance(transforms, Sequence) and not isinstance(transforms, str):
        flat = [t for tr in transforms for t in (tr.flatten().transforms if isinstance(tr, Compose) else [tr])]
    else:
        flat = [transforms]
    out = []
    for t in flat:
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            break
        out.append(t)
    return out


def transform_fingerprint(transforms: Any) -> bytes:
    """Hash of the configuration of the deterministic transforms, for ``PersistentDataset(hash_transform=...)``.

    MONAI passes the list of transforms it caches (the flattened chain up to the first random one); a ``Compose``
    or a single transform is cut the same way, so ``transform_fingerprint(Compose([det, aug]))`` equals
    ``transform_fingerprint(det)``. Every transform is described recursively: its qualified class name and its
    attributes (numbers, strings, sequences, mappings, arrays by value or digest, nested transforms and chains;
    private objects such as caches and locks, and random states, are left out). ``volcnn.__version__``,
    ``monai.__version__`` and :data:`CACHE_FORMAT` are included too, so an upgrade never reads an older cache.
    So is the list of image readers MONAI's ``LoadImage`` registers, which depends on the optional packages
    installed: machines sharing a cache folder should share the environment.

    Returns:
        The md5 hex digest (32 characters) as ASCII bytes; the same in every process.
    """
    payload = {
        "cache_format": CACHE_FORMAT,
        "volcnn": volcnn.__version__,
        "monai": monai.__version__,
        "transforms": [_describe(t, 0, set()) for t in _cached_part(transforms)],
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest().encode("ascii")


def _storable(obj: Any) -> Any:
    """``obj`` with numpy arrays turned into tensors, so that ``torch.load(weights_only=True)`` reads it back."""
    if isinstance(obj, MetaTensor):
        out = MetaTensor(obj.as_tensor(), meta=_storable(dict(obj.meta)))
        out.applied_operations = _storable(list(obj.applied_operations))
        out.is_batch = obj.is_batch
        return out
    if isinstance(obj, np.ndarray):
        return torch.as_tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):  # MONAI's TraceKeys (str enums) in applied_operations: plain values load safely
        return _storable(obj.value)
    if isinstance(obj, Mapping):
        return {_storable(k): _storable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_storable(v) for v in obj) if not hasattr(obj, "_fields") else obj
    return obj


class SafePersistentDataset(PersistentDataset):
    """``PersistentDataset`` whose cache files round-trip exactly and survive kills and corruption.

    Differences from MONAI's:

    * an item is stored as the transforms returned it (MetaTensors keep their affine and meta, plain tensors stay
      plain) with numpy arrays in the meta turned into tensors: MONAI's ``track_meta=True`` stores them as numpy,
      which ``torch.load(weights_only=True)`` refuses, so every read fell back to recomputing;
    * writes go to a temporary file in ``cache_dir`` then ``os.replace``, atomic on every file system (MONAI's
      temporary folder is under ``/tmp``, and ``shutil.move`` across file systems is a plain copy);
    * an unreadable cache file (truncated by a full disk, a kill, ...) is deleted and recomputed with a warning
      naming it; MONAI 1.6 raised ``EOFError`` / ``OSError`` / ``RuntimeError`` for most truncations;
    * a failed write (read-only or full disk) warns and returns the computed item.
    """

    def _cachecheck(self, item_transformed: Any) -> Any:
        if self.cache_dir is None:
            return self._pre_transform(deepcopy(item_transformed))
        name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
        hashfile = self.cache_dir / f"{name}.pt"
        if hashfile.is_file():
            try:
                with torch.serialization.safe_globals([MetaTensor]):
                    return torch.load(hashfile, weights_only=self.weights_only)
            except PermissionError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed, loudly
                warnings.warn(
                    f"unreadable cache file {hashfile} ({type(e).__name__}: {str(e)[:200]}); recomputing it",
                    stacklevel=2,
                )
                hashfile.unlink(missing_ok=True)
        # the entry that was hashed stays unchanged; the item returned is what a later read of the file gives, so
        # a batch never mixes fresh items (numpy in their meta) with cached ones (tensors)
        item = _storable(self._pre_transform(deepcopy(item_transformed)))
        self._write(hashfile, item)
        return item

    def _write(self, hashfile: Path, item: Any) -> None:
        tmp = hashfile.with_name(f".{hashfile.name}.{uuid.uuid4().hex}.tmp")  # hidden, never taken for a cache hit
        try:
            pickle_module = look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD)
            torch.save(item, tmp, pickle_module=pickle_module, pickle_protocol=self.pickle_protocol)
            os.replace(tmp, hashfile)
        except OSError as e:  # read-only or full cache_dir: go on uncached (MONAI ignores PermissionError, #3613)
            warnings.warn(f"could not write cache file {hashfile} ({e}); this item stays uncached", stacklevel=3)
        finally:
            tmp.unlink(missing_ok=True)


def shard(
    data: Sequence[Any], rank: int, world_size: int, even_divisible: bool = True, stratify: str | None = None
) -> list[Any]:
    """This rank's part of ``data``: contiguous blocks, one per class with ``stratify``, sizes within one of each other.

    Contiguous blocks keep the candidates of one volume together, so each rank reads (and caches) mostly its own
    volumes. With ``stratify`` (a key of the entries, e.g. ``"label"``) each class is split on its own and the
    remainders are dealt round the ranks in turn, so every rank holds about ``1 / world_size`` of every class: a
    rank's class-balanced sampler then draws what a global one would, even for a class of a handful of nodules.
    The entries keep their order within the part. ``even_divisible`` pads the shorter parts with their own first
    items so that every rank runs the same number of steps (training); leave it ``False`` for evaluation, where
    duplicates would bias the metrics.

    Raises:
        ValueError: for a rank outside ``[0, world_size)``, an entry without the ``stratify`` key, or (without
            ``even_divisible``) fewer entries than ranks: a rank with nothing to evaluate would skip the evaluation
            and leave the others waiting for it in the gather of the metrics.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not even_divisible and 0 < len(data) < world_size:
        raise ValueError(
            f"{len(data)} datalist entries cannot be split over {world_size} processes without leaving one with "
            "none (it would skip evaluation and the others would wait for it forever); run fewer processes"
        )
    groups: dict[Any, list[int]] = {}
    for i, entry in enumerate(data):
        if stratify is None:
            key = None
        elif isinstance(entry, dict) and stratify in entry:
            key = entry[stratify]
        else:
            raise ValueError(f"cannot stratify the shards by {stratify!r}: datalist entry {i} has no such key")
        groups.setdefault(key, []).append(i)
    mine: list[int] = []
    offset = 0  # which rank takes the next left-over entry
    for key in sorted(groups, key=repr):
        members = groups[key]
        base, extra = divmod(len(members), world_size)
        sizes = [base + int((r - offset) % world_size < extra) for r in range(world_size)]
        start = sum(sizes[:rank])
        mine += members[start : start + sizes[rank]]
        offset = (offset + extra) % world_size
    part = [data[i] for i in sorted(mine)]
    n = len(data)
    if even_divisible and n:
        size = -(-n // world_size)
        part = part or [data[rank % n]]
        part += [part[i % len(part)] for i in range(size - len(part))]
    return part


def make_dataset(
    data: Sequence[Any],
    transform: Callable | Sequence[Callable],
    cache: str = "ram",
    cache_dir: str | os.PathLike[str] | None = None,
    cache_rate: float = 1.0,
    num_workers: int | None = 1,
    hash_transform: bool | Callable[..., bytes] = True,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    even_divisible: bool = True,
) -> Dataset:
    """A dataset of ``data`` through ``transform`` whose deterministic part is cached as ``cache`` says.

    Args:
        data: datalist entries (``{"image": path, "label": int, ["center": [x, y, z]]}``).
        transform: the whole chain; what precedes its first random transform is cached.
        cache: ``"ram"`` (``CacheDataset``, filled up front), ``"disk"`` (:class:`SafePersistentDataset`, filled
            on first access, shared by later runs with the same transforms) or ``"none"`` (``Dataset``).
        cache_dir: the folder of the disk cache (created); required for ``"disk"``.
        cache_rate: fraction of the entries cached in RAM (``"ram"`` only).
        num_workers: threads filling the RAM cache (``"ram"`` only).
        hash_transform: ``True`` names disk cache files after :func:`transform_fingerprint`, ``False`` after
            the entries only (stale caches go unnoticed), or a callable used as MONAI's ``hash_transform``.
        progress: show a progress bar while filling the RAM cache.
        rank, world_size: with ``world_size > 1``, keep only this rank's :func:`shard` of ``data``.
        even_divisible: see :func:`shard`.

    Raises:
        ValueError: an unknown ``cache``, ``"disk"`` without ``cache_dir``, a bad ``cache_rate`` or rank.
    """
    mode = str(cache).strip().lower()
    if mode not in CACHE_MODES:
        raise ValueError(
            f"cache must be one of {', '.join(map(repr, CACHE_MODES))}, got {cache!r} (bundle key 'cache')"
        )
    if world_size is not None and world_size > 1:
        if rank is None:
            raise ValueError(f"world_size={world_size} needs this process's rank")
        data = shard(data, rank, world_size, even_divisible)
    if mode == "ram":
        if not 0.0 <= float(cache_rate) <= 1.0:
            raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate!r} (bundle key 'cache_rate')")
        return CacheDataset(data, transform, cache_rate=float(cache_rate), num_workers=num_workers, progress=progress)
    if mode == "none":
        return Dataset(data, transform)
    if cache_dir is None or str(cache_dir) == "":
        raise ValueError("cache='disk' needs a cache folder: set the bundle key 'cache_dir'")
    hasher = transform_fingerprint if hash_transform is True else (hash_transform or None)
    ds = SafePersistentDataset(data, transform, cache_dir=Path(cache_dir), hash_transform=hasher)  # type: ignore[arg-type]
    logger.info("disk cache of %d entries in %s (transforms %s)", len(data), cache_dir, ds.transform_hash or "unhashed")
    return ds
