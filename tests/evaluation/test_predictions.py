"""The predictions CSV round-trips through csv.DictReader without losing float precision."""

from __future__ import annotations

import csv
import json

import numpy as np

from volcnn.evaluation import write_predictions_csv


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_round_trip_keeps_float_precision(tmp_path):
    rows = [
        {"case": "c1", "label": 1, "prob": 0.1 + 0.2, "pred": 1},
        {"case": "c2, with comma", "label": 0, "prob": np.float64(1 / 3), "pred": 0},
        {"case": 'c3 "quoted"\nnewline', "label": 0, "prob": np.float32(0.1), "pred": 0},
    ]
    out = write_predictions_csv(tmp_path / "pred.csv", rows)
    assert out == tmp_path / "pred.csv"
    back = _read(out)
    assert [r["case"] for r in back] == ["c1", "c2, with comma", 'c3 "quoted"\nnewline']
    assert float(back[0]["prob"]) == 0.1 + 0.2
    assert back[0]["prob"] == "0.30000000000000004"
    assert float(back[1]["prob"]) == 1 / 3
    assert np.float32(float(back[2]["prob"])) == np.float32(0.1)
    assert float(back[2]["prob"]) == float(np.float32(0.1))  # exact value of the float32, not a rounded one
    assert [int(r["label"]) for r in back] == [1, 0, 0]


def test_header_is_union_of_keys_in_first_seen_order(tmp_path):
    rows = [{"b": 1, "a": 2}, {"a": 3, "c": None}, {"d": [0.25, 0.75], "b": 4}]
    out = write_predictions_csv(tmp_path / "p.csv", rows)
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == ["b", "a", "c", "d"]
    back = _read(out)
    assert back[0] == {"b": "1", "a": "2", "c": "", "d": ""}
    assert back[1]["c"] == ""  # None -> empty cell
    assert json.loads(back[2]["d"]) == [0.25, 0.75]


def test_explicit_columns_select_and_order(tmp_path):
    rows = [{"case": "x", "prob": 0.5, "extra": "dropped"}, {"case": "y"}]
    out = write_predictions_csv(tmp_path / "p.csv", rows, columns=["prob", "case", "missing"])
    back = _read(out)
    assert list(back[0]) == ["prob", "case", "missing"]
    assert back == [{"prob": "0.5", "case": "x", "missing": ""}, {"prob": "", "case": "y", "missing": ""}]


def test_empty_rows(tmp_path):
    assert write_predictions_csv(tmp_path / "e.csv", []).read_text() == ""
    assert write_predictions_csv(tmp_path / "h.csv", [], columns=["case", "prob"]).read_text() == "case,prob\n"
