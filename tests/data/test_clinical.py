"""Tests of ``volcnn synth --clinical`` (volcnn.data.clinical): byte identity without it and of the images with it,
the declared features and their values, missingness, the risk model's dependence on both modalities, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from volcnn.cli import main
from volcnn.data import synthesize_cohort
from volcnn.data.clinical import (
    FEATURES,
    MISSING_FRACTION,
    NEVER_MISSING,
    RISK_MODEL,
    assign_clinical,
    clinical_rng,
    mask_missing,
    oracle_aucs,
    roc_auc,
    sample_patient,
    simulate,
)
from volcnn.data.nodules import sample_nodule
from volcnn.io.features import parse_feature_spec, read_features_csv

SEED, CASES = 0, 8  # 13 nodules, 4 of them labelled against their appearance, 2 missing values

# SHA-256 (first 16 hex digits) of the tables of synthesize_cohort(cases=8, seed=0, size="tiny") as written before
# --clinical existed: a cohort without it must not change. Update only for an intended change of the generator.
GOLDEN = {
    "annotations.csv": "683606484493f7e7",
    "candidates.csv": "f862693ede9eb0fd",
    "cohort.json": "f40855628a51d00e",
    "datalist.json": "65096013b350903b",
    "datalist_malignancy.json": "5fb21f3cb52e5749",
    "datalist_volume.json": "f89fc83e9be6f243",
    "nodules.csv": "04b8c8ad25676de5",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same seed without and with --clinical (through the CLI), and with --clinical again."""
    root = tmp_path_factory.mktemp("clinical")
    synthesize_cohort(root / "plain", cases=CASES, seed=SEED, size="tiny")
    for name in ("clinical", "again"):
        argv = ["synth", "--out", str(root / name), "--cases", str(CASES), "--seed", str(SEED), "--size", "tiny"]
        assert main([*argv, "--clinical", "--no-progress"]) == 0
    return {name: root / name for name in ("plain", "clinical", "again")}


def test_without_clinical_the_tables_are_as_before(cohorts: dict[str, Path]) -> None:
    plain = cohorts["plain"]
    digests = {name: hashlib.sha256((plain / name).read_bytes()).hexdigest()[:16] for name in GOLDEN}
    assert digests == GOLDEN
    assert not (plain / "clinical.csv").exists()
    assert "features" not in json.loads((plain / "datalist_malignancy.json").read_text())


def test_clinical_keeps_the_images_and_geometry_tables(cohorts: dict[str, Path]) -> None:
    plain, clin = _files(cohorts["plain"]), _files(cohorts["clinical"])
    images = [k for k in plain if k.startswith("images/")]
    assert len(images) == CASES
    assert [k for k in images if plain[k] != clin[k]] == []
    for name in ("annotations.csv", "candidates.csv"):
        assert plain[name] == clin[name], name
    assert set(clin) - set(plain) == {"clinical.csv"}
    # nodules: same nodules in the same order, geometry unchanged, the drawn class kept as appearance_malignant
    before, after = _rows(cohorts["plain"] / "nodules.csv"), _rows(cohorts["clinical"] / "nodules.csv")
    assert len(before) == len(after) == 13
    same = ("case", "x_ras", "y_ras", "z_ras", "diameter_mm", "texture", "calcified")
    assert [[r[k] for k in same] for r in before] == [[r[k] for k in same] for r in after]
    assert [r["malignant"] for r in before] == [r["appearance_malignant"] for r in after]
    assert any(r["malignant"] != r["appearance_malignant"] for r in after)  # labels come from the risk model
    assert all(0.0 < float(r["risk"]) < 1.0 for r in after)


def test_same_seed_same_bytes(cohorts: dict[str, Path], tmp_path: Path) -> None:
    a, b = _files(cohorts["clinical"]), _files(cohorts["again"])
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
    synthesize_cohort(tmp_path, cases=2, seed=SEED + 1, size="tiny", clinical=True)
    other = (tmp_path / "clinical.csv").read_text().splitlines()
    assert other[1:] != (cohorts["clinical"] / "clinical.csv").read_text().splitlines()[1:3]


def test_features_are_declared_and_valid(cohorts: dict[str, Path]) -> None:
    out = cohorts["clinical"]
    body = json.loads((out / "datalist_malignancy.json").read_text())
    spec = parse_feature_spec(body["features"])
    assert spec.names == ["age", "sex", "pack_years", "family_history", "emphysema", "cea"]
    assert [d.type for d in spec.decls] == ["numeric", "categorical", "numeric", "binary", "binary", "numeric"]
    from_csv = read_features_csv(out / "clinical.csv", spec)
    assert sorted(from_csv) == [f"case_{i:03d}" for i in range(CASES)]
    entries = [(s, i, e) for s in ("training", "validation", "test") for i, e in enumerate(body[s])]
    assert len(entries) == 13
    labels = [r["malignant"] for r in _rows(out / "nodules.csv")]
    assert sorted(str(e["label"]) for _, _, e in entries) == sorted(labels)
    for split, i, e in entries:
        where = f"{split}[{i}]"
        feats = e["features"]
        assert list(feats) == spec.names, where
        assert isinstance(feats["age"], int) and feats["sex"] in ("F", "M"), where
        assert all(feats[k] is None or isinstance(feats[k], bool) for k in ("family_history", "emphysema")), where
        raw = spec.encode(feats, where)
        np.testing.assert_array_equal(raw, spec.encode(from_csv[e["case"]], where))  # NaN where missing, both
    missing = sum(v is None for vals in from_csv.values() for v in vals.values())
    assert missing == 2 == sum(v == "" for row in _rows(out / "clinical.csv") for v in row.values())
    nulls = {(e["case"], k) for _, _, e in entries for k, v in e["features"].items() if v is None}
    assert nulls and nulls <= {(c, k) for c, vals in from_csv.items() for k, v in vals.items() if v is None}
    summary = json.loads((out / "cohort.json").read_text())["clinical"]
    assert summary["features"] == body["features"] and summary["risk_model"] == RISK_MODEL.to_json()
    assert sum(summary["missing"].values()) == missing
    assert summary["oracle_auc"]["all"]["nodules"] == 13


