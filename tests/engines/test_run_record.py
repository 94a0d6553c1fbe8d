"""``run.json``: what a training run resolved, its mode from the datalist, and resuming only with the same settings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from volcnn.engines.run_record import (
    RUN_FILE,
    RunRecordError,
    build_record,
    model_settings,
    read_run_record,
    record_run,
    training_mode,
)

SETTINGS = {"network_def": "seed_cnn3d", "num_classes": 2, "patch_size": (16, 16, 16), "pixdim": [2, 2, 2],
            "hu_window": [-900, 300], "margin": 2, "channels_last": "false"}  # fmt: skip
META = {"name": "Lung nodule CT classification", "version": "0.3.0"}


def _datalist(folder: Path, entries: list[dict], labels: dict | None = None, name: str = "datalist.json") -> Path:
    data: dict = {"training": entries, "validation": [], "test": []}
    if labels is not None:
        data["labels"] = labels
    path = folder / name
    path.write_text(json.dumps(data))
    return path


CANDIDATES = [{"image": "a.nii.gz", "label": 1, "center": [1.0, 2.0, 3.0]}, {"image": "b.nii.gz", "label": 0,
              "center": [0, 0, 0]}]  # fmt: skip
VOLUMES = [{"image": "a.nii.gz", "label": 1}, {"image": "b.nii.gz", "label": 0, "center": None}]


def test_mode_follows_the_training_entries(tmp_path):
    assert training_mode(_datalist(tmp_path, CANDIDATES)) == "candidate"
    assert training_mode(_datalist(tmp_path, VOLUMES)) == "volume"  # a null center is no center
    mixed = _datalist(tmp_path, [CANDIDATES[0], VOLUMES[0]])
    with pytest.raises(RunRecordError, match="1 of the 2 training entries have a 'center'") as info:
        training_mode(mixed)
    assert str(mixed) in str(info.value)
    with pytest.raises(RunRecordError, match="training section is empty"):
        training_mode(_datalist(tmp_path, []))


def test_record_content_and_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    datalist = _datalist(tmp_path, CANDIDATES, {"0": "non-nodule", "1": "nodule"})
    record = build_record({**SETTINGS, "datalist": "datalist.json", "dataset_dir": "."}, "bundle", META)
    assert record == {
        "network_def": "seed_cnn3d",
        "num_classes": 2,
        "patch_size": [16, 16, 16],  # a tuple recorded as a JSON list
        "pixdim": [2, 2, 2],
        "hu_window": [-900, 300],
        "margin": 2,
        "channels_last": False,  # "false" from the command line recorded as a boolean
        "datalist": str(datalist),  # absolute
        "dataset_dir": str(tmp_path),
        "mode": "candidate",
        "labels": {"0": "non-nodule", "1": "nodule"},
        "datalist_sha256": hashlib.sha256(datalist.read_bytes()).hexdigest(),
        "bundle": {**META, "root": str(tmp_path / "bundle")},
        "volcnn_version": record["volcnn_version"],
        "record_version": 1,
    }
    assert json.loads(json.dumps(record)) == record
    defaults = {"intensity": "hu", "modality": "image", "fusion": "concat", "features": None}  # older records lack them
    assert model_settings(record) == {**defaults, **{k: record[k] for k in SETTINGS}}  # no paths, no provenance
    assert build_record({**SETTINGS, "datalist": str(_datalist(tmp_path, VOLUMES))})["labels"] is None
    with pytest.raises(RunRecordError, match="clash"):
        build_record({**SETTINGS, "datalist": str(datalist), "mode": "volume"})
    with pytest.raises(RunRecordError, match="'margin'.*cannot be recorded as JSON"):
        build_record({**SETTINGS, "datalist": str(datalist), "margin": object()})


def test_fresh_run_writes_resumed_run_refuses_other_settings(tmp_path):
    datalist = _datalist(tmp_path, CANDIDATES)
    out = tmp_path / "run"
    settings = {**SETTINGS, "datalist": str(datalist)}
    record_run(out, settings, tmp_path, META)
    path = out / RUN_FILE
    assert read_run_record(out) == json.loads(path.read_text()) and read_run_record(path)["margin"] == 2
    stamp = path.stat().st_mtime_ns

    assert record_run(out, settings, tmp_path, META, resume="true")["margin"] == 2
    assert path.stat().st_mtime_ns == stamp  # nothing changed: not rewritten

    for changed in ({"pixdim": [1.0, 1.0, 1.0]}, {"network_def": "valid_cnn3d"}, {"channels_last": True},
                    {"extra_setting": 3}):  # fmt: skip
        with pytest.raises(RunRecordError, match="refusing to resume") as info:
            record_run(out, {**settings, **changed}, tmp_path, META, resume=True)
        key = next(iter(changed))
        assert key in str(info.value) and str(path) in str(info.value)
        assert path.stat().st_mtime_ns == stamp
    data = json.loads(datalist.read_text())
    datalist.write_text(json.dumps({**data, "labels": {"0": "a", "1": "b"}}))  # same path, other content
    with pytest.raises(RunRecordError, match="datalist_sha256") as info:
        record_run(out, settings, tmp_path, META, resume=True)
    assert "labels" in str(info.value)
    datalist.write_text(json.dumps(data))

    # where the data lies and which code runs may change: the record is rewritten
    moved = _datalist(tmp_path, CANDIDATES, name="moved.json")
    record_run(out, {**settings, "datalist": str(moved)}, tmp_path / "elsewhere", META, resume=True)
    assert read_run_record(out)["datalist"] == str(moved)
    assert read_run_record(out)["bundle"]["root"] == str(tmp_path / "elsewhere")

    # a fresh run replaces the record whatever it held
    record_run(out, {**settings, "patch_size": [32, 32, 32]}, tmp_path, META)
    assert read_run_record(out)["patch_size"] == [32, 32, 32]


def test_only_rank0_writes_but_every_rank_refuses(tmp_path, monkeypatch):
    datalist = _datalist(tmp_path, CANDIDATES)
    settings = {**SETTINGS, "datalist": str(datalist)}
    monkeypatch.setenv("RANK", "1")
    record_run(tmp_path / "r1", settings)
    assert not (tmp_path / "r1" / RUN_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    record_run(tmp_path / "r1", settings)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RunRecordError, match="refusing to resume"):
        record_run(tmp_path / "r1", {**settings, "margin": 4}, resume=True)


def test_unreadable_records(tmp_path):
    with pytest.raises(FileNotFoundError, match="run record not found"):
        read_run_record(tmp_path)
    (tmp_path / RUN_FILE).write_text("{broken")
    with pytest.raises(RunRecordError, match="cannot read the run record"):
        read_run_record(tmp_path)
    with pytest.raises(RunRecordError, match="cannot read"):  # a resumed run does not write over it
        record_run(tmp_path, {**SETTINGS, "datalist": str(_datalist(tmp_path, CANDIDATES))}, resume=True)
    (tmp_path / RUN_FILE).write_text(json.dumps({"record_version": 99}))
    with pytest.raises(RunRecordError, match="newer"):
        read_run_record(tmp_path)
    (tmp_path / RUN_FILE).write_text("[1, 2]")
    with pytest.raises(RunRecordError, match="JSON object"):
        read_run_record(os.fspath(tmp_path / RUN_FILE))


def test_a_record_from_before_the_intensity_setting_windowed_hu(tmp_path):
    """A run recorded without ``intensity`` was trained on HU: it resumes with ``hu``, refuses ``zscore``, and
    packages ``hu``."""
    out = tmp_path / "run"
    settings = {**SETTINGS, "datalist": str(_datalist(tmp_path, CANDIDATES))}
    record_run(out, settings, tmp_path, META)
    assert "intensity" not in read_run_record(out)
    record_run(out, {**settings, "intensity": "hu"}, tmp_path, META, resume=True)
    with pytest.raises(RunRecordError, match="intensity"):
        record_run(out, {**settings, "intensity": "zscore"}, tmp_path, META, resume=True)
    assert model_settings(read_run_record(out))["intensity"] == "hu"
    record_run(out, {**settings, "intensity": "percentile"}, tmp_path, META)
    assert model_settings(read_run_record(out))["intensity"] == "percentile"
