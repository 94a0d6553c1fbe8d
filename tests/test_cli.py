from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from volcnn.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("synth", "infer", "networks"):
        assert cmd in text


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["synth"], ["synth", "--out", "x", "--size", "huge"], ["infer", "--bundle", "b", "--out", "o"]],
)
def test_bad_usage_exits_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_synth_bad_values_exit_2(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "c"), "--cases", "0"]) == 2


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "volcnn", "networks"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "seed_cnn3d" in result.stdout.split()


def test_infer_with_missing_bundle_exits_2(tmp_path):
    vol = tmp_path / "a.nii.gz"
    vol.write_bytes(b"")
    assert main(["infer", "--bundle", str(tmp_path / "nobundle"), "--out", str(tmp_path / "o"), str(vol)]) == 2


def test_infer_options_reach_the_runner(tmp_path, monkeypatch):
    import volcnn.commands.infer

    seen: dict = {}
    monkeypatch.setattr(volcnn.commands.infer, "infer", lambda *a, **kw: seen.update(kw) or 0)
    argv = ["infer", "--bundle", "b", "--out", "o", "--heatmap-method", "window", "--stride-mm", "6", "x.nii.gz"]
    assert main(argv) == 0
    assert seen["heatmap_method"] == "window" and seen["stride_mm"] == 6.0
    seen.clear()
    assert main(["infer", "--bundle", "b", "--out", "o", "x.nii.gz"]) == 0
    assert "heatmap_method" not in seen and "stride_mm" not in seen  # the bundle's own settings
    assert "tta_flips" not in seen
    assert main(["infer", "--bundle", "b", "--out", "o", "--tta", "x.nii.gz"]) == 0 and seen["tta_flips"] is True
    assert "scales" not in seen and "snap_mm" not in seen
    assert main(["infer", "--bundle", "b", "--out", "o", "--scales", "1,2", "--snap-mm", "0", "x.nii.gz"]) == 0
    assert seen["scales"] == [1.0, 2.0] and seen["snap_mm"] == 0.0
    for bad in ("2", "1,x", "1,0.5"):
        with pytest.raises(SystemExit):
            main(["infer", "--bundle", "b", "--out", "o", "--scales", bad, "x.nii.gz"])
    with pytest.raises(SystemExit):
        main(["infer", "--bundle", "b", "--out", "o", "--heatmap-method", "fast", "x.nii.gz"])


def test_ingest_and_datalist_commands_end_to_end(tmp_path):
    """`volcnn synth` -> `ingest` (a bad file among good ones: exit 1) -> `datalist from-luna16` -> `check`."""
    import json

    from volcnn.data import synthesize_cohort

    cohort = tmp_path / "c"
    synthesize_cohort(cohort, cases=3, seed=5, size="tiny")
    bad = cohort / "images" / "broken.nii.gz"
    bad.write_bytes((cohort / "images" / "case_000.nii.gz").read_bytes()[:1500])
    out = tmp_path / "ingested"
    assert main(["ingest", str(cohort / "images"), "--out", str(out), "--no-progress"]) == 1
    failures = json.loads((out / "failures.json").read_text())
    assert [f["source"] for f in failures] == [str(bad)] and str(bad) in failures[0]["error"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    bad.unlink()
    assert main(["ingest", str(cohort / "images"), "--out", str(out), "--no-progress"]) == 0  # all done: skipped

    dl = tmp_path / "dl.json"
    args = ["--candidates", str(cohort / "candidates.csv"), "--images", str(out), "--out", str(dl)]
    assert main(["datalist", "from-luna16", *args]) == 0
    assert main(["datalist", "check", str(dl), "--dataset-dir", str(out)]) == 0
    (out / "case_001.nii.gz").unlink()
    assert main(["datalist", "check", str(dl), "--dataset-dir", str(out)]) == 1


def test_exit_codes_agree_across_commands(tmp_path, caplog):
    """2 means bad usage everywhere (a path that does not exist, an invalid option), 1 an input that cannot be used.
    Before, a missing bundle was 2 for infer but 1 for export, and datalist mixed them."""
    missing = str(tmp_path / "nowhere")
    caplog.set_level(logging.ERROR)
    assert main(["export", "--bundle", missing]) == 2
    assert main(["export", "--bundle", str(tmp_path), "--formats", "pt"]) == 2
    assert main(["verify-bundle", missing]) == 2
    assert main(["verify-bundle", str(tmp_path)]) == 2  # a folder without configs/
    assert main(["datalist", "check", missing]) == 2
    assert main(["datalist", "from-csv", missing, "--out", str(tmp_path / "dl.json")]) == 2
    csv = tmp_path / "images.csv"
    csv.write_text("image,label\na.nii.gz,notanumber\n")
    assert main(["datalist", "from-csv", str(csv), "--out", str(tmp_path / "dl.json"), "--val-fraction", "1.5"]) == 2
    assert main(["datalist", "from-csv", str(csv), "--out", str(tmp_path / "dl.json")]) == 1  # bad content
    assert "images.csv" in caplog.text and "line 2" in caplog.text
    assert main(["evaluate-findings", missing, "--annotations", str(csv)]) == 2
    assert missing in caplog.text


def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch, caplog, capsys):
    import volcnn.commands.networks

    def boom(args):
        raise RuntimeError("deep inside a library")

    monkeypatch.setattr(volcnn.commands.networks, "run", boom)
    caplog.set_level(logging.DEBUG)
    assert main(["networks"]) == 1
    assert "volcnn networks failed: RuntimeError: deep inside a library" in caplog.text
    assert "Traceback" not in caplog.text
    assert main(["-v", "networks"]) == 1
    assert "Traceback" in caplog.text


def test_a_bundle_override_is_never_read_as_an_abbreviated_option(tmp_path, monkeypatch):
    """``--margin 6`` is the bundle's patch margin, not ``volcnn mine --margin-mm`` (argparse's prefix matching)."""
    import volcnn.engines.mining

    seen: dict = {}

    def fake_run_mining(config_files, run_dir, overrides, settings, annotations=None):
        seen.update(overrides=overrides, settings=settings)
        return {"rounds": [], "final_weights": "w"}

    monkeypatch.setattr(volcnn.engines.mining, "run_mining", fake_run_mining)
    config = tmp_path / "train.json"
    config.write_text("{}")
    argv = ["mine", str(tmp_path), "--config_file", str(config), "--margin-mm", "10", "--margin", "6"]
    assert main(argv) == 0
    assert seen["settings"].margin_mm == 10.0
    assert seen["overrides"] == {"margin": 6}
