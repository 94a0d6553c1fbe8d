from __future__ import annotations

import json

import pytest

from volcnn.io import DatalistError, load_datalist


def _write(tmp_path, obj):
    p = tmp_path / "dl.json"
    p.write_text(json.dumps(obj))
    return p


def test_paths_resolved_and_fields_typed(tmp_path):
    p = _write(
        tmp_path,
        {
            "training": [
                {"image": "vols/a.nii.gz", "label": "1", "center": [1, 2, 3], "patient": "p1"},
                {"image": "/abs/b.nii.gz", "label": 0},
            ]
        },
    )
    entries = load_datalist(p, "training", dataset_dir="/data")
    assert entries[0]["image"] == "/data/vols/a.nii.gz" and entries[0]["label"] == 1
    assert entries[0]["center"] == [1.0, 2.0, 3.0] and entries[0]["patient"] == "p1"
    assert entries[1]["image"] == "/abs/b.nii.gz" and "center" not in entries[1]
    # without dataset_dir, relative to the datalist's folder
    assert load_datalist(p, "training")[0]["image"] == str(tmp_path / "vols/a.nii.gz")
    assert load_datalist(p, "validation") == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"label": 1}, "needs an 'image'"),
        ({"image": "a.nii.gz", "label": "x"}, "not an integer"),
        ({"image": "a.nii.gz", "center": [1, 2]}, "center must be"),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path, entry, message):
    p = _write(tmp_path, {"training": [{"image": "ok.nii.gz"}, entry]})
    with pytest.raises(DatalistError, match=message) as err:
        load_datalist(p)
    assert "training[1]" in str(err.value) and str(p) in str(err.value)


def test_unreadable_datalist(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(DatalistError, match="broken.json"):
        load_datalist(p)
