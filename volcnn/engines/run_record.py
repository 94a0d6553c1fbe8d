"""What a training run resolved, recorded in its output folder (``RUN_DIR/run.json``) for ``volcnn package``.

A run trained with overrides (``--network_def``, ``--patch_size``, ``--hu_window``...) makes an inferable bundle
only when the bundle's configs carry the settings its weights were trained with. The run writes them down when
training starts, so that packaging reads them rather than asking the user to repeat them (and get one wrong), and so
that a resumed run cannot silently continue with other settings than it started with.

``run.json`` is one flat JSON object: the ``train.json`` keys the config's ``run_settings`` lists, as resolved
(``network_def``, ``num_classes``, ``patch_size``, ``pixdim``, ``intensity``, ``hu_window``, ``margin``,
``channels_last``, ``datalist``, ``dataset_dir``; a new setting is one more entry there, recorded, compared and
packaged like the others), plus provenance (:data:`PROVENANCE_KEYS`)::

    mode              "candidate" (every training entry has a ``center``) or "volume" (none has)
    labels            the datalist's label names, {"0": "non-nodule", "1": "nodule"}, or null
    datalist_sha256   sha256 of the datalist file
    bundle            {"name", "version", "root"}: the bundle metadata's name and version, bundle_root made absolute
    volcnn_version    the volcnn that trained
    record_version    1, the layout of this file

Settings keep their ``train.json`` names so that the record can go back to ``python -m monai.bundle run`` as
overrides (an ``--args_file``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from volcnn import __version__
from volcnn.core.atomic import atomic_write_json
from volcnn.core.errors import VolcnnError
from volcnn.core.hashing import sha256_file
from volcnn.core.options import as_bool
from volcnn.engines.dist import is_rank0
from volcnn.io.datalist import load_datalist, read_datalist_json

__all__ = [
    "LOCAL_KEYS",
    "MODES",
    "PROVENANCE_KEYS",
    "RECORD_VERSION",
    "RESUMABLE_KEYS",
    "RUN_FILE",
    "SETTING_DEFAULTS",
    "RunRecordError",
    "build_record",
    "changed_settings",
    "model_settings",
    "read_run_record",
    "record_run",
    "training_mode",
]

logger = logging.getLogger(__name__)

#: the record's file name in the run's output folder
RUN_FILE = "run.json"
#: version of the record's layout
RECORD_VERSION = 1
#: candidate mode: every training entry has a ``center`` (patches around it); volume mode: none has (whole volumes)
MODES = ("candidate", "volume")
#: recorded keys that are not train.json settings
PROVENANCE_KEYS = ("mode", "labels", "datalist_sha256", "bundle", "volcnn_version", "record_version")
#: train.json settings that say where this machine keeps the data: recorded, never packaged into a bundle
LOCAL_KEYS = ("datalist", "dataset_dir")
#: keys a resumed run may change (where the data lies, the code and bundle that run it); every other key must not
RESUMABLE_KEYS = (*LOCAL_KEYS, "bundle", "volcnn_version", "record_version")
#: settings added after runs were first recorded: a record without one was trained with this value
SETTING_DEFAULTS: dict[str, Any] = {"intensity": "hu", "modality": "image", "fusion": "concat", "features": None}
#: settings normalised to one JSON form, so that ``[2, 2, 2]`` given as a tuple or a list records the same
_PATHS = {"datalist", "dataset_dir"}
_BOOLS = {"channels_last"}


class RunRecordError(VolcnnError, ValueError):
    """A run record cannot be written or used: a datalist mixing candidate and volume entries, a setting that is not
    JSON, an unreadable ``run.json``, or a resumed run given other settings than it recorded (exit code 1)."""


def _plain(key: str, value: Any) -> Any:
    """``value`` as plain JSON types (tuples as lists, numpy scalars as numbers); refuses what JSON cannot hold."""
    if key in _BOOLS:
        return as_bool(value)
    if key in _PATHS and isinstance(value, str | os.PathLike):
        return os.path.abspath(os.path.expanduser(os.fspath(value)))
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(key, v) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise RunRecordError(f"run setting {key!r}: {value!r} ({type(value).__name__}) cannot be recorded as JSON")


def training_mode(datalist: str | os.PathLike[str], dataset_dir: str | os.PathLike[str] | None = None) -> str:
    """``"candidate"`` when every entry of the datalist's ``training`` section has a ``center``, ``"volume"`` when
    none has.

    Raises:
        RunRecordError: naming the datalist, when the section is empty or mixes the two kinds of entry (the crop
            would give the network candidate patches and fitted whole volumes in one run).
    """
    entries = load_datalist(datalist, "training", dataset_dir)
    centred = sum("center" in e for e in entries)
    if not entries:
        raise RunRecordError(f"{datalist}: the training section is empty")
    if 0 < centred < len(entries):
        raise RunRecordError(
            f"{datalist}: {centred} of the {len(entries)} training entries have a 'center' and the others do not; a "
            "run is either candidate mode (every entry has a center) or volume mode (none has)"
        )
    return "candidate" if centred else "volume"


def _labels(datalist: str | os.PathLike[str]) -> dict[str, str] | None:
    raw = read_datalist_json(datalist).get("labels")
    if not isinstance(raw, Mapping) or not raw:
        return None
    return {str(k): str(v) for k, v in raw.items()}


def build_record(
    settings: Mapping[str, Any], bundle_root: str | os.PathLike[str] = ".", meta: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The record of a run with these resolved ``settings`` (see the module docstring).

    Args:
        settings: train.json keys and their resolved values; must include ``datalist`` (mode, labels and hash are
            read from it).
        bundle_root: the bundle's ``bundle_root``.
        meta: the bundle's metadata (``name``, ``version``).

    Raises:
        RunRecordError: a setting that is not JSON, a provenance key among the settings, or a mixed datalist.
        DatalistError: the datalist cannot be read.
    """
    clash = sorted(set(settings) & set(PROVENANCE_KEYS))
    if clash:
        raise RunRecordError(f"run settings {clash} clash with the record's own keys {list(PROVENANCE_KEYS)}")
    if "datalist" not in settings:
        raise RunRecordError("run settings need 'datalist' (mode, labels and hash are read from it)")
    record = {str(k): _plain(str(k), v) for k, v in settings.items()}
    datalist = record["datalist"]
    meta = meta or {}
    record.update(
        mode=training_mode(datalist, record.get("dataset_dir")),
        labels=_labels(datalist),
        datalist_sha256=sha256_file(datalist),
        bundle={
            "name": meta.get("name"),
            "version": meta.get("version"),
            "root": os.path.abspath(os.fspath(bundle_root)),
        },
        volcnn_version=__version__,
        record_version=RECORD_VERSION,
    )
    return record


