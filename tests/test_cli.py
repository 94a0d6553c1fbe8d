from __future__ import annotations

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
