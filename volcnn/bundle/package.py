"""Packaging a trained bundle: a configured copy of a bundle with its weights in ``models/``.

The configs of a packaged bundle describe the model it holds (network, patch size, spacing, window), so
``volcnn infer --bundle DIR`` and ``python -m monai.bundle run --config_file DIR/configs/inference.json`` need no
overrides. ``models/model.ts`` is written by :func:`volcnn.bundle.verify_bundle`'s export check.

:func:`package_run` (``volcnn package RUN_DIR --out BUNDLE``) makes one from a training run: the settings the run
recorded in ``RUN_DIR/run.json`` (:mod:`volcnn.engines.run_record`) go into a copy of the source bundle's configs
and metadata, the run's best weights into ``models/``, and the offline check decides whether the result is
published. It is built in a hidden folder beside ``BUNDLE`` and renamed into place only when every check passes, so
a failure leaves no half-written bundle (and an earlier ``BUNDLE`` untouched).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volcnn import __version__
from volcnn.bundle.metadata import packaged_metadata
from volcnn.bundle.verify import CheckResult, verify_bundle
from volcnn.core.atomic import atomic_path, atomic_write_json
from volcnn.core.errors import UsageError, VolcnnError
from volcnn.core.hashing import sha256_file
from volcnn.engines.run_record import MODES, RUN_FILE, RunRecordError, model_settings, read_run_record
from volcnn.models.bundle_config import load_bundle_network
from volcnn.networks.introspect import in_channels

__all__ = [
    "CALIBRATION_FILE",
    "CONFIG_FILES",
    "REQUIRED_SETTINGS",
    "PackageError",
    "PackageResult",
    "configure_bundle",
    "install_model",
    "package_crossval",
    "package_run",
]

logger = logging.getLogger(__name__)

#: configs whose top-level keys hold the model and data settings (evaluate.json overlays train.json)
CONFIG_FILES = ("train.json", "inference.json")
#: settings a run record must hold to be packaged
REQUIRED_SETTINGS = ("network_def", "num_classes", "patch_size", "pixdim", "hu_window")
#: the probability calibration a run may hold (``RUN_DIR/calibration.json``), installed as ``models/calibration.json``
CALIBRATION_FILE = "calibration.json"


class PackageError(VolcnnError, RuntimeError):
    """The packaged bundle failed a check (or its weights could not be installed); nothing was published. Exit 1.

    Attributes:
        checks: the offline checks' results, when they ran.
    """

    def __init__(self, message: str, checks: list[CheckResult] | None = None) -> None:
        super().__init__(message)
        self.checks = list(checks or [])


@dataclass(frozen=True)
class PackageResult:
    """What :func:`package_run` wrote.

    Attributes:
        bundle: the packaged bundle folder.
        source: the bundle it was copied from.
        run_dir: the training run.
        settings: the train.json settings written into ``configs/train.json`` and ``configs/inference.json``.
        mode: ``"candidate"`` or ``"volume"``, written into ``configs/inference.json`` as ``mode``.
        version: the packaged bundle's ``metadata.json`` version.
        files: the files written, relative to ``bundle``.
        checks: the offline checks' results (all passed).
        replaced: an earlier bundle in ``bundle`` was replaced.
    """

    bundle: Path
    source: Path
    run_dir: Path
    settings: dict[str, Any]
    mode: str
    version: str
    files: list[str] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    replaced: bool = False


def configure_bundle(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    settings: dict[str, Any],
    *,
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Copy the bundle ``src`` to ``dst`` (without weights or run outputs) and set top-level config keys.

    Args:
        src: a bundle folder (``configs/``, ``docs/``, ``LICENSE``).
        dst: the new bundle folder; replaced if it exists.
        settings: top-level keys written into every config of :data:`CONFIG_FILES`, e.g.
            ``{"network_def": "seed_cnn3d", "patch_size": [32, 32, 32]}``. ``patch_size`` and ``num_classes``
            are also written into ``metadata.json``'s ``network_data_format``.
        exclude: folders or files inside ``src`` not to copy (besides ``models/``, ``eval/`` and ``__pycache__``),
            e.g. a training run kept in the bundle.

    Returns:
        ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    if not (src / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(f"{src}: not a bundle (no configs/metadata.json)")
    if dst.exists():
        shutil.rmtree(dst)
    skipped = {Path(p).resolve() for p in exclude}
    default_ignore = shutil.ignore_patterns("models", "eval", "__pycache__")

    def ignore(folder: str, names: list[str]) -> set[str]:
        return set(default_ignore(folder, names)) | {n for n in names if (Path(folder) / n).resolve() in skipped}

    shutil.copytree(src, dst, ignore=ignore)
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


def _is_bundle(folder: Path) -> bool:
    return (folder / "configs" / "metadata.json").is_file()


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _source_bundle(record: dict[str, Any], record_file: Path, src: str | os.PathLike[str] | None) -> Path:
    """``src``, else the bundle root the run recorded; a folder holding ``configs/metadata.json``."""
    if src is not None:
        source = Path(src)
        if not _is_bundle(source):
            raise FileNotFoundError(f"{source}: source bundle not found (no configs/metadata.json)")
        return source
    recorded = record.get("bundle") if isinstance(record.get("bundle"), dict) else {}
    root = recorded.get("root") if isinstance(recorded, dict) else None
    if isinstance(root, str) and _is_bundle(Path(root)):
        return Path(root)
    raise UsageError(
        f"{record_file} records bundle root {root!r}, which is not a bundle (no configs/metadata.json; the run was "
        "started without --bundle_root, or the bundle moved): pass the bundle to copy with --bundle SRC"
    )


def _check_out(out: Path, source: Path, run_dir: Path) -> None:
    for what, folder in (("the source bundle", source), ("the training run", run_dir)):
        if _inside(folder, out):
            raise UsageError(f"{out}: the output folder holds {what} {folder}; choose another --out")
    if _inside(out, source):
        raise UsageError(f"{out}: lies inside the source bundle {source}, which is copied; choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_bundle(out):
        raise UsageError(f"{out}: exists and is not a bundle (no configs/metadata.json); refusing to replace it")


def _checked_record(run_dir: Path) -> tuple[dict[str, Any], Path]:
    record = read_run_record(run_dir)
    record_file = run_dir / RUN_FILE
    missing = [k for k in REQUIRED_SETTINGS if k not in record]
    if missing:
        raise RunRecordError(f"{record_file}: lacks the settings {missing}; it cannot describe the packaged model")
    if record.get("mode") not in MODES:
        raise RunRecordError(f"{record_file}: mode {record.get('mode')!r} is not one of {list(MODES)}")
    return record, record_file


def _publish(build: Path, out: Path, scratch: Path) -> bool:
    """Rename the finished ``build`` onto ``out``; an earlier bundle there goes into ``scratch`` (deleted by the
    caller). Returns whether one was replaced."""
    replaced = out.exists()
    if replaced:
        os.rename(out, scratch / "replaced")
    os.rename(build, out)
    return replaced


def package_run(
    run_dir: str | os.PathLike[str], out: str | os.PathLike[str], src: str | os.PathLike[str] | None = None
) -> PackageResult:
    """Package a training run as a bundle: ``volcnn package RUN_DIR --out BUNDLE [--bundle SRC]``.

    Steps, in a hidden folder beside ``out``: copy ``src`` (default: the bundle the run recorded) with
    :func:`configure_bundle`, writing the run's model settings (:func:`~volcnn.engines.run_record.model_settings`)
    into ``configs/train.json`` and ``configs/inference.json`` and its ``mode`` into ``inference.json``; install
    ``RUN_DIR/models/model.pt`` (:func:`install_model`) and ``RUN_DIR/calibration.json`` when the run has one; load
    the weights into the configured network (they must fit it); describe the model in ``metadata.json``
    (:func:`~volcnn.bundle.metadata.packaged_metadata`); run :func:`~volcnn.bundle.verify_bundle` (which writes
    ``models/model.ts``). Only when every check passes is the folder renamed to ``out``, replacing an earlier bundle
    there.

    Args:
        run_dir: the training run's ``output_dir`` (``run.json``, ``models/model.pt``).
        out: the bundle to write.
        src: the bundle to copy; default the ``bundle.root`` the run recorded.

    Returns:
        A :class:`PackageResult`.

    Raises:
        FileNotFoundError: ``run_dir``, its ``run.json`` or ``models/model.pt``, or ``src`` is missing.
        UsageError: no usable source bundle (the run recorded none and ``src`` is not given), or ``out`` cannot be
            used (it holds the run or the source, or is a folder other than a bundle).
        RunRecordError: ``run.json`` is unreadable or lacks a setting of :data:`REQUIRED_SETTINGS`.
        PackageError: the weights cannot be installed or do not fit the network, or a check failed; ``out`` is left
            as it was.
    """
    run_dir, out = Path(run_dir), Path(out).absolute()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: training run folder not found")
    record, record_file = _checked_record(run_dir)
    weights = run_dir / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the run's best weights not found (training writes them at validation)")
    source = _source_bundle(record, record_file, src)
    _check_out(out, source, run_dir)
    calibration = run_dir / CALIBRATION_FILE
    return _package(
        record, run_dir, weights, calibration if calibration.is_file() else None, source, out, inference_settings={}
    )


def _package(
    record: dict[str, Any],
    run_dir: Path,
    weights: Path,
    calibration: Path | None,
    source: Path,
    out: Path,
    inference_settings: dict[str, Any],
) -> PackageResult:
    """The steps of :func:`package_run` from a checked record: ``weights`` installed as ``models/model.pt``,
    ``calibration`` (or none), ``inference_settings`` written into ``inference.json`` only (with ``mode``)."""
    settings, mode = model_settings(record), str(record["mode"])
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.package-", dir=out.parent))
    try:
        build = configure_bundle(source, scratch / out.name, settings, exclude=[run_dir])
        files = [f"configs/{name}" for name in CONFIG_FILES]
        inference = build / "configs" / "inference.json"
        config = json.loads(inference.read_text(encoding="utf-8"))
        atomic_write_json(inference, {**config, **inference_settings, "mode": mode})
        try:
            install_model(build, weights)
            network, _, _ = load_bundle_network(build, weights, device="cpu")
        except Exception as e:  # not a state dict, weights that do not fit, a network the config cannot build
            reason = str(e).replace(str(build), str(out))  # name the bundle as it would have been written
            raise PackageError(f"{out}: not written: {reason}") from e
        files.append("models/model.pt")
        if calibration is not None:
            shutil.copyfile(calibration, build / "models" / CALIBRATION_FILE)
            files.append(f"models/{CALIBRATION_FILE}")
        meta_file = build / "configs" / "metadata.json"
        meta = packaged_metadata(
            json.loads(meta_file.read_text(encoding="utf-8")),
            {**settings, **inference_settings},
            mode=mode,
            labels=record["labels"] if isinstance(record.get("labels"), dict) else None,
            in_channels=in_channels(network, default=1),
            weights_sha256=sha256_file(weights),
            datalist_sha256=record.get("datalist_sha256"),
            volcnn_version=__version__,
        )
        atomic_write_json(meta_file, meta)
        files.append("configs/metadata.json")
        # the checks run in the hidden folder: their details name the files as they would be in `out`
        checks = [CheckResult(c.name, c.status, c.detail.replace(str(build), str(out))) for c in verify_bundle(build)]
        failed = [c for c in checks if not c.ok]
        if failed:
            lines = "\n  ".join(str(c) for c in failed)
            raise PackageError(f"{out}: not written, the packaged bundle fails the offline check:\n  {lines}", checks)
        files += [f"models/{p.name}" for p in sorted((build / "models").glob("*.ts"))]
        replaced = _publish(build, out, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("packaged %s from %s (run %s)", out, source, run_dir)
    return PackageResult(
        bundle=out, source=source, run_dir=run_dir, settings={**settings, **inference_settings}, mode=mode,
        version=str(meta["version"]), files=sorted(files), checks=checks, replaced=replaced,
    )  # fmt: skip


def package_crossval(
    cv_dir: str | os.PathLike[str], out: str | os.PathLike[str], src: str | os.PathLike[str] | None = None
) -> PackageResult:
    """Package a cross-validation folder (``volcnn crossval``'s output) as one bundle holding its k models:
    ``volcnn package O --out BUNDLE``.

    Every fold must be finished and trained with the same model settings. Their best weights become one state dict
    of :class:`~volcnn.networks.EnsembleClassifier` (``members.<i>.`` + each fold's keys) in ``models/model.pt``, and
    ``inference.json`` gets ``ensemble: k``, so ``volcnn infer``, the evaluate overlay and the exports run the k
    models as one network whose probability is their mean. The rest is :func:`package_run`.

    The calibration installed (``models/calibration.json``, ``fitted_on: "out-of-fold"``) is Platt scaling fitted
    on the pooled out-of-fold predictions (``oof_predictions.csv``: every training and validation entry scored by
    the one fold model that never trained on it), since no entry is unseen by the ensemble itself; the test section
    stays untouched for judging it. It describes a single fold model's probabilities, which the members' mean
    resembles but is smoother than (:func:`_oof_calibration`). The folds' own calibrations (fitted on their
    validation folds) are not used. Two-class models only; without enough positives or negatives none is installed.

    Raises:
        FileNotFoundError: ``cv_dir`` or its ``folds.json`` is missing.
        UsageError: a fold is unfinished, or the folds were trained with different model settings or modes.
        RunRecordError, PackageError: as :func:`package_run`.
    """
    cv_dir, out = Path(cv_dir), Path(out).absolute()
    folds_file = cv_dir / "folds.json"
    if not folds_file.is_file():
        raise FileNotFoundError(f"{folds_file}: not a cross-validation folder (no folds.json)")
    doc = json.loads(folds_file.read_text(encoding="utf-8"))
    k = int(doc["k"])
    fold_dirs = [cv_dir / f"fold_{i}" for i in range(k)]
    unfinished = [d.name for d in fold_dirs if not (d / "done.json").is_file()]
    if unfinished:
        raise UsageError(f"{cv_dir}: folds {', '.join(unfinished)} are not finished; run volcnn crossval again first")
    records = [_checked_record(d)[0] for d in fold_dirs]
    first = model_settings(records[0])
    for d, record in zip(fold_dirs[1:], records[1:], strict=True):
        other = model_settings(record)
        differ = sorted(key for key in set(first) | set(other) if first.get(key) != other.get(key))
        if differ or record["mode"] != records[0]["mode"]:
            raise UsageError(f"{d}: trained with other settings than {fold_dirs[0].name} ({differ or ['mode']})")
    source = _source_bundle(records[0], cv_dir / "fold_0" / RUN_FILE, src)
    _check_out(out, source, cv_dir)
    state: dict[str, torch.Tensor] = {}
    for i, d in enumerate(fold_dirs):
        weights = d / "models" / "model.pt"
        try:
            member = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PackageError(f"{out}: not written: {weights}: not a weights-only loadable state dict ({e})") from e
        state.update({f"members.{i}.{key}": value for key, value in member.items()})
    record = {**records[0], "datalist_sha256": doc.get("datalist_sha256")}
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.ensemble-", dir=out.parent if out.parent.exists() else None))
    try:
        merged = scratch / "model.pt"
        with open(merged, "wb") as f:  # a file object: no temp name is written into the archive
            torch.save(state, f)
        calibration = _oof_calibration(cv_dir, scratch / CALIBRATION_FILE, int(record.get("num_classes", 2)))
        return _package(record, cv_dir, merged, calibration, source, out, inference_settings={"ensemble": k})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _oof_calibration(cv_dir: Path, dest: Path, num_classes: int) -> Path | None:
    """Platt scaling of a crossval's pooled out-of-fold predictions (``oof_predictions.csv``: ``label``, ``prob`` of
    class 1), written to ``dest``; None, with a warning, for a model of more than two classes or when the fit is
    undefined (fewer than two entries of an outcome, or probabilities that fall with the outcome)."""
    import csv

    from volcnn.models.calibration import fit_platt

    oof = cv_dir / "oof_predictions.csv"
    if num_classes != 2:
        logger.warning("%s: a %d-class ensemble gets no calibration (Platt scaling calibrates two classes)", cv_dir,
                       num_classes)  # fmt: skip
        return None
    try:
        with open(oof, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        probs = [float(r["prob"]) for r in rows]
        labels = [int(r["label"]) for r in rows]
        calibration = fit_platt(np.asarray(probs), np.asarray(labels), class_index=1, fitted_on="out-of-fold")
    except (OSError, KeyError, ValueError) as e:
        logger.warning("%s: no calibration installed: %s", oof, e)
        return None
    logger.info(
        "calibration fitted on %d out-of-fold predictions (%d positive): a = %.3f, b = %.3f",
        *(calibration.num_cases, calibration.num_positive, calibration.a, calibration.b),
    )
    return calibration.write(dest)