def changed_settings(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Keys outside :data:`RESUMABLE_KEYS` whose values differ between two records (a key only one has counts), in
    ``now``'s order, then ``recorded``'s. A key of :data:`SETTING_DEFAULTS` missing from ``recorded`` has its
    default there."""
    recorded = {**{k: v for k, v in SETTING_DEFAULTS.items() if k in now}, **recorded}
    keys = [k for k in dict.fromkeys([*now, *recorded]) if k not in RESUMABLE_KEYS]
    return [k for k in keys if k not in recorded or k not in now or recorded[k] != now[k]]


def _show(record: Mapping[str, Any], key: str) -> str:
    return f"{key} {json.dumps(record[key])}" if key in record else f"no {key}"


def read_run_record(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The record in ``run_dir/run.json`` (or the file itself when ``run_dir`` names it).

    Raises:
        FileNotFoundError: naming the file when it is missing.
        RunRecordError: naming the file when it is not a JSON object, or was written in a newer layout.
    """
    path = Path(run_dir)
    path = path if path.suffix == ".json" else path / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run record not found (training writes it when it starts)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunRecordError(f"{path}: cannot read the run record ({e})") from e
    if not isinstance(record, dict):
        raise RunRecordError(f"{path}: a run record is a JSON object, got {type(record).__name__}")
    version = record.get("record_version", RECORD_VERSION)
    if not isinstance(version, int) or version > RECORD_VERSION:
        raise RunRecordError(f"{path}: record_version {version!r} is newer than this volcnn reads ({RECORD_VERSION})")
    return record


def model_settings(record: Mapping[str, Any]) -> dict[str, Any]:
    """The train.json settings of a record that describe the model and its preprocessing: every key but
    :data:`PROVENANCE_KEYS` and :data:`LOCAL_KEYS`, with :data:`SETTING_DEFAULTS` for those an older record lacks.
    These go into a packaged bundle's configs."""
    settings = {k: v for k, v in record.items() if k not in PROVENANCE_KEYS and k not in LOCAL_KEYS}
    return {**SETTING_DEFAULTS, **settings}


def record_run(
    output_dir: str | os.PathLike[str],
    settings: Mapping[str, Any],
    bundle_root: str | os.PathLike[str] = ".",
    meta: Mapping[str, Any] | None = None,
    resume: object = False,
) -> dict[str, Any]:
    """Write ``output_dir/run.json`` for a training run that starts now (rank 0 only, atomically); called first in
    the bundle's ``training`` list, before any data is cached.

    A fresh run (``resume`` false) writes the record, replacing an earlier run's. A resumed run compares it with
    the record on disk: when a key outside :data:`RESUMABLE_KEYS` differs it refuses, naming the keys and both
    values; otherwise it rewrites the file (new paths or versions) only when something changed. Every rank compares,
    so under DDP all ranks stop together.

    Args:
        output_dir: the run's output folder.
        settings, bundle_root, meta: as :func:`build_record`.
        resume: the run's ``resume`` setting.

    Returns:
        The record.

    Raises:
        RunRecordError: a resumed run given other settings than it recorded, an unreadable record, or as
            :func:`build_record`.
    """
    record = build_record(settings, bundle_root, meta)
    path = Path(output_dir) / RUN_FILE
    if as_bool(resume) and path.is_file():
        recorded = read_run_record(path)
        changed = changed_settings(recorded, record)
        if changed:
            message = (
                f"{path}: refusing to resume: the run was trained with {', '.join(_show(recorded, k) for k in changed)}"
                f"; this command gives {', '.join(_show(record, k) for k in changed)}. Resume with the recorded "
                "settings, or start a fresh run (resume false, or another output_dir)"
            )
            logger.error("%s", message)
            raise RunRecordError(message)
        if recorded == record:
            return record
    if is_rank0():
        atomic_write_json(path, record)
        logger.info(
            "run settings recorded in %s (%s mode, network %s)", path, record["mode"], record.get("network_def")
        )
    return record
