"""Cross-validation folds: grouped by patient, stratified, deterministic, the test section never used."""

from __future__ import annotations

from collections import defaultdict

import pytest

from volcnn.core.errors import UsageError
from volcnn.data.folds import assign_folds, fold_datalist, patient_of


def _entries(patients: int = 20, per_patient: int = 6) -> list[dict]:
    """Candidates of ``patients`` CTs; every third patient has one nodule, patient 7 two CTs."""
    out = []
    for p in range(patients):
        images = [f"images/p{p:02d}_a.nii.gz", f"images/p{p:02d}_b.nii.gz"] if p == 7 else [f"images/p{p:02d}.nii.gz"]
        for image in images:
            for c in range(per_patient):
                label = 1 if (p % 3 == 0 and c == 0) else 0
                out.append({"image": image, "label": label, "center": [c, 0, 0], "patient": f"P{p:02d}"})
    return out


def test_folds_are_grouped_stratified_and_deterministic():
    entries = _entries()
    folds = assign_folds(entries, 5, seed=0)
    by_patient = defaultdict(set)
    for e, f in zip(entries, folds, strict=True):
        by_patient[e["patient"]].add(f)
    assert all(len(f) == 1 for f in by_patient.values())  # a patient (both CTs of P07 too) in one fold
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    positives = [sum(e["label"] for e, f in zip(entries, folds, strict=True) if f == i) for i in range(5)]
    assert min(positives) >= 1 and max(positives) - min(positives) <= 1  # 7 nodule patients over 5 folds
    assert assign_folds(entries, 5, seed=0) == folds
    assert assign_folds(entries, 5, seed=1) != folds


def test_patient_defaults_to_the_case_name():
    assert patient_of({"image": "images/case_003.nii.gz"}) == "case_003"
    assert patient_of({"image": "x/a.nii.gz", "patient": "P1"}) == "P1"


def test_fold_datalist_splits_train_validation_test_and_leaves_the_real_test_out():
    entries = _entries()
    folds = assign_folds(entries, 5, seed=0)
    raw = {"labels": {"0": "no", "1": "yes"}, "training": entries, "validation": [], "test": [{"image": "t.nii.gz"}]}
    for fold in range(5):
        doc = fold_datalist(raw, entries, folds, fold, 5, 0)
        assert doc["labels"] == raw["labels"] and doc["crossval"] == {"fold": fold, "k": 5, "seed": 0}
        sections = {s: {e["patient"] for e in doc[s]} for s in ("training", "validation", "test")}
        assert not (sections["training"] & sections["validation"]) and not (sections["training"] & sections["test"])
        assert {folds[i] for i, e in enumerate(entries) if e["patient"] in sections["test"]} == {fold}
        assert {folds[i] for i, e in enumerate(entries) if e["patient"] in sections["validation"]} == {(fold + 1) % 5}
        assert all(e["image"] != "t.nii.gz" for s in ("training", "validation", "test") for e in doc[s])
        assert sum(len(doc[s]) for s in ("training", "validation", "test")) == len(entries)


@pytest.mark.parametrize(
    ("k", "patients", "message"),
    [(2, 20, "at least 3"), (5, 4, "4 patients cannot make 5 folds"), (8, 20, "class 1 is held by 7 patient")],
)
def test_folds_that_cannot_be_drawn_are_refused(k, patients, message):
    with pytest.raises(UsageError, match=message):
        assign_folds(_entries(patients), k)
