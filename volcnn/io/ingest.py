"""Batch conversion of CT inputs (NIfTI, MetaImage, DICOM series) into validated NIfTI with a manifest.

``ingest(sources, out_dir)`` walks the sources, reads every input through the validated reader
(:func:`volcnn.io.volume.load_volume`; a folder's DICOM files are grouped into series by :mod:`volcnn.io.dicom`,
so a folder holding several series gives one output per series), and writes under ``out_dir``:

- ``<name>.nii.gz`` per input: int16 where every voxel is an integer in the int16 range, float32 otherwise,
  with the volume's affine (sform/qform code 1), written atomically;
- ``manifest.json``: a list with one entry per output (see :func:`ingest`); no patient identifiers, only
  paths, hashes and geometry;
- ``failures.json``: ``[{"source", "error"}]`` for every input that could not be converted.

Both JSON files are rewritten atomically after every input, so a killed run leaves consistent files, and a
re-run skips the inputs already converted (same source path and source hash, output present and unchanged).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volcnn.core.atomic import atomic_write_json
from volcnn.core.errors import UsageError
from volcnn.core.hashing import sha256_file, sha256_files
from volcnn.io.dicom import discover_series, load_dicom_files
from volcnn.io.input_hash import input_files
from volcnn.io.sources import DICOM_SUFFIXES, has_dicom_preamble, is_volume_file, safe_name, strip_volume_suffix
from volcnn.io.types import Volume, VolumeError
from volcnn.io.volume import load_volume
from volcnn.io.writer import write_nifti

__all__ = ["IngestError", "IngestInput", "IngestResult", "find_inputs", "ingest"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAILURES = "failures.json"
#: checks :func:`load_volume` applies to every volume it returns
BASE_CHECKS = ("read to end", "3D", "finite", "affine non-degenerate")
#: further checks applied to a DICOM series
DICOM_CHECKS = ("single series", "uniform slice spacing")
INT16_MIN, INT16_MAX = -32768, 32767


class IngestError(UsageError, RuntimeError):
    """The output folder cannot be used (for example an unreadable manifest); nothing was converted (exit 2)."""


@dataclass
class IngestInput:
    """One unit of work: a NIfTI / MetaImage file, or one DICOM series (a folder, or some files in it).

    Attributes:
        source: the path as given (a source, or a path below a source folder); the only provenance recorded.
        kind: ``"file"`` or ``"dicom"``.
        name: the output name before sanitising and de-duplication.
        files: for DICOM, the files of the series (all DICOM files in the folder when series are not split).
        uid_hash: for a split DICOM series, 12 hex chars of the SeriesInstanceUID's sha256 (of the attributes the
            files were grouped by when they have no SeriesInstanceUID).
        warnings: how the series' files were grouped, when not by SeriesInstanceUID alone (for the manifest).
    """

    source: str
    kind: str
    name: str
    files: list[Path] = field(default_factory=list)
    uid_hash: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class IngestResult:
    """What one :func:`ingest` call did.

    Attributes:
        converted: manifest entries written by this run.
        skipped: manifest entries of inputs already converted by an earlier run.
        failures: ``{"source", "error"}`` for every input that failed.
        out_dir: the output folder.
    """

    converted: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 when every input was converted or skipped, 1 when some failed."""
        return 1 if self.failures else 0


def _join(source: str, rel: str) -> str:
    rel = os.path.normpath(rel)
    return source if rel in ("", ".") else os.path.join(source, rel)


