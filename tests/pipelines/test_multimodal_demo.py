"""The multimodal demo's missing-value step: a share of the test patients' values hidden, per patient and feature."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.multimodal_demo import hide_feature_values


def _datalist(tmp_path: Path) -> Path:
    entries = {
        section: [
            {"image": f"{section}{p}.nii.gz", "label": p % 2, "patient": f"{section}-p{p // 2}",
             "features": {"age": 50 + p, "smoker": True, "sex": "F"}}
            for p in range(400)
        ]
        for section in ("training", "validation", "test")
    }  # fmt: skip
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"features": {"age": {}, "smoker": {}, "sex": {}}, **entries}))
    return path


def test_hides_the_share_asked_per_patient_and_only_in_the_test_section(tmp_path):
    source = _datalist(tmp_path)
    out = json.loads(hide_feature_values(source, tmp_path / "hidden.json", 0.3, seed=0).read_text())
    before = json.loads(source.read_text())
    assert out["training"] == before["training"] and out["validation"] == before["validation"]
    values = [v for e in out["test"] for v in e["features"].values()]
    share = sum(v is None for v in values) / len(values)
    assert abs(share - 0.3) < 0.05
    by_patient: dict[str, list[dict]] = {}
    for e in out["test"]:
        by_patient.setdefault(e["patient"], []).append(e["features"])
    for feats in by_patient.values():  # a patient's nodules lose the same values
        assert all(
            {k for k, v in f.items() if v is None} == {k for k, v in feats[0].items() if v is None} for f in feats
        )
    again = json.loads(hide_feature_values(source, tmp_path / "again.json", 0.3, seed=0).read_text())
    assert again == out
