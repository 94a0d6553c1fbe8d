"""classification_report: contents agree with the individual metrics and always serialise to strict JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.evaluation.conftest import multiclass_data
from volcnn.evaluation import (
    binary_metrics,
    classification_report,
    expected_calibration_error,
    multiclass_metrics,
    roc_auc,
    roc_auc_ci,
    threshold_for_sensitivity,
    youden_threshold,
)

BINARY_KEYS = {
    "task",
    "num_samples",
    "num_positive",
    "num_negative",
    "auc",
    "auc_ci95",
    "threshold",
    "threshold_source",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "npv",
    "tp",
    "fp",
    "tn",
    "fn",
    "confusion_matrix",
    "ece",
}


def binary_probs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    probs = 1 / (1 + np.exp(-rng.normal(labels * 1.5 - 0.5, 1.0)))
    return probs, labels


def roundtrip(report: dict) -> dict:
    return json.loads(json.dumps(report, allow_nan=False))


def test_binary_report_contents():
    probs, labels = binary_probs()
    report = classification_report(torch.as_tensor(probs), torch.as_tensor(labels), n_boot=200, seed=1)
    assert roundtrip(report) == {k: list(v) if isinstance(v, tuple) else v for k, v in report.items()}
    assert set(report) == BINARY_KEYS
    assert report["task"] == "binary"
    assert (report["num_samples"], report["num_positive"]) == (300, int(labels.sum()))
    assert report["num_negative"] == 300 - int(labels.sum())
    assert report["auc"] == pytest.approx(roc_auc(probs, labels))
    assert report["auc_ci95"] == list(roc_auc_ci(probs, labels, n_boot=200, seed=1))
    assert report["threshold_source"] == "youden"
    assert report["threshold"] == youden_threshold(probs, labels)
    at = binary_metrics(probs, labels, report["threshold"])
    assert {k: report[k] for k in at} == at
    assert report["confusion_matrix"] == [[at["tn"], at["fp"]], [at["fn"], at["tp"]]]
    assert report["ece"] == pytest.approx(expected_calibration_error(probs, labels))


def test_binary_report_given_threshold_two_columns_and_target_sensitivity():
    probs, labels = binary_probs(seed=2)
    two_col = np.stack([1 - probs, probs], axis=1)
    report = classification_report(two_col, labels, threshold=0.5, n_boot=100, target_sensitivity=0.9)
    assert report["threshold_source"] == "given" and report["threshold"] == 0.5
    assert report["tp"] == int(((probs >= 0.5) & (labels == 1)).sum())
    assert report == classification_report(probs, labels, 0.5, n_boot=100, target_sensitivity=0.9)
    at = report["at_target_sensitivity"]
    assert at["target_sensitivity"] == 0.9 and at["sensitivity"] >= 0.9
    assert at["threshold"] == threshold_for_sensitivity(probs, labels, 0.9)
    assert at == {"target_sensitivity": 0.9, **binary_metrics(probs, labels, at["threshold"])}
    roundtrip(report)


@pytest.mark.parametrize("label", [0, 1])
def test_binary_report_one_class_is_valid_json(label):
    probs = np.linspace(0.05, 0.95, 12)
    report = classification_report(probs, np.full(12, label), target_sensitivity=0.8)
    assert report["auc"] is None and report["auc_ci95"] is None
    assert report["threshold_source"] == "default" and report["threshold"] == 0.5
    assert (report["at_target_sensitivity"] is None) == (label == 0)
    text = json.dumps(report, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text


def test_binary_report_without_bootstrap():
    probs, labels = binary_probs(n=50)
    assert classification_report(probs, labels, n_boot=0)["auc_ci95"] is None


def test_multiclass_report():
    probs, labels = multiclass_data(3)
    report = roundtrip(classification_report(probs, labels))
    assert report["task"] == "multiclass"
    assert report["num_samples"] == 300
    assert report["class_counts"] == np.bincount(labels, minlength=3).tolist()
    assert {k: report[k] for k in multiclass_metrics(probs, labels)} == multiclass_metrics(probs, labels)


def test_multiclass_report_with_absent_class_is_valid_json():
    probs, labels = multiclass_data(4, n=40)
    labels[labels == 3] = 0
    report = roundtrip(classification_report(probs, labels))
    assert report["auc_per_class"][3] is None and report["class_counts"][3] == 0


@pytest.mark.parametrize(
    ("probs", "labels", "kwargs", "match"),
    [
        ([0.2, 0.7, 0.9], [0, 1], {}, "same number of samples"),
        ([0.2, 0.7], [0, 3], {}, r"outside \[0, 2\)"),
        ([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], [0, 3], {}, r"outside \[0, 3\)"),
        ([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], [0, 2], {"threshold": 0.5}, "binary data only"),
        ([0.2, 0.7], [0, 1], {"threshold": float("inf")}, "threshold must be finite"),
        ([0.2, 1.7], [0, 1], {}, r"probabilities in \[0, 1\]"),
        ([0.2, 0.7], [0, 1], {"target_sensitivity": 0.0}, r"\(0, 1\]"),
        ([0.2, 0.7], [0, 1], {"n_boot": -1}, "non-negative"),
    ],
)
def test_report_errors(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        classification_report(probs, labels, **kwargs)
