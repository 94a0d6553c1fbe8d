"""Hard-negative mining (volcnn.engines.mining, ``volcnn mine``): which findings become negatives, that only training
CTs are read, the datalist a round writes, and that a killed round resumes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import volcnn.engines.mining as mining_mod
from volcnn.cli import main
from volcnn.data import synthesize_cohort
from volcnn.engines.mining import MiningSettings, mine_negatives

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"


def _entry(image: str, label: int, center: list[float], patient: str = "p1") -> dict:
    return {"image": image, "label": label, "center": center, "patient": patient, "case": image.split(".")[0]}


def test_findings_near_nodules_or_known_entries_are_not_mined():
    raw = [_entry("a.nii.gz", 1, [0.0, 0.0, 0.0]), _entry("a.nii.gz", 0, [50.0, 0.0, 0.0])]
    entries = [{**e, "image": f"/data/{e['image']}"} for e in raw]
    nodules = {"/data/a.nii.gz": [(np.zeros(3), 4.0)]}  # the positive entry, radius 4 mm
    findings = {
        "/data/a.nii.gz": [
            {"center_ras_mm": [6.0, 0.0, 0.0], "probability": 0.9},  # within 4 + 5 mm of the nodule: the nodule
            {"center_ras_mm": [51.0, 1.0, 0.0], "probability": 0.8},  # 1.4 mm from the known negative: itself
            {"center_ras_mm": [0.0, 30.0, 0.0], "probability": 0.7},  # a new negative
            {"center_ras_mm": [0.0, -30.0, 0.0], "probability": 0.6},  # another, over the cap of 1
            {"center_ras_mm": [0.0, 9.5, 0.0], "probability": 0.5},
        ]
    }
    settings = MiningSettings(max_per_image=1, margin_mm=5.0, dedupe_mm=3.0)
    mined = mine_negatives(findings, entries, raw, nodules, 2, settings)
    assert mined == [
        {"image": "a.nii.gz", "label": 0, "center": [0.0, 30.0, 0.0], "patient": "p1", "case": "a", "source": "mined",
         "round": 2},
    ]  # fmt: skip
    more = mine_negatives(findings, entries, raw, nodules, 2, MiningSettings(max_per_image=5, margin_mm=5.0))
    assert [m["center"] for m in more] == [[0.0, 30.0, 0.0], [0.0, -30.0, 0.0], [0.0, 9.5, 0.0]]
    tighter = mine_negatives(findings, entries, raw, nodules, 2, MiningSettings(max_per_image=5, margin_mm=1.0))
    assert [0.0, 0.0, 0.0] not in [m["center"] for m in tighter] and [6.0, 0.0, 0.0] in [m["center"] for m in tighter]


def test_annotation_radii_come_from_the_csv_by_case_name(tmp_path):
    csv = tmp_path / "annotations.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\na,-10,0,0,20\n")  # LPS: RAS (10, 0, 0), r 10
    table = mining_mod.read_annotations(csv)[0]
    nodules = mining_mod._nodules([{"image": "/d/a.nii.gz", "label": 0, "center": [90.0, 0, 0]}], table, 10.0)
    ((centre, radius),) = nodules["/d/a.nii.gz"]
    assert centre.tolist() == [10.0, 0.0, 0.0] and radius == 10.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cohort and a one-epoch candidate run of the bundle on it."""
    from monai.bundle import run

    root = tmp_path_factory.mktemp("mining")
    cohort = root / "cohort"
    synthesize_cohort(cohort, cases=5, seed=3, size="tiny")
    overrides = {
        "dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"), "network_def": "seed_cnn3d",
        "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "num_workers": 0, "amp": False, "device": "cpu",
        "seed": 1, "progress": False,
    }  # fmt: skip
    run("training", config_file=str(CONFIG), output_dir=str(root / "run"), max_epochs=1, **overrides)
    return root, cohort, overrides


