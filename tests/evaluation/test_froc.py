"""FROC / CPM by the LUNA16 rules: a hand-computed example, the official script's numbers, edge cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from volcnn.evaluation.froc import EXCLUDED_DEFAULT_DIAMETER_MM, LUNA16_FP_RATES, froc, rate_key, sensitivity_at

KEYS = ["0.125", "0.25", "0.5", "1", "2", "4", "8"]

# Four scans, four nodules, eight findings (world mm). Scan D has neither findings nor nodules but is evaluated.
#   A: N1 at (0,0,0) d=10 (r=5), N2 at (50,0,0) d=6 (r=3)
#      f1 (1,0,0)     p=0.9   1 mm from N1                        -> TP for N1 (its most probable hit)
#      f2 (0,2,0)     p=0.4   2 mm from N1, second hit            -> ignored (double detection)
#      f3 (50,2.9,0)  p=0.7   2.9 mm from N2 (r=3): just inside   -> TP for N2
#      f4 (100,0,0)   p=0.8   nothing there                       -> FP
#   B: N3 at (0,0,0) d=8 (r=4); excluded region E at (30,30,30) d=6 (r=3)
#      f5 (4.1,0,0)   p=0.9   4.1 mm from N3 (r=4): just outside  -> FP (same probability as f1: a tie)
#      f6 (31,30,30)  p=0.85  1 mm from E                         -> ignored (excluded)
#      f7 (0,0,-3)    p=0.3   3 mm from N3                        -> TP for N3
#   C: N4 at (10,10,10) d=5, never hit                            -> missed
#      f8 (-40,0,0)   p=0.6                                       -> FP
#   D: nothing.
# Counted: detected nodules at p = 0.9, 0.7, 0.3; false positives at p = 0.9, 0.8, 0.6. 4 scans, 4 nodules.
# Sweep (threshold: TP, FP -> FPs/scan, sensitivity):
#   0.9: 1, 1 -> 0.25, 0.25     0.8: 1, 2 -> 0.50, 0.25     0.7: 2, 2 -> 0.50, 0.50
#   0.6: 2, 3 -> 0.75, 0.50     0.3: 3, 3 -> 0.75, 0.75
# Sensitivity at (linear interpolation in FPs/scan from the origin (0, 0); highest value on a vertical run):
#   1/8: half-way from (0, 0) to (0.25, 0.25) -> 0.125     1/4: 0.25
#   1/2: vertical run (0.5, 0.25) -> (0.5, 0.5) -> 0.5     1, 2, 4, 8: past the end -> 0.75
# CPM = (0.125 + 0.25 + 0.5 + 4 * 0.75) / 7 = 3.875 / 7.
FINDINGS = {
    "A": [((1, 0, 0), 0.9), ((0, 2, 0), 0.4), ((50, 2.9, 0), 0.7), ((100, 0, 0), 0.8)],
    "B": [((4.1, 0, 0), 0.9), ((31, 30, 30), 0.85), ((0, 0, -3), 0.3)],
    "C": [((-40, 0, 0), 0.6)],
}
NODULES = {"A": [((0, 0, 0), 10), ((50, 0, 0), 6)], "B": [((0, 0, 0), 8)], "C": [((10, 10, 10), 5)]}
EXCLUDED = {"B": [((30, 30, 30), 6)]}
CASES = ["A", "B", "C", "D"]


@pytest.mark.parametrize(
    "threshold, point",
    [
        # >= 0.75: A's 0.9 hits, B's 0.9 (4.1 mm from an 8 mm nodule) and A's 0.8 are FPs, B's 0.85 is excluded
        (0.75, {"sensitivity": 0.25, "fps_per_scan": 0.5, "num_tp": 1, "num_fp": 2}),
        (0.7, {"sensitivity": 0.5, "fps_per_scan": 0.5, "num_tp": 2, "num_fp": 2}),  # the curve's 0.7 point
        (0.95, {"sensitivity": 0.0, "fps_per_scan": 0.0, "num_tp": 0, "num_fp": 0}),
    ],
)
def test_operating_point_reads_the_findings_a_user_is_shown(threshold, point):
    r = froc(FINDINGS, NODULES, CASES, EXCLUDED, operating_threshold=threshold)
    assert r["operating_point"] == {"threshold": threshold, **point}
    assert "operating_point" not in froc(FINDINGS, NODULES, CASES, EXCLUDED)


def test_hand_computed_example():
    r = froc(FINDINGS, NODULES, CASES, EXCLUDED)
    assert r["curve"]["thresholds"] == [0.9, 0.8, 0.7, 0.6, 0.3]
    assert r["curve"]["fps_per_scan"] == [0.25, 0.5, 0.5, 0.75, 0.75]
    assert r["curve"]["sensitivity"] == [0.25, 0.25, 0.5, 0.5, 0.75]
    assert r["sensitivities"] == dict(zip(KEYS, [0.125, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75], strict=True))
    assert r["cpm"] == pytest.approx(3.875 / 7, abs=1e-12)
    counts = {k: v for k, v in r.items() if k.startswith("num_")}
    assert counts == {
        "num_scans": 4,
        "num_nodules": 4,
        "num_findings": 8,
        "num_tp": 3,
        "num_fp": 3,
        "num_ignored_duplicate": 1,
        "num_ignored_excluded": 1,
    }
    assert r["fp_rates"] == list(LUNA16_FP_RATES)
    assert json.loads(json.dumps(r, allow_nan=False)) == r  # plain JSON, keys already strings


def test_without_the_exclusion_the_finding_is_a_false_positive():
    # f6 (p=0.85) now counts. Sweep: 0.9: 1,1 -> (.25,.25); 0.85: 1,2 -> (.5,.25); 0.8: 1,3 -> (.75,.25);
    # 0.7: 2,3 -> (.75,.5); 0.6: 2,4 -> (1,.5); 0.3: 3,4 -> (1,.75). At 1/8: .125, 1/4: .25, 1/2: .25,
    # 1 (vertical run at 1.0): .75, 2..8: .75. CPM = 3.625 / 7.
    r = froc(FINDINGS, NODULES, CASES)
    assert r["num_fp"] == 4 and r["num_ignored_excluded"] == 0
    assert list(r["sensitivities"].values()) == [0.125, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75]
    assert r["cpm"] == pytest.approx(3.625 / 7, abs=1e-12)


def test_scans_without_findings_count_in_the_fp_rate():
    # Dropping D leaves 3 scans: the same 3 FPs are 1/3 FP per scan each.
    r = froc(FINDINGS, NODULES, ["A", "B", "C"], EXCLUDED)
    assert r["num_scans"] == 3
    assert r["curve"]["fps_per_scan"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1, 1])
    # the default case list is the union of the two mappings, which has no D either
    assert froc(FINDINGS, NODULES, excluded_per_case=EXCLUDED)["num_scans"] == 3


def test_hit_radius_boundary_and_duplicates():
    nodule = {"s": [((0, 0, 0), 8.0)]}
    assert froc({"s": [((4.0, 0, 0), 0.5)]}, nodule)["num_tp"] == 1  # exactly on the sphere: a hit (<=)
    assert froc({"s": [((0, 4.001, 0), 0.5)]}, nodule)["num_fp"] == 1
    # the most probable of several hits detects the nodule; the others are ignored, not FPs
    r = froc({"s": [((1, 0, 0), 0.2), ((0, 1, 0), 0.7), ((0, 0, 1), 0.5)]}, nodule)
    assert (r["num_tp"], r["num_fp"], r["num_ignored_duplicate"]) == (1, 0, 2)
    assert r["curve"]["thresholds"] == [0.7]
    # one finding inside two overlapping nodules detects both (as in the official script)
    two = {"s": [((0, 0, 0), 8.0), ((2, 0, 0), 8.0)]}
    r = froc({"s": [((1, 0, 0), 0.6)]}, two)
    assert (r["num_tp"], r["num_nodules"], r["cpm"]) == (2, 2, 1.0)


def test_excluded_annotation_with_negative_diameter_gets_10_mm():
    assert EXCLUDED_DEFAULT_DIAMETER_MM == 10.0
    nodules, excluded = {"s": [((0, 0, 0), 6.0)]}, {"s": [((50, 0, 0), -1.0)]}
    inside = froc({"s": [((54.9, 0, 0), 0.5)]}, nodules, excluded_per_case=excluded)
    outside = froc({"s": [((55.1, 0, 0), 0.5)]}, nodules, excluded_per_case=excluded)
    assert (inside["num_ignored_excluded"], inside["num_fp"]) == (1, 0)
    assert (outside["num_ignored_excluded"], outside["num_fp"]) == (0, 1)


def test_perfect_detector_has_cpm_1():
    rng = np.random.default_rng(3)
    nodules = {
        f"s{i}": [(tuple(rng.uniform(-100, 100, 3)), float(rng.uniform(4, 20))) for _ in range(i % 3)] for i in range(9)
    }
    hits = {c: [(xyz, 0.9) for xyz, _ in ann] for c, ann in nodules.items()}
    assert froc(hits, nodules)["cpm"] == 1.0
    # less probable false positives on top do not lower it: every nodule is found at 0 FPs per scan
    noisy = {c: hits[c] + [((300.0, 300.0, float(k)), 0.5) for k in range(20)] for c in nodules}
    r = froc(noisy, nodules)
    assert r["cpm"] == 1.0 and r["num_fp"] == 9 * 20


def test_no_findings_or_only_false_positives_give_cpm_0():
    r = froc({}, NODULES, CASES)
    assert r["cpm"] == 0.0 and r["curve"] == {"fps_per_scan": [], "sensitivity": [], "thresholds": []}
    assert r["num_findings"] == 0 and set(r["sensitivities"].values()) == {0.0}
    r = froc({"A": [((500, 500, 500), 0.99)]}, NODULES, CASES)
    assert r["cpm"] == 0.0 and r["num_fp"] == 1


def _random_problem(seed: int, n_scans: int = 25) -> tuple[dict, dict, dict]:
    """Scans with 0-3 nodules, hits in and just around them, excluded regions (some -1 mm), random FPs.

    Probabilities are rounded to 0.05 so that many are tied.
    """
    rng = np.random.default_rng(seed)
    findings: dict = {}
    nodules: dict = {}
    excluded: dict = {}
    for s in range(n_scans):
        case = f"scan{s:02d}"
        ann = [(rng.uniform(-150, 150, 3), float(rng.uniform(3, 25))) for _ in range(rng.integers(0, 4))]
        exc = [
            (rng.uniform(-150, 150, 3), float(rng.choice([-1.0, rng.uniform(3, 15)])))
            for _ in range(rng.integers(0, 3))
        ]
        marks = []
        for centre, diameter in ann + exc:
            r = 10.0 if diameter < 0 else diameter / 2
            for _ in range(rng.integers(0, 3)):
                direction = rng.normal(size=3)
                offset = direction / np.linalg.norm(direction) * r * rng.uniform(0, 1.3)
                marks.append((centre + offset, round(float(rng.uniform(0, 1)) * 20) / 20))
        marks += [
            (rng.uniform(-150, 150, 3), round(float(rng.uniform(0, 1)) * 20) / 20) for _ in range(rng.integers(0, 6))
        ]
        if ann:
            nodules[case] = [(c.tolist(), d) for c, d in ann]
        if exc:
            excluded[case] = [(c.tolist(), d) for c, d in exc]
        if marks or rng.random() < 0.5:
            findings[case] = [(c.tolist(), p) for c, p in marks]
    return findings, nodules, excluded


def _official_luna16(findings: dict, nodules: dict, excluded: dict, cases: list[str]) -> list[float]:
    """Sensitivity at the LUNA16 rates, computed the way ``noduleCADEvaluationLUNA16.py`` does it.

    Per scan, each nodule hit by marks (squared distance < radius squared) adds one positive with its best mark's
    probability, a missed nodule adds a positive that is left out of the ROC but kept in the nodule count, marks on
    excluded regions (radius 5 mm for a negative diameter) are dropped, the rest are negatives. The curve is
    scikit-learn's ROC scaled to FPs per scan and sensitivity, read with ``np.interp``.
    """
    from sklearn.metrics import roc_curve

    labels, probs, left_out = [], [], []
    for case in cases:
        marks = dict(enumerate(findings.get(case, [])))
        remaining = set(marks)
        for (centre, diameter), included in [(a, True) for a in nodules.get(case, [])] + [
            (e, False) for e in excluded.get(case, [])
        ]:
            radius2 = (10.0 if diameter < 0 else diameter) ** 2 / 4
            hit = [
                k
                for k, (xyz, _) in marks.items()
                if sum((a - b) ** 2 for a, b in zip(centre, xyz, strict=True)) < radius2
            ]
            remaining -= set(hit)
            if included:
                labels.append(1)
                probs.append(max((marks[k][1] for k in hit), default=-1e9))
                left_out.append(not hit)
        for k in sorted(remaining):
            labels.append(0)
            probs.append(marks[k][1])
            left_out.append(False)
    kept_labels = [y for y, skip in zip(labels, left_out, strict=True) if not skip]
    kept_probs = [p for p, skip in zip(probs, left_out, strict=True) if not skip]
    fpr, tpr, _ = roc_curve(kept_labels, kept_probs)
    detected = sum(kept_labels)
    fps = fpr * (len(kept_labels) - detected) / len(cases)
    sens = tpr * detected / sum(labels)
    return [float(v) for v in np.interp(LUNA16_FP_RATES, fps, sens)]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_official_luna16_computation(seed):
    pytest.importorskip("sklearn")
    findings, nodules, excluded = _random_problem(seed)
    cases = sorted(set(findings) | set(nodules) | set(excluded))
    r = froc(findings, nodules, cases, excluded)
    expected = _official_luna16(findings, nodules, excluded, cases)
    assert list(r["sensitivities"].values()) == pytest.approx(expected, abs=1e-12)
    assert r["cpm"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    assert 0 < r["num_tp"] < r["num_nodules"] and r["num_fp"] > 0 and r["num_ignored_excluded"] > 0


@pytest.mark.parametrize("seed", range(4))
def test_curve_and_sensitivities_are_monotonic(seed):
    findings, nodules, excluded = _random_problem(seed + 100, n_scans=40)
    r = froc(findings, nodules, excluded_per_case=excluded, fp_rates=[0.05, 0.125, 0.3, 1, 3, 8, 50])
    curve = r["curve"]
    assert np.all(np.diff(curve["thresholds"]) < 0)
    assert np.all(np.diff(curve["fps_per_scan"]) >= 0) and np.all(np.diff(curve["sensitivity"]) >= 0)
    assert np.all(np.diff(list(r["sensitivities"].values())) >= 0)
    assert 0 <= r["cpm"] <= 1
    assert curve["fps_per_scan"][-1] == r["num_fp"] / r["num_scans"]
    assert curve["sensitivity"][-1] == r["num_tp"] / r["num_nodules"]
    assert r["sensitivities"]["50"] == r["num_tp"] / r["num_nodules"]  # past the curve's end


def test_sensitivity_at_reads_the_curve_like_np_interp_from_the_origin():
    fps, sens = [0.5, 1.0, 1.0, 1.0, 3.0], [0.2, 0.4, 0.5, 0.6, 0.8]
    assert sensitivity_at(fps, sens, [0.25, 0.5, 1.0, 2.0, 100.0]) == pytest.approx([0.1, 0.2, 0.6, 0.7, 0.8])
    assert sensitivity_at([], [], [0.125, 8]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="non-decreasing"):
        sensitivity_at([1.0, 0.5], [0.1, 0.2], [1])
    with pytest.raises(ValueError, match="points"):
        sensitivity_at([1.0], [0.1, 0.2], [1])
    assert [rate_key(r) for r in LUNA16_FP_RATES] == KEYS


def test_bootstrap_matches_explicit_resampling_and_is_reproducible():
    findings, nodules, excluded = _random_problem(7, n_scans=12)
    cases = sorted(set(findings) | set(nodules))
    r = froc(findings, nodules, cases, excluded, bootstrap=60, seed=5)
    assert r == froc(findings, nodules, cases, excluded, bootstrap=60, seed=5)
    boot = r["bootstrap"]
    # the same resamples, built as new case lists (copies of a scan renamed) and evaluated from scratch
    rng = np.random.default_rng(5)
    cpms, sens = [], []
    for _ in range(60):
        pick = [cases[i] for i in rng.integers(0, len(cases), len(cases))]
        names = [f"{c}#{j}" for j, c in enumerate(pick)]
        if not any(nodules.get(c) for c in pick):
            continue
        one = froc(
            {n: findings.get(c, []) for n, c in zip(names, pick, strict=True)},
            {n: nodules.get(c, []) for n, c in zip(names, pick, strict=True)},
            names,
            {n: excluded.get(c, []) for n, c in zip(names, pick, strict=True)},
        )
        cpms.append(one["cpm"])
        sens.append(list(one["sensitivities"].values()))
    assert boot["used"] == len(cpms) and boot["resamples"] == 60 and boot["confidence"] == 0.95
    assert boot["cpm"] == pytest.approx(list(np.quantile(cpms, [0.025, 0.975])), abs=1e-12)
    lo, hi = np.quantile(np.asarray(sens), [0.025, 0.975], axis=0)
    assert [v[0] for v in boot["sensitivities"].values()] == pytest.approx(list(lo), abs=1e-12)
    assert [v[1] for v in boot["sensitivities"].values()] == pytest.approx(list(hi), abs=1e-12)
    assert boot["cpm"][0] <= r["cpm"] <= boot["cpm"][1]
    json.dumps(r, allow_nan=False)


def test_bootstrap_of_a_perfect_detector_is_degenerate():
    nodules = {"a": [((0, 0, 0), 8.0)], "b": [((5, 5, 5), 6.0)], "c": []}
    hits = {"a": [((0, 0, 0), 0.9)], "b": [((5, 5, 5), 0.8)], "c": [((90, 0, 0), 0.1)]}
    boot = froc(hits, nodules, bootstrap=50)["bootstrap"]
    assert boot["cpm"] == [1.0, 1.0]
    assert boot["used"] <= 50  # resamples of scan "c" alone have no nodule and are skipped


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"findings_per_case": {}, "annotations_per_case": {}}, "no scans"),
        ({"cases": []}, "no scans"),
        ({"cases": ["A", "A"]}, "more than once"),
        ({"annotations_per_case": {"A": []}, "cases": ["A"]}, "no nodules"),
        ({"annotations_per_case": {"A": [((0, 0, 0), -3.0)]}}, "diameter_mm -3; it must be > 0"),
        ({"annotations_per_case": {"A": [((0, 0, 0), 0.0)]}}, "must be > 0"),
        ({"annotations_per_case": {"A": [((0, 0, 0), math.nan)]}}, "diameter_mm must be finite"),
        ({"findings_per_case": {"A": [((0, 0, 0), math.inf)]}}, "probability must be finite"),
        ({"findings_per_case": {"A": [((0, 0), 0.5)]}}, "3 finite numbers"),
        ({"findings_per_case": {"A": [((0, math.nan, 0), 0.5)]}}, "3 finite numbers"),
        ({"findings_per_case": {"A": [0.5]}}, r"must be \(\(x, y, z\), probability\)"),
        ({"excluded_per_case": {"A": [((0, 0, 0), math.nan)]}}, "excluded annotation 0"),
        ({"fp_rates": []}, "fp_rates"),
        ({"fp_rates": [0, 1]}, "fp_rates"),
        ({"fp_rates": [1, 1.0]}, "duplicates"),
        ({"bootstrap": -1}, "bootstrap"),
        ({"bootstrap": 10, "confidence": 1.0}, "confidence"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = {"findings_per_case": {"A": [((0, 0, 0), 0.5)]}, "annotations_per_case": {"A": [((0, 0, 0), 5.0)]}}
    with pytest.raises(ValueError, match=match):
        froc(**(args | kwargs))