def test_missing_at_random_except_age_and_sex() -> None:
    rng = np.random.default_rng(1)
    masked = [mask_missing(sample_patient(rng), rng) for _ in range(4000)]
    share = {k: float(np.mean([m[k] is None for m in masked])) for k in FEATURES}
    assert NEVER_MISSING == ("age", "sex") and MISSING_FRACTION == 0.05
    for k in ("age", "sex"):
        assert share[k] == 0.0, k
    for k in ("pack_years", "family_history", "emphysema", "cea"):
        assert abs(share[k] - 0.05) < 0.015, (k, share[k])
    spec = parse_feature_spec(FEATURES)
    for i, m in enumerate(masked[:200]):  # every drawn value is valid for the declaration
        spec.encode(m, f"patient {i}")


def test_labels_depend_on_clinical_and_image_traits() -> None:
    """On simulated draws (as the cohort draws them): each modality's true logit, and raw traits of each, rank
    the labels; together they rank them better; and the tuning targets hold (image, clinical ~0.8, both >= 0.9)."""
    sim = simulate(np.random.default_rng(7), 3000, (4.0, 12.0))
    y = sim["label"]
    assert 0.3 < y.mean() < 0.5
    auc = oracle_aucs(sim["clinical_logit"], sim["image_logit"], y)
    assert 0.75 < auc["image"] < 0.85 and 0.75 < auc["clinical"] < 0.85, auc
    assert auc["both"] >= 0.9 and auc["both"] > max(auc["image"], auc["clinical"]) + 0.08, auc
    for trait in ("pack_years", "cea", "age", "log_diameter", "spiculated", "lobulation"):
        assert roc_auc(sim[trait], y) > 0.55, trait
    assert roc_auc(-sim["calcified"], y) > 0.55
    # the label is not the appearance class: it depends on the patient too
    assert roc_auc(sim["appearance"], y) < 0.8
    assert roc_auc(sim["clinical_logit"], sim["appearance"]) == pytest.approx(0.5, abs=0.04)
    np.testing.assert_allclose(sim["risk"], RISK_MODEL.probability(sim["clinical_logit"], sim["image_logit"]))


def test_clinical_draws_do_not_depend_on_the_nodules() -> None:
    nods = [sample_nodule(np.random.default_rng(k), bool(k % 2), (4.0, 12.0)) for k in range(3)]
    a = assign_clinical(clinical_rng(3, 5), nods)
    b = assign_clinical(clinical_rng(3, 5), nods[:1])
    assert a.features == b.features and a.complete == b.complete and a.clinical_logit == b.clinical_logit
    assert a.image_logits[0] == b.image_logits[0] and len(a.labels) == 3
    assert assign_clinical(clinical_rng(3, 6), nods).complete != a.complete


def test_roc_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # ties
    y = (rng.random(300) < 1 / (1 + np.exp(-2 * s))).astype(int)
    assert math.isclose(roc_auc(s, y), roc_auc_score(y, s), rel_tol=1e-12)
    assert roc_auc(s, np.zeros(300)) is None


def test_risk_factors_are_correlated_as_in_screening_cohorts() -> None:
    """Smoking drives emphysema and CEA, older patients smoked more, family history stands apart: a value a patient
    lacks can be partly inferred from the others."""
    rng = np.random.default_rng(2)
    p = [sample_patient(rng) for _ in range(4000)]
    py = np.log1p([x["pack_years"] for x in p])
    cea = np.log([x["cea"] for x in p])
    emph = np.array([x["emphysema"] for x in p], dtype=float)
    age = np.array([x["age"] for x in p], dtype=float)
    fam = np.array([x["family_history"] for x in p], dtype=float)
    r = np.corrcoef([py, cea, emph, age, fam])
    assert r[0, 1] > 0.6 and r[0, 2] > 0.25 and r[1, 2] > 0.25 and r[0, 3] > 0.08, r
    assert np.abs(r[4, :4]).max() < 0.05, r
    never, heavy = py == 0, py > np.log1p(40)
    assert 0.25 < never.mean() < 0.35 and emph[heavy].mean() > 3 * emph[never].mean()


def test_oracle_loss_to_missing_values_grows_with_the_missing_share():
    from volcnn.data.clinical import oracle_auc_with_missing

    none = oracle_auc_with_missing(0.0, n=3000)
    assert none["lost"] == 0.0 and none["complete"] == none["missing"] == none["missing_mean_imputed"]
    runs = [oracle_auc_with_missing(f, n=3000, seed=1) for f in (0.1, 0.3, 0.6)]
    lost = [r["lost"] for r in runs]
    assert 0 < lost[0] < lost[1] < lost[2]
    # imputing from the correlated present values loses less than imputing the mean
    assert all(r["lost"] < r["lost_mean_imputed"] for r in runs[1:]), runs
    with pytest.raises(ValueError, match="fraction"):
        oracle_auc_with_missing(1.0)