def _cli(run_dir: Path, cohort: Path, overrides: dict, *extra: str) -> int:
    args = ["mine", str(run_dir), "--config_file", str(CONFIG), "--annotations", str(cohort / "annotations.csv"),
            "--rounds", "1", "--epochs", "1", "--threshold", "0.05", *extra]  # fmt: skip
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return main(args)


def test_a_round_mines_training_cts_only_and_trains_on(trained, tmp_path, monkeypatch):
    root, cohort, overrides = trained
    seen: list[str] = []
    real_run = mining_mod.InferenceRunner.run

    def spy(self, inputs, out_dir):
        seen.extend(str(i) for i in inputs)
        return real_run(self, inputs, out_dir)

    monkeypatch.setattr(mining_mod.InferenceRunner, "run", spy)
    import volcnn.engines.workflow as workflow_mod

    loaded: list[str] = []
    real_load = workflow_mod.load_weights
    monkeypatch.setattr(
        workflow_mod, "load_weights", lambda net, path, dev: loaded.append(path) or real_load(net, path, dev)
    )
    assert _cli(root / "run", cohort, overrides) == 0
    datalist = json.loads((cohort / "datalist.json").read_text())
    training_images = {str(cohort / e["image"]) for e in datalist["training"]}
    assert seen and set(seen) == training_images  # never a validation or test CT
    out = root / "run" / "mining" / "round_1"
    mined_list = json.loads((out / "datalist.json").read_text())
    assert mined_list["validation"] == datalist["validation"] and mined_list["test"] == datalist["test"]
    original = mined_list["training"][: len(datalist["training"])]
    assert [{k: v for k, v in e.items() if k not in ("source", "round")} for e in original] == datalist["training"]
    assert {(e["source"], e["round"]) for e in original} == {("datalist", 0)}
    mined = mined_list["training"][len(datalist["training"]) :]
    assert mined and all(e["source"] == "mined" and e["round"] == 1 and e["label"] == 0 for e in mined)
    assert {e["image"] for e in mined} <= {e["image"] for e in datalist["training"]}
    done = json.loads((out / "done.json").read_text())
    assert done["mined"] == len(mined) and (out / "models" / "model.pt").is_file()
    assert loaded == [str(root / "run" / "models" / "model.pt")]  # the round trained on from the run's weights
    summary = json.loads((root / "run" / "mining" / "mining.json").read_text())
    assert summary["final_weights"] == str(out / "models" / "model.pt")

    seen.clear()  # a finished round is not run again
    assert _cli(root / "run", cohort, overrides) == 0 and seen == []


def test_a_killed_round_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
    """The heat maps of a round killed during its training are not computed again, and its datalist is the same."""
    import shutil

    root, cohort, overrides = trained
    run_dir = tmp_path / "run"
    (run_dir / "models").mkdir(parents=True)
    shutil.copy(root / "run" / "models" / "model.pt", run_dir / "models" / "model.pt")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the round's training")

    monkeypatch.setattr("monai.bundle.run", killed)
    with pytest.raises(KeyboardInterrupt):
        _cli(run_dir, cohort, overrides)
    out = run_dir / "mining" / "round_1"
    first = (out / "datalist.json").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "heatmaps").glob("*/findings.json")}
    assert stamps and not (out / "done.json").exists()
    monkeypatch.undo()
    assert _cli(run_dir, cohort, overrides) == 0
    assert (out / "datalist.json").read_text() == first
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # heat maps skipped, not recomputed
    assert (out / "done.json").is_file()


def test_mining_refuses_a_run_without_weights(tmp_path, trained, caplog):
    _, cohort, overrides = trained
    (tmp_path / "empty").mkdir()
    caplog.set_level(logging.ERROR)
    assert _cli(tmp_path / "empty", cohort, overrides) == 2
    assert "models/model.pt" in caplog.text and "train the run" in caplog.text
