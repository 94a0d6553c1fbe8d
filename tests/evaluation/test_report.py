"""write_classification_report without an engine: the files, the threshold's origin and the input checks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from volcnn.evaluation import (
    binary_metrics,
    classification_report,
    threshold_for_sensitivity,
    write_classification_report,
    youden_threshold,
)


def _binary(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).long()
    p1 = torch.sigmoid(torch.randn(n, generator=g) + 1.5 * labels).double()
    return torch.stack([1 - p1, p1], dim=1), labels


def _cases(n: int) -> list[dict[str, object]]:
    return [{"case": f"c{i // 3}", "image": f"sub{i % 2}/c{i // 3}.nii.gz", "center_x": float(i)} for i in range(n)]


def test_binary_report_files_and_validation_threshold(tmp_path):
    probs, labels = _binary(90, seed=1)
    vprobs, vlabels = _binary(50, seed=2)
    payload = write_classification_report(
        probs, labels, _cases(90), tmp_path, vprobs, vlabels, n_boot=100, extra={"network_def": "net"},
        engine_metrics={"val_auc": 0.75},
    )  # fmt: skip
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(payload))
    m = payload["metrics"]
    youden = youden_threshold(vprobs[:, 1], vlabels)
    assert m["threshold"] == youden and m["threshold_source"] == "validation (Youden)"
    expected = classification_report(probs[:, 1], labels, youden, n_boot=100, seed=0)
    assert {k: v for k, v in m.items() if k not in ("threshold_source", "at_target_sensitivity", "calibration")} == {
        k: v for k, v in expected.items() if k != "threshold_source"
    }
    at_threshold = threshold_for_sensitivity(vprobs[:, 1], vlabels, 0.9)
    at = {"target": 0.9, "chosen_on": "validation", **binary_metrics(probs[:, 1], labels, at_threshold)}
    assert m["at_target_sensitivity"] == at
    assert payload["engine_metrics"] == {"val_auc": 0.75} and payload["network_def"] == "net"
    assert payload["files"] == {"predictions": "predictions.csv", "roc": "roc.png", "confusion": "confusion.png",
                                "calibration": "calibration.png", "report": "report.html"}  # fmt: skip
    for name in payload["files"].values():
        assert (tmp_path / name).stat().st_size > 0

    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "case", "image", "center_x", "label", "prob", "predicted", "correct"]
    assert [r["image"] for r in rows[:2]] == ["sub0/c0.nii.gz", "sub1/c0.nii.gz"]
    predicted = np.array([int(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(predicted, (probs[:, 1] >= youden).long().numpy())
    assert sum(int(r["correct"]) for r in rows) == m["tp"] + m["tn"]
    html = (tmp_path / "report.html").read_text()
    assert "validation (Youden)" in html and "net" in html and "optimistic" not in html


def test_without_threshold_cases_the_threshold_is_the_sections_own(tmp_path):
    probs, labels = _binary(40, seed=3)
    m = write_classification_report(probs, labels, _cases(40), tmp_path, n_boot=0, section="holdout")["metrics"]
    assert m["threshold"] == youden_threshold(probs[:, 1], labels)
    assert m["threshold_source"] == "holdout (Youden; no validation cases)" and "at_target_sensitivity" not in m
    assert "optimistic" in (tmp_path / "report.html").read_text()


def test_multiclass_report_columns(tmp_path):
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (30,), generator=g)
    probs = torch.softmax(torch.randn(30, 3, generator=g), dim=1)
    payload = write_classification_report(probs, labels, _cases(30), tmp_path)
    assert payload["class_names"] == ["class 0", "class 1", "class 2"] and payload["metrics"]["task"] == "multiclass"
    with open(tmp_path / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert [c for c in row if c.startswith("prob")] == ["prob_0", "prob_1", "prob_2"]
    assert int(row["predicted"]) == int(probs[0].argmax())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"probs": torch.zeros(0, 2), "labels": [], "cases": []}, "no cases were evaluated in section 'test'"),
        ({"cases": _cases(9)}, r"same cases: 10, 10, 9"),
        ({"probs": torch.rand(10)}, r"shape \(N, K\)"),
        ({"labels": [2] * 10}, r"outside \[0, 2\)"),
        ({"threshold_probs": torch.full((4, 2), 0.5)}, "given together"),
    ],
)
def test_input_errors_write_nothing(tmp_path, kwargs, match):
    probs, labels = _binary(10, seed=5)
    args = {"probs": probs, "labels": labels, "cases": _cases(10), **kwargs}
    with pytest.raises(ValueError, match=match):
        write_classification_report(out_dir=tmp_path / "out", **args)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_calibration_is_fitted_on_the_validation_cases_and_lowers_the_ece(tmp_path):
    """Overconfident, prior-shifted probabilities (as class-weighted training gives): Platt scaling fitted on the
    validation cases is written to calibration.json and brings the test cases' ECE down; ranks are unchanged."""
    from volcnn.models import fit_platt, read_calibration

    def shifted(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = (torch.rand(n, generator=g) < 0.2).long()
        logit = 1.5 * (labels.double() * 2 - 1) + torch.randn(n, generator=g, dtype=torch.float64)
        p1 = torch.sigmoid(3.0 * logit + 2.0)  # shifted towards the positive class
        return torch.stack([1 - p1, p1], dim=1), labels

    probs, labels = shifted(400, 4)
    vprobs, vlabels = shifted(400, 5)
    m = write_classification_report(probs, labels, _cases(400), tmp_path, vprobs, vlabels, n_boot=0)["metrics"]
    cal = m["calibration"]
    assert cal["fitted_on"] == "validation" and cal["num_cases"] == 400
    assert cal["ece_before"] == m["ece"] and cal["ece_after"] < 0.5 * cal["ece_before"]
    # fitted on the validation cases, not the evaluated ones (fit_platt itself is tested in tests/models)
    assert (cal["a"], cal["b"]) == (
        fit_platt(vprobs[:, 1].numpy(), vlabels.numpy()).a,
        fit_platt(vprobs[:, 1].numpy(), vlabels.numpy()).b,
    )
    assert (cal["a"], cal["b"]) != (
        fit_platt(probs[:, 1].numpy(), labels.numpy()).a,
        fit_platt(probs[:, 1].numpy(), labels.numpy()).b,
    )
    stored = read_calibration(tmp_path / "calibration.json")
    assert stored is not None and (stored.a, stored.b) == (cal["a"], cal["b"])
    p1 = probs[:, 1].numpy()
    assert (np.argsort(stored.apply(p1), kind="stable") == np.argsort(p1, kind="stable")).all()
    (tmp_path / "calibration.json").unlink()
    write_classification_report(probs, labels, _cases(400), tmp_path, n_boot=0)  # no validation cases: none
    assert not (tmp_path / "calibration.json").exists()
