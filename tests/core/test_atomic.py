from __future__ import annotations

import json

import pytest

from volcnn.core import atomic_path, atomic_write_json


def test_failed_write_keeps_previous_file(tmp_path):
    dest = tmp_path / "out.json"
    atomic_write_json(dest, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_temp_file_keeps_suffixes(tmp_path):
    with atomic_path(tmp_path / "heat.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "heat.nii.gz").read_bytes() == b"x"


def test_written_file_has_the_usual_mode(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {})
    finally:
        os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