def find_inputs(
    sources: Sequence[str | os.PathLike[str]], exclude: Path | None = None
) -> tuple[list[IngestInput], list[dict[str, str]]]:
    """Walk ``sources`` into inputs, in a stable order.

    A NIfTI / MetaImage file is one input. A folder is walked recursively: volume files inside are inputs,
    and every folder directly holding DICOM files (by the preamble, not the extension) is a DICOM input,
    split into series later. ``exclude`` (the output folder) is not walked.

    Returns:
        ``(inputs, failures)``; failures are sources that do not exist or hold nothing readable, and files
        named like DICOM that lack the DICM preamble.
    """
    inputs: list[IngestInput] = []
    failures: list[dict[str, str]] = []
    excluded = exclude.resolve() if exclude is not None else None
    for src in sources:
        src_str = os.fspath(src)
        path = Path(src_str)
        if not path.exists():
            failures.append({"source": src_str, "error": str(VolumeError(src_str, "does not exist"))})
            continue
        if path.is_file():
            if is_volume_file(path.name):
                inputs.append(IngestInput(source=src_str, kind="file", name=strip_volume_suffix(path.name)))
            elif has_dicom_preamble(path):
                problem = "a single DICOM file; give the folder holding the series"
                failures.append({"source": src_str, "error": str(VolumeError(src_str, problem))})
            else:
                problem = "not a NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha) file, or a DICOM folder"
                failures.append({"source": src_str, "error": str(VolumeError(src_str, problem))})
            continue
        found_before, failed_before = len(inputs), len(failures)
        for dirpath, dirnames, filenames in os.walk(path):
            here = Path(dirpath)
            if excluded is not None:
                dirnames[:] = [d for d in dirnames if (here / d).resolve() != excluded]
            dirnames.sort()
            rel = os.path.relpath(dirpath, path)
            dicom_files: list[Path] = []
            for fname in sorted(filenames):
                fpath = here / fname
                if is_volume_file(fname):
                    name = strip_volume_suffix(fname)
                    inputs.append(IngestInput(source=_join(src_str, os.path.join(rel, fname)), kind="file", name=name))
                elif has_dicom_preamble(fpath):
                    dicom_files.append(fpath)
                elif fname.lower().endswith(DICOM_SUFFIXES):
                    fsrc = _join(src_str, os.path.join(rel, fname))
                    problem = "named like DICOM but has no DICM preamble (not DICOM, or damaged)"
                    failures.append({"source": fsrc, "error": str(VolumeError(fsrc, problem))})
                else:
                    logger.debug("ignoring %s (not a volume or DICOM file)", fpath)
            if dicom_files:
                folder_name = here.name if rel != "." else Path(os.path.abspath(src_str)).name
                inputs.append(
                    IngestInput(source=_join(src_str, rel), kind="dicom", name=folder_name, files=dicom_files)
                )
        if len(inputs) == found_before and len(failures) == failed_before:
            problem = "no NIfTI, MetaImage or DICOM files found in this folder"
            failures.append({"source": src_str, "error": str(VolumeError(src_str, problem))})
    return inputs, failures


def _split_series(inp: IngestInput) -> list[IngestInput]:
    """One input per DICOM series of a folder input."""
    folder = Path(inp.source)
    wanted = {p.resolve() for p in inp.files}
    series = []
    for s in discover_series(folder):
        files = sorted(Path(f) for f in s.files if Path(f).resolve() in wanted)  # this folder only
        if files:
            series.append((s.uid_hash, files, list(s.warnings)))
    if not series:
        raise VolumeError(inp.source, "no DICOM series found in this folder")
    if len(series) == 1:
        return [IngestInput(inp.source, "dicom", inp.name, series[0][1], series[0][0], series[0][2])]
    return [IngestInput(inp.source, "dicom", f"{inp.name}_{uid[:8]}", files, uid, ws) for uid, files, ws in series]


def _source_sha256(inp: IngestInput) -> str:
    """sha256 of the source: of the series' files for DICOM, else of the input's files (see
    :mod:`volcnn.io.input_hash`), the same hash ``volcnn infer`` records for the same scan."""
    return sha256_files(inp.files if inp.kind == "dicom" else input_files(inp.source))


def _read(inp: IngestInput) -> Volume:
    if inp.kind == "dicom" and inp.files:
        return load_dicom_files(inp.files, inp.source)
    return load_volume(inp.source)


def _verify(vol: Volume, source: str) -> None:
    """Re-check what the manifest will claim, whichever reader produced ``vol``."""
    arr, aff = vol.array, np.asarray(vol.affine)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise VolumeError(source, f"expected a 3D volume, got shape {arr.shape}")
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise VolumeError(source, "degenerate or non-finite affine (voxel-to-world geometry)")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise VolumeError(source, f"{bad} NaN/Inf voxels")


