"""EvaluationReport: threshold from validation, metrics.json, per-case CSV, plots and the HTML report."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from monai.data import MetaTensor
from sklearn.metrics import roc_auc_score

from volcnn.engines import EvaluationReport, PredictionCollector
from volcnn.evaluation import youden_threshold


def _fill(collector: PredictionCollector, probs: torch.Tensor, labels: torch.Tensor, batch_size: int = 4) -> None:
    """Feed ``collector`` the way a MONAI evaluator does: decollated per-sample outputs and batch entries."""
    k = probs.shape[1]
    collector.reset()
    for start in range(0, len(labels), batch_size):
        idx = range(start, min(start + batch_size, len(labels)))
        output = [{"pred": probs[i], "label": torch.nn.functional.one_hot(labels[i], k).float()} for i in idx]
        batch = [{"case": f"case_{i:03d}", "patient": f"SECRET{i}", "center": torch.tensor([1.0 * i, 2.0, 3.0])}
                 for i in idx]  # fmt: skip
        collector.collect(SimpleNamespace(state=SimpleNamespace(output=output, batch=batch)))  # type: ignore[arg-type]


def _binary(n: int, seed: int, shift: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).long()
    logits = torch.randn(n, generator=g) + shift * labels
    p1 = torch.sigmoid(logits).double()
    return torch.stack([1 - p1, p1], dim=1), labels


def test_binary_report_uses_the_validation_threshold(tmp_path):
    val, test = PredictionCollector(), PredictionCollector()
    vp, vl = _binary(80, seed=1)
    tp, tl = _binary(120, seed=2)
    _fill(val, vp, vl)
    _fill(test, tp, tl)
    report = EvaluationReport(tmp_path, test, threshold_collector=val, n_boot=200, extra={"network_def": "x"})
    report(SimpleNamespace(state=SimpleNamespace(metrics={"val_auc": 0.5})))  # type: ignore[arg-type]

    payload = json.loads((tmp_path / "metrics.json").read_text())
    m = payload["metrics"]
    assert m["threshold"] == pytest.approx(youden_threshold(vp[:, 1], vl))  # chosen on validation, not on test
    assert m["threshold_source"] == "validation (Youden)"
    assert m["auc"] == pytest.approx(roc_auc_score(tl.numpy(), tp[:, 1].numpy()))
    assert m["auc_ci95"][0] <= m["auc"] <= m["auc_ci95"][1]
    predicted = tp[:, 1] >= m["threshold"]
    assert m["tp"] == int((predicted & (tl == 1)).sum()) and m["fp"] == int((predicted & (tl == 0)).sum())
    at = m["at_target_sensitivity"]
    assert at["chosen_on"] == "validation" and at["target"] == 0.9
    assert payload["engine_metrics"] == {"val_auc": 0.5} and payload["network_def"] == "x"

    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 and rows[7]["case"] == "case_007" and float(rows[7]["center_x"]) == 7.0
    assert float(rows[7]["prob"]) == float(tp[7, 1])  # full precision
    assert "patient" not in rows[0] and not any("SECRET" in v for r in rows for v in r.values())
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "SECRET" not in html
    assert "validation (Youden)" in html


def test_without_validation_the_threshold_is_flagged_optimistic(tmp_path):
    test = PredictionCollector()
    _fill(test, *_binary(60, seed=3))
    EvaluationReport(tmp_path, test, threshold_collector=None, n_boot=50).write()
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["threshold_source"].startswith("test (Youden")
    assert "optimistic" in (tmp_path / "report.html").read_text()


def test_one_class_validation_falls_back_with_a_note(tmp_path):
    val, test = PredictionCollector(), PredictionCollector()
    vp, _ = _binary(20, seed=4)
    _fill(val, vp, torch.zeros(20, dtype=torch.long))
    _fill(test, *_binary(40, seed=5))
    EvaluationReport(tmp_path, test, threshold_collector=val, n_boot=50).write()
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert "one class" in m["threshold_source"] and "at_target_sensitivity" not in m


def test_multiclass_report(tmp_path):
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, (90,), generator=g)
    probs = torch.softmax(torch.randn(90, 3, generator=g) + 2 * torch.nn.functional.one_hot(labels, 3), 1).double()
    test = PredictionCollector()
    _fill(test, probs, labels)
    EvaluationReport(tmp_path, test, class_names=["a", "b", "c"]).write()
    m = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert m["task"] == "multiclass"
    assert m["auc"] == pytest.approx(roc_auc_score(labels.numpy(), probs.numpy(), multi_class="ovr"))
    assert sum(map(sum, m["confusion_matrix"])) == 90
    with open(tmp_path / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert {"prob_0", "prob_1", "prob_2", "predicted"} <= row.keys()
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "calibration.png").is_file()


def test_no_cases_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no cases were evaluated in section 'test'"):
        EvaluationReport(tmp_path, PredictionCollector()).write()
    assert not (tmp_path / "metrics.json").exists()


def test_images_are_named_by_their_datalist_path(tmp_path):
    """Two scans with one file name in different folders (train/0001, test/0001; two LUNA16 subsets) must be told
    apart in predictions.csv: the image is its path relative to dataset_dir, or absolute outside it."""
    dataset_dir = tmp_path / "data"
    files = [
        dataset_dir / "train" / "0001.nii.gz",
        dataset_dir / "test" / "0001.nii.gz",
        tmp_path / "x" / "0001.nii.gz",
    ]
    collector = PredictionCollector(dataset_dir=str(dataset_dir))
    probs, labels = _binary(3, seed=7)
    labels[:2] = torch.tensor([0, 1])
    output = [{"pred": probs[i], "label": torch.nn.functional.one_hot(labels[i], 2).float()} for i in range(3)]
    batch = [{"image": MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": str(f)})} for f in files]
    collector.collect(SimpleNamespace(state=SimpleNamespace(output=output, batch=batch)))  # type: ignore[arg-type]
    EvaluationReport(tmp_path / "out", collector, n_boot=0).write()
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["train/0001.nii.gz", "test/0001.nii.gz", str(files[2])]
    assert [r["case"] for r in rows] == ["0001"] * 3  # the case column is unchanged: the entry's case, else the stem


def _image_of(collector: PredictionCollector, filename: str) -> str:
    """The ``image`` the collector records for one case loaded from ``filename``."""
    output = [{"pred": torch.tensor([0.3, 0.7]), "label": torch.tensor([0.0, 1.0])}]
    batch = [{"image": MetaTensor(torch.zeros(1), meta={"filename_or_obj": filename})}]
    collector.collect(SimpleNamespace(state=SimpleNamespace(output=output, batch=batch)))  # type: ignore[arg-type]
    return collector.cases[-1]["image"]


def test_image_paths_given_relative_to_the_working_folder(tmp_path, monkeypatch):
    """The bundle's default dataset_dir is ``./data``: the loader's paths are then relative to the working folder."""
    monkeypatch.chdir(tmp_path)
    assert _image_of(PredictionCollector(dataset_dir="./data"), "./data/subset3/1.2.3.mhd") == "subset3/1.2.3.mhd"
    assert _image_of(PredictionCollector(dataset_dir="./data"), "data2/1.2.3.mhd") == str(tmp_path / "data2/1.2.3.mhd")
    assert _image_of(PredictionCollector(), "./data/subset3/1.2.3.mhd") == str(tmp_path / "data/subset3/1.2.3.mhd")
