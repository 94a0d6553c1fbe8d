"""What an input is, by name and by its first bytes: volume file suffixes, DICOM files, MetaImage data files, and
the case name an input's outputs are written under.

Only the standard library is used here, so every reader and writer can rely on one definition of each rule.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "DICOM_SUFFIXES",
    "METAIMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "case_name",
    "has_dicom_preamble",
    "is_volume_file",
    "looks_like_dicom",
    "metaimage_data_file",
    "safe_name",
    "strip_volume_suffix",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: MetaImage, the format LUNA16 ships its scans in
METAIMAGE_SUFFIXES = (".mhd", ".mha")
#: file names read as one volume each (a DICOM series is a folder)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mhd", ".mha")
#: suffixes that claim a file is DICOM (ingest reports such a file without the DICM preamble)
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def is_volume_file(name: str | os.PathLike[str]) -> bool:
    """True for a NIfTI or MetaImage file name (by its suffix)."""
    return str(name).endswith(VOLUME_SUFFIXES)


def strip_volume_suffix(name: str) -> str:
    """``name`` without ``.nii.gz`` / ``.nii`` / ``.mhd`` / ``.mha``; unchanged for any other name."""
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def safe_name(name: str, fallback: str = "case") -> str:
    """``name`` as a safe file or folder name: characters other than letters, digits, ``.``, ``_`` and ``-`` become
    ``_``, leading and trailing dots go; ``fallback`` when nothing is left."""
    return _UNSAFE.sub("_", name).strip(".") or fallback


def case_name(path: str | os.PathLike[str]) -> str:
    """The case name of an input: its file name without a volume suffix, or its folder name, made safe
    (:func:`safe_name`)."""
    return safe_name(strip_volume_suffix(Path(os.path.abspath(path)).name))


def has_dicom_preamble(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the 128-byte DICOM preamble followed by ``DICM`` (a DICOM Part 10 file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """What the DICOM reader takes from a folder: a Part 10 file (:func:`has_dicom_preamble`), or any ``.dcm`` file
    (read without the preamble, as older archives store them)."""
    return Path(path).suffix.lower() == ".dcm" or has_dicom_preamble(path)


def metaimage_data_file(header: str | os.PathLike[str]) -> Path | None:
    """The detached data file a ``.mhd`` header names (``ElementDataFile = scan.raw``) when it exists; None for a
    ``.mha``, an embedded (``LOCAL``) or listed (``LIST``) data file, or an unreadable header."""
    path = Path(header)
    if path.suffix.lower() != ".mhd":
        return None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if name in ("", "LOCAL", "LIST"):
                return None
            data = path.parent / name
            return data if data.is_file() else None
    return None