def _as_exact_dtype(array: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer in the int16 range, else float32."""
    if array.size and np.all(array == np.round(array)) and array.min() >= INT16_MIN and array.max() <= INT16_MAX:
        return array.astype(np.int16)
    return array.astype(np.float32)


def _load_manifest(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / MANIFEST
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IngestError(f"{path}: cannot read the manifest of an earlier run ({e}); move it away") from e
    if not isinstance(data, list) or not all(isinstance(e, dict) and "output" in e for e in data):
        raise IngestError(f"{path}: not an ingest manifest (expected a list of entries); move it away")
    return data


def _key(entry: dict[str, Any]) -> tuple[str, str | None]:
    return str(entry.get("source")), entry.get("series_uid_hash")


def _progress(items: list[IngestInput], enabled: bool) -> Iterator[IngestInput]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc="ingest", unit="input")


def ingest(
    sources: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *, progress: bool = False
) -> IngestResult:
    """Convert every input under ``sources`` to ``out_dir/<name>.nii.gz``, with a manifest and a failure list.

    Each manifest entry holds ``output`` (relative to ``out_dir``), ``source`` (the path, never header
    fields), ``sha256`` (of the output), ``source_sha256`` (of the source bytes; for several files, of their
    names and hashes in name order, as :func:`volcnn.io.input_hash.input_sha256`), ``shape``, ``spacing`` (mm,
    rounded to 1e-4), ``orientation`` (nibabel axis codes), ``n_slices``, ``dtype``, ``kind``,
    ``checks_passed``, ``warnings`` and, for DICOM, ``series_uid_hash`` (12 hex chars of the SeriesInstanceUID's
    sha256, or for files without one of the attributes they were grouped by; never the UID itself).

    Failures do not stop the run. ``manifest.json`` and ``failures.json`` are rewritten atomically after each
    input. An input whose source path and source hash are already in the manifest, with its output present
    and matching its sha256, is skipped.

    Args:
        sources: NIfTI / MetaImage files, or folders walked recursively (DICOM series found by content).
        out_dir: output folder (created); it is not walked when it lies inside a source.
        progress: show a tqdm bar over the inputs.

    Returns:
        The :class:`IngestResult`; ``exit_code`` is 0 when nothing failed, 1 otherwise.

    Raises:
        IngestError: ``out_dir`` holds a manifest that cannot be read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(out)
    result = IngestResult(out_dir=out)

    found, result.failures = find_inputs(sources, exclude=out)
    inputs: list[IngestInput] = []
    for inp in found:
        if inp.kind != "dicom":
            inputs.append(inp)
            continue
        try:
            inputs.extend(_split_series(inp))
        except Exception as e:
            result.failures.append({"source": inp.source, "error": _message(inp.source, e)})
    for f in result.failures:
        logger.warning("failed: %s", f["error"])
    logger.info("ingest: %d input(s) from %d source(s) into %s", len(inputs), len(sources), out)

    def save() -> None:
        atomic_write_json(out / MANIFEST, sorted(manifest, key=lambda e: str(e["output"])))
        atomic_write_json(out / FAILURES, result.failures)

    save()
    for inp in _progress(inputs, progress):
        try:
            entry, skipped = _ingest_one(inp, out, manifest)
        except Exception as e:
            error = _message(inp.source, e)
            logger.warning("failed: %s", error, exc_info=not isinstance(e, VolumeError))
            result.failures.append({"source": inp.source, "error": error})
        else:
            (result.skipped if skipped else result.converted).append(entry)
        save()
    logger.info(
        "ingest: %d converted, %d skipped (already done), %d failed",
        len(result.converted),
        len(result.skipped),
        len(result.failures),
    )
    return result


def _message(source: str, e: Exception) -> str:
    if isinstance(e, VolumeError):
        return str(e)
    return str(VolumeError(source, f"{type(e).__name__}: {e}"))


def _ingest_one(inp: IngestInput, out: Path, manifest: list[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Convert one input (or find it already done); updates ``manifest`` in place. Returns (entry, skipped)."""
    import nibabel as nib

    uid_hash = inp.uid_hash
    source_sha = _source_sha256(inp)
    key = (inp.source, uid_hash if inp.kind == "dicom" else None)
    previous = next((e for e in manifest if _key(e) == key), None)
    if previous is not None and previous.get("source_sha256") == source_sha:
        done = out / str(previous["output"])
        if done.is_file() and sha256_file(done) == previous.get("sha256"):
            logger.info("skipped %s: already converted to %s", inp.source, done)
            return previous, True

    vol = _read(inp)
    _verify(vol, inp.source)
    array = _as_exact_dtype(vol.array)
    affine = np.asarray(vol.affine, dtype=np.float64)

    if previous is not None:  # the source changed, or its output went missing: convert again in place
        output = str(previous["output"])
    else:
        taken = {str(e["output"]).lower() for e in manifest}  # case-insensitive file systems too
        base = safe_name(inp.name, "volume")
        output, n = f"{base}.nii.gz", 1
        while output.lower() in taken:
            n += 1
            output = f"{base}_{n}.nii.gz"
    dest = out / output
    write_nifti(dest, array, affine)

    checks = list(BASE_CHECKS) + (list(DICOM_CHECKS) if inp.kind == "dicom" else [])
    for extra in getattr(vol, "checks", None) or []:
        if extra not in checks:
            checks.append(str(extra))
    entry: dict[str, Any] = {
        "output": output,
        "source": inp.source,
        "sha256": sha256_file(dest),
        "source_sha256": source_sha,
        "shape": [int(s) for s in array.shape],
        "spacing": [round(float(s), 4) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        "orientation": list(nib.orientations.aff2axcodes(affine)),
        "n_slices": int(array.shape[2]),
        "dtype": str(array.dtype),
        "kind": vol.kind,
        "checks_passed": checks,
        "warnings": [str(w) for w in [*inp.warnings, *vol.warnings]],
    }
    if inp.kind == "dicom":
        entry["series_uid_hash"] = uid_hash
    if previous is not None:
        manifest.remove(previous)
    manifest.append(entry)
    logger.info("converted %s -> %s (%s, %s)", inp.source, dest, "x".join(map(str, array.shape)), array.dtype)
    return entry, False
