"""A write that fails part-way leaves the previous file intact and no temporary file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from volcnn.evaluation import plot_calibration, plot_confusion, plot_roc, write_predictions_csv, write_report_html

WRITERS = {
    "roc.png": lambda p: plot_roc({"t": ([0, 0.5, 1], [0, 0.9, 1])}, p),
    "cm.png": lambda p: plot_confusion([[3, 1], [0, 4]], ["a", "b"], p),
    "cal.png": lambda p: plot_calibration([0.2, float("nan")], [0.3, float("nan")], [5, 0], p),
    "pred.csv": lambda p: write_predictions_csv(p, [{"case": "c", "prob": 0.25}]),
    "report.html": lambda p: write_report_html(p, title="t", summary={"auc": 0.9}),
}


def _half_write(self: Path, data: bytes) -> int:
    with open(self, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError("disk full")


def _failing_replace(src, dst):
    raise OSError("killed before rename")


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize(
    ("target", "failure"), [("pathlib.Path.write_bytes", _half_write), ("os.replace", _failing_replace)]
)
def test_failed_write_keeps_previous_file(tmp_path, monkeypatch, name, target, failure):
    dest = tmp_path / name
    dest.write_bytes(b"previous contents")
    with monkeypatch.context() as m:
        m.setattr(target, failure)
        with pytest.raises(OSError):
            WRITERS[name](dest)
    assert dest.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == [name]  # the temporary file was removed
    WRITERS[name](dest)  # and the same write succeeds once nothing fails
    assert dest.read_bytes() != b"previous contents"
