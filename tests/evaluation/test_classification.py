"""ROC/AUC, thresholds, confusion matrix and threshold metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from tests.evaluation.conftest import binary_data, multiclass_data
from volcnn.evaluation import (
    binary_metrics,
    confusion_matrix,
    expected_calibration_error,
    mean_ovr_auc,
    multiclass_metrics,
    roc_auc,
    roc_curve,
    roc_points,
    threshold_for_sensitivity,
    youden_threshold,
)

# ---------------------------------------------------------------- ROC curve and AUC


@pytest.mark.parametrize("drop_intermediate", [False, True])
def test_roc_curve_matches_sklearn(binary_case, drop_intermediate):
    scores, labels = binary_case
    fpr, tpr, thr = roc_curve(torch.as_tensor(scores), torch.as_tensor(labels), drop_intermediate=drop_intermediate)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    assert fpr.dtype == tpr.dtype == thr.dtype == torch.float64
    np.testing.assert_array_equal(thr.numpy(), sk_thr)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr, rtol=0, atol=1e-15)
    assert thr[0] == float("inf") and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def test_roc_curve_ties_form_one_point():
    fpr, tpr, thr = roc_curve([0.2, 0.5, 0.5, 0.5, 0.9], [0, 0, 1, 1, 1])
    assert thr.tolist() == [float("inf"), 0.9, 0.5, 0.2]
    assert tpr.tolist() == [0.0, 1 / 3, 1.0, 1.0]
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]


def test_roc_auc_matches_sklearn(binary_case):
    scores, labels = binary_case
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    # torch float32 input and list input give the AUC of those values
    s32 = torch.as_tensor(scores, dtype=torch.float32)
    assert roc_auc(s32, torch.as_tensor(labels)) == pytest.approx(skm.roc_auc_score(labels, s32.numpy()), abs=1e-12)
    assert roc_auc(scores.tolist(), labels.tolist()) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
        ([1, 2, 2, 3], [0, 0, 1, 1], 0.875),  # the tie between a positive and a negative counts one half
        ([0.5, 0.5, 0.5], [0, 1, 1], 0.5),
        ([0.9, 0.1], [0, 1], 0.0),
        ([0.1, 0.2, 0.3], [0, 1, 1], 1.0),
    ],
)
def test_roc_auc_hand_computed(scores, labels, expected):
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_roc_auc_accepts_bool_and_whole_float_labels():
    scores = [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(scores, [False, False, True, True]) == pytest.approx(0.75)
    assert roc_auc(scores, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2, 0.3], [1, 1, 1], "only one class"),
        ([0.1, 0.2, 0.3], [0, 0, 0], "only one class"),
        ([0.1, 0.2, 0.3], [0, 1], "same number of samples: scores has 3, labels has 2"),
        ([0.1, 0.2, 0.3], [0, 1, 2], r"values \[2\] outside \[0, 2\)"),
        ([0.1, 0.2, 0.3], [0, -1, 1], r"outside \[0, 2\)"),
        ([0.1, float("nan"), 0.3], [0, 1, 1], "non-finite"),
        ([0.1, float("inf"), 0.3], [0, 1, 1], "non-finite"),
        ([[0.1, 0.2]], [0], r"1-D with shape \(N,\)"),
        ([], [], "empty"),
        ([0.1, 0.2, 0.3], [0, 0.5, 1], "integer class indices"),
        (["a", "b"], [0, 1], "could not be converted"),
    ],
)
def test_binary_inputs_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        roc_auc(scores, labels)
    with pytest.raises(ValueError, match=match):
        roc_curve(scores, labels)


def test_roc_points_is_json_ready():
    scores, labels = binary_data("tied")
    points = roc_points(scores, labels)
    assert points["thresholds"][0] is None
    assert len(points["fpr"]) == len(points["tpr"]) == len(points["thresholds"])
    json.dumps(points, allow_nan=False)
    sk_fpr, _, _ = skm.roc_curve(labels, scores)  # sklearn's default drop_intermediate=True
    np.testing.assert_allclose(points["fpr"], sk_fpr)


# ---------------------------------------------------------------- thresholds


def test_youden_threshold_is_sklearn_argmax(binary_case):
    scores, labels = binary_case
    fpr, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    assert best > 0  # informative data: the +inf point is not the best
    t = youden_threshold(scores, labels)
    assert t == thr[best]
    m = binary_metrics(scores, labels, t)
    assert m["sensitivity"] - (1 - m["specificity"]) == pytest.approx(np.max(tpr - fpr))


def test_youden_threshold_when_nothing_beats_chance_predicts_all_negative():
    scores = np.array([0.9, 0.8, 0.3, 0.2])
    labels = np.array([0, 0, 1, 1])  # perfectly inverted
    t = youden_threshold(scores, labels)
    assert np.isfinite(t) and t > scores.max()
    assert t - scores.max() < 1e-6
    assert binary_metrics(scores, labels, t)["tp"] + binary_metrics(scores, labels, t)["fp"] == 0
    # also when the caller compares float32 scores with the Python float threshold
    assert not bool((torch.as_tensor(scores, dtype=torch.float32) >= t).any())


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_is_largest_reaching_target(binary_case, target):
    scores, labels = binary_case
    t = threshold_for_sensitivity(scores, labels, target)
    assert binary_metrics(scores, labels, t)["sensitivity"] >= target
    larger = np.unique(scores[scores > t])
    if larger.size:  # the next larger threshold falls short
        assert binary_metrics(scores, labels, larger[0])["sensitivity"] < target
    _, tpr, thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert t == thr[np.argmax(tpr >= target)]


def test_threshold_for_sensitivity_exact_fraction():
    scores = np.arange(10, dtype=np.float64)
    labels = np.ones(10, dtype=np.int64)  # negatives are not needed
    assert threshold_for_sensitivity(scores, labels, 0.7) == 3.0  # 7 of 10 positives at >= 3


@pytest.mark.parametrize(("target", "labels", "match"), [(0.0, [0, 1], r"\(0, 1\]"), (1.5, [0, 1], r"\(0, 1\]")])
def test_threshold_for_sensitivity_bad_target(target, labels, match):
    with pytest.raises(ValueError, match=match):
        threshold_for_sensitivity([0.2, 0.8], labels, target)


def test_threshold_errors_on_one_class():
    with pytest.raises(ValueError, match="without positive labels"):
        threshold_for_sensitivity([0.2, 0.8], [0, 0], 0.9)
    with pytest.raises(ValueError, match="only one class"):
        youden_threshold([0.2, 0.8], [1, 1])


# ---------------------------------------------------------------- confusion matrix and threshold metrics


@pytest.mark.parametrize("k", [2, 3, 4])
def test_confusion_matrix_matches_sklearn(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 200)
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, k, 200))
    cm = confusion_matrix(torch.as_tensor(preds), torch.as_tensor(labels), k)
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(labels, preds, labels=list(range(k))))


def test_confusion_matrix_layout_and_absent_classes():
    cm = confusion_matrix([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]  # rows true, columns predicted; class 2 unused


@pytest.mark.parametrize(
    ("preds", "labels", "k", "match"),
    [
        ([0, 3], [0, 1], 3, r"preds has values \[3\] outside \[0, 3\)"),
        ([0, 1], [0, 5], 3, r"labels has values \[5\] outside \[0, 3\)"),
        ([0, 1, 1], [0, 1], 3, "same number of samples"),
        ([0, 1], [0, 1], 0, "positive integer"),
    ],
)
def test_confusion_matrix_errors(preds, labels, k, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(preds, labels, k)


@pytest.mark.parametrize("kind", ["random", "tied", "imbalanced"])
def test_binary_metrics_match_sklearn(kind):
    scores, labels = binary_data(kind)
    for t in [*np.quantile(scores, [0.0, 0.1, 0.5, 0.9]), scores.max(), scores.max() + 1]:
        m = binary_metrics(scores, labels, t)
        pred = (scores >= t).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
        assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (tn, fp, fn, tp)
        assert all(type(m[key]) is int for key in ("tp", "fp", "tn", "fn"))
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(labels, pred, zero_division=0))
        assert m["specificity"] == pytest.approx(skm.recall_score(labels, pred, pos_label=0, zero_division=0))
        assert m["precision"] == pytest.approx(skm.precision_score(labels, pred, zero_division=0))
        assert m["npv"] == pytest.approx(skm.precision_score(labels, pred, pos_label=0, zero_division=0))
        assert m["f1"] == pytest.approx(skm.f1_score(labels, pred, zero_division=0))
        assert m["threshold"] == t


def test_binary_metrics_zero_division_is_zero_not_nan():
    m = binary_metrics([0.1, 0.2], [0, 0], threshold=0.5)  # no positives, nothing predicted positive
    assert (m["precision"], m["sensitivity"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["specificity"] == 1.0 and m["npv"] == 1.0 and m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0.1, 0.2], [0, 1], threshold=float("nan"))


# ---------------------------------------------------------------- multi-class


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_multiclass_metrics_match_sklearn(k, average):
    probs, labels = multiclass_data(k, seed=k)
    m = multiclass_metrics(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels), average=average)
    p32 = torch.as_tensor(probs, dtype=torch.float32).double().numpy()  # the values actually evaluated
    pred = p32.argmax(axis=1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, p32, multi_class="ovr", average=average), abs=1e-12)
    for c in range(k):
        assert m["auc_per_class"][c] == pytest.approx(skm.roc_auc_score(labels == c, p32[:, c]), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    prec, rec, f1, support = skm.precision_recall_fscore_support(labels, pred, zero_division=0)
    np.testing.assert_allclose(m["precision_per_class"], prec)
    np.testing.assert_allclose(m["recall_per_class"], rec)
    np.testing.assert_allclose(m["f1_per_class"], f1)
    assert m["support"] == support.tolist()
    avg = skm.precision_recall_fscore_support(labels, pred, average=average, zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(avg[:3])
    assert m["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
    assert m["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    json.dumps(m, allow_nan=False)


def test_multiclass_zero_division_and_unpredicted_class_match_sklearn():
    probs, labels = multiclass_data(4, seed=1)
    probs[:, 3] *= 0.01  # class 3 is never the argmax
    probs /= probs.sum(axis=1, keepdims=True)
    m = multiclass_metrics(probs, labels)
    pred = probs.argmax(axis=1)
    assert 3 not in pred
    prec, rec, f1, _ = skm.precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((prec, rec, f1))
    assert m["precision_per_class"][3] == 0.0


def test_multiclass_absent_class_has_no_auc():
    probs, labels = multiclass_data(3, seed=2)
    keep = labels != 2
    probs, labels = probs[keep], labels[keep]
    probs[:, 2] = 0.0  # class 2 never predicted either: sklearn's default macro skips it
    probs /= probs.sum(axis=1, keepdims=True)
    m = multiclass_metrics(probs, labels)
    assert m["auc_per_class"][2] is None
    assert m["auc"] == pytest.approx(np.mean(m["auc_per_class"][:2]))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(labels, probs.argmax(1), average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((prec, rec, f1))
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        ([[0.2, 0.8], [0.5, 0.5]], [0, 2], r"outside \[0, 2\)"),
        ([[2.0, -1.0], [0.5, 0.5]], [0, 1], r"probabilities in \[0, 1\]"),
        ([[0.2, 0.2], [0.5, 0.5]], [0, 1], "rows must sum to 1"),
        ([[0.2, 0.8], [0.5, 0.5]], [0, 1, 1], "same number of samples"),
        ([0.2, 0.8], [0, 1], r"shape \(N, K\)"),
    ],
)
def test_multiclass_errors(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        multiclass_metrics(probs, labels)


def test_multiclass_unknown_average():
    probs, labels = multiclass_data(3)
    with pytest.raises(ValueError, match="not one of"):
        multiclass_metrics(probs, labels, average="micro")


# ---------------------------------------------------------------- the training metric (train_auc / val_auc)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mean_ovr_auc_is_the_mean_of_the_column_aucs(k):
    probs, labels = multiclass_data(k, seed=10 + k)
    scores = torch.as_tensor(probs, dtype=torch.float32)  # what the evaluator's softmax gives
    per_column = [roc_auc(scores[:, c], labels == c) for c in range(k)]
    value = mean_ovr_auc(scores, labels)
    assert value == pytest.approx(np.mean(per_column), abs=1e-15)
    onehot = np.eye(k, dtype=int)[labels]
    assert value == skm.roc_auc_score(onehot, scores.double().numpy(), average="macro")
    if k > 2:
        assert value == pytest.approx(multiclass_metrics(scores, labels)["auc"], abs=1e-15)
    else:  # binary softmax: the two columns rank the cases the same way up to float32 ties
        assert value == pytest.approx(roc_auc(scores[:, 1], labels), abs=1e-3)


def test_mean_ovr_auc_takes_logits():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.7], [-3.0, 4.0], [0.0, 0.1]])  # rows do not sum to 1
    labels = torch.tensor([0, 1, 1, 0])
    expected = np.mean([roc_auc(logits[:, 0], labels == 0), roc_auc(logits[:, 1], labels == 1)])
    assert mean_ovr_auc(logits, labels) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]], [0, 1], r"undefined for classes \[2\]"),
        ([[0.2, 0.8], [0.6, 0.4]], [1, 1], r"undefined for classes \[0, 1\]"),
        ([0.2, 0.8], [0, 1], r"shape \(N, K\) with K >= 2"),
        ([[0.2, float("nan")], [0.6, 0.4]], [0, 1], "non-finite"),
        ([[0.2, 0.8], [0.6, 0.4]], [0, 2], r"outside \[0, 2\)"),
        ([[0.2, 0.8], [0.6, 0.4]], [0, 1, 1], "same number of samples"),
    ],
)
def test_mean_ovr_auc_errors(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        mean_ovr_auc(scores, labels)
