"""Side-by-side comparison of runs: per-run AUC intervals, paired differences, case-grouped resampling, the
refusal of runs that scored different samples, the written files and the ``volcnn compare`` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from volcnn.cli import build_parser, main
from volcnn.core.errors import VolcnnError
from volcnn.evaluation import roc_auc_ci
from volcnn.evaluation.compare import (
    PredictionsError,
    _resamples,
    compare_runs,
    paired_auc_resamples,
    plot_roc_comparison,
    read_predictions,
    write_comparison,
)
from volcnn.evaluation.plots import DPI
from volcnn.evaluation.predictions import write_predictions_csv

COLUMNS = ["index", "case", "image", "center_x", "center_y", "center_z", "label", "prob", "predicted", "correct"]


def _samples(n_cases: int = 60, per_case: int = 4, seed: int = 0) -> list[dict]:
    """``n_cases * per_case`` candidate rows as the evaluation writes them (prob, predicted, correct to come)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        for k in range(per_case):
            rows.append(
                {
                    "index": len(rows),
                    "case": f"case_{c:03d}",
                    "image": f"images/case_{c:03d}.nii.gz",
                    "center_x": float(rng.normal(0, 50)),
                    "center_y": float(rng.normal(0, 50)),
                    "center_z": float(k * 10.0 + 0.25),
                    "label": int(rng.random() < 0.4),
                }
            )
    return rows


def _labels(samples: list[dict]) -> np.ndarray:
    return np.array([s["label"] for s in samples], dtype=np.int64)


def _probs(samples: list[dict], signal: float, seed: int, base: np.ndarray | None = None, jitter: float = 1.0):
    """P(class 1) for every sample: logistic of ``signal * label + noise`` (noise ``jitter`` around ``base``)."""
    rng = np.random.default_rng(seed)
    y = _labels(samples)
    noise = rng.normal(0, jitter, len(y)) + (0 if base is None else base)
    return noise + signal * y


def _write(path: Path, samples: list[dict], logits: np.ndarray, columns: list[str] = COLUMNS) -> Path:
    prob = 1 / (1 + np.exp(-np.asarray(logits)))
    rows = []
    for s, p in zip(samples, prob, strict=True):
        pred = int(p >= 0.5)
        rows.append({**s, "prob": float(p), "predicted": pred, "correct": int(pred == s["label"])})
    return write_predictions_csv(path, rows, [c for c in columns if c in COLUMNS])


@pytest.fixture
def three_runs(tmp_path):
    """image (moderate), clinical (weak) and fusion (strong) on 240 candidates of 60 cases."""
    samples = _samples()
    base = np.random.default_rng(9).normal(0, 1.0, len(samples))  # shared noise: the runs are correlated
    return {
        "image": _write(tmp_path / "image.csv", samples, _probs(samples, 1.2, 1, base, 0.6)),
        "clinical": _write(tmp_path / "clinical.csv", samples, _probs(samples, 0.5, 2, base, 0.6)),
        "fusion": _write(tmp_path / "fusion.csv", samples, _probs(samples, 3.0, 3, base, 0.6)),
    }


def test_clearly_better_run_has_a_difference_interval_above_zero(three_runs):
    result = compare_runs(three_runs, n_boot=600, seed=0, reference="image")
    by_name = {r["name"]: r for r in result["runs"]}
    assert [r["name"] for r in result["runs"]] == ["image", "clinical", "fusion"]
    for r in result["runs"]:
        lo, hi = r["auc_ci"]
        assert lo < r["auc"] < hi
    assert by_name["fusion"]["auc"] > by_name["image"]["auc"] > by_name["clinical"]["auc"]
    diffs = {d["run"]: d for d in result["differences"]}
    assert set(diffs) == {"clinical", "fusion"} and all(d["baseline"] == "image" for d in diffs.values())
    fusion = diffs["fusion"]
    assert fusion["diff"] == pytest.approx(by_name["fusion"]["auc"] - by_name["image"]["auc"])
    assert 0 < fusion["ci"][0] < fusion["diff"] < fusion["ci"][1]
    assert fusion["share_le_zero"] < 0.01 and fusion["p_two_sided"] < 0.02
    clinical = diffs["clinical"]
    assert clinical["ci"][1] < 0 and clinical["share_le_zero"] > 0.99
    assert result["bootstrap"]["unit"] == "case" and result["bootstrap"]["num_groups"] == 60

    every_pair = compare_runs(three_runs, n_boot=200, seed=0)
    assert [d["label"] for d in every_pair["differences"]] == [
        "clinical \u2212 image",
        "fusion \u2212 image",
        "fusion \u2212 clinical",
    ]


def test_identical_runs_differ_by_exactly_zero(tmp_path):
    samples = _samples(30, 3)
    logits = _probs(samples, 1.0, 4)
    runs = {"a": _write(tmp_path / "a.csv", samples, logits), "b": _write(tmp_path / "b.csv", samples, logits)}
    result = compare_runs(runs, n_boot=300, seed=5)
    (d,) = result["differences"]
    assert d["diff"] == 0.0 and d["ci"] == [0.0, 0.0]
    assert d["ci"][0] <= 0 <= d["ci"][1]
    assert d["share_le_zero"] == 1.0 and d["p_two_sided"] == 1.0
    assert result["runs"][0]["auc_ci"] == result["runs"][1]["auc_ci"]


def test_runs_of_different_samples_are_refused_naming_both_files(tmp_path):
    samples = _samples(20, 3)
    logits = _probs(samples, 1.0, 4)
    a = _write(tmp_path / "a.csv", samples, logits)

    moved = [dict(s) for s in samples]
    moved[7]["image"] = "images/other.nii.gz"
    b = _write(tmp_path / "b.csv", moved, logits)
    with pytest.raises(PredictionsError) as e:
        compare_runs({"a": a, "b": b}, n_boot=50)
    msg = str(e.value)
    assert str(a) in msg and str(b) in msg and "row 7 " in msg and "'image'" in msg and "other.nii.gz" in msg
    assert isinstance(e.value, VolcnnError) and isinstance(e.value, ValueError)

    relabelled = [dict(s) for s in samples]
    relabelled[3]["label"] = 1 - relabelled[3]["label"]
    c = _write(tmp_path / "c.csv", relabelled, logits)
    with pytest.raises(PredictionsError, match=r"row 3 \(line 5 and line 5\), column 'label'"):
        compare_runs({"a": a, "c": c}, n_boot=50)

    shifted = [dict(s) for s in samples]
    shifted[10]["center_z"] += 1.0  # another candidate of the same scan
    with pytest.raises(PredictionsError, match="'center_z'"):
        compare_runs({"a": a, "s": _write(tmp_path / "s.csv", shifted, logits)}, n_boot=50)
    shifted[10]["center_z"] -= 1.0 - 1e-9  # float noise in a centre is the same candidate
    compare_runs({"a": a, "s": _write(tmp_path / "s.csv", shifted, logits)}, n_boot=50)

    short = _write(tmp_path / "short.csv", samples[:-1], logits[:-1])
    with pytest.raises(PredictionsError, match="60 rows against 59") as e:
        compare_runs({"a": a, "short": short}, n_boot=50)
    assert str(short) in str(e.value)
    no_centre = _write(tmp_path / "nc.csv", samples, logits, [c for c in COLUMNS if not c.startswith("center")])
    with pytest.raises(PredictionsError, match="in one file only"):
        compare_runs({"a": a, "nc": no_centre}, n_boot=50)


def test_pairing_gives_a_narrower_difference_interval_than_independent_bootstraps(tmp_path):
    """Two strongly correlated runs: the paired interval of the difference is far narrower than the spread of the
    difference of two independent bootstraps (it would not be if each run were resampled on its own)."""
    samples = _samples(150, 1)
    y = _labels(samples)
    a_logits = _probs(samples, 1.0, 11)
    b_logits = a_logits + np.random.default_rng(12).normal(0, 0.25, len(y))
    runs = {"a": _write(tmp_path / "a.csv", samples, a_logits), "b": _write(tmp_path / "b.csv", samples, b_logits)}
    result = compare_runs(runs, n_boot=1000, seed=0)
    lo, hi = result["differences"][0]["ci"]

    pa, pb = (read_predictions(p).probs for p in runs.values())
    alone_a = paired_auc_resamples(pa[None], y, n_boot=1000, seed=1)[0]
    alone_b = paired_auc_resamples(pb[None], y, n_boot=1000, seed=2)[0]
    q = torch.quantile(alone_b - alone_a, torch.tensor([0.025, 0.975], dtype=torch.float64))
    unpaired_width = float(q[1] - q[0])
    assert hi - lo < 0.4 * unpaired_width, (hi - lo, unpaired_width)
    assert lo <= result["differences"][0]["diff"] <= hi

    together = paired_auc_resamples(torch.stack([pa, pb]), y, n_boot=1000, seed=0)
    assert torch.equal(together[0], paired_auc_resamples(pa[None], y, n_boot=1000, seed=0)[0])  # same replicates


def test_row_resampling_gives_roc_auc_ci_of_each_run(three_runs):
    result = compare_runs(three_runs, n_boot=400, seed=3, group_by=None)
    assert result["bootstrap"]["unit"] == "row" and result["bootstrap"]["stratified_by"] == "label"
    for run in result["runs"]:
        pred = read_predictions(run["predictions"])
        assert tuple(run["auc_ci"]) == roc_auc_ci(pred.probs, pred.labels, n_boot=400, seed=3)


def test_case_resampling_draws_whole_cases_stratified_by_positive_cases():
    sizes = [1, 3, 2, 5, 1, 4, 2, 2]
    groups = torch.tensor([g for g, k in enumerate(sizes) for _ in range(k)])
    groups = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))]  # rows interleaved
    labels = torch.zeros(len(groups), dtype=torch.int64)
    labels[(groups == 1).nonzero()[0]] = 1
    labels[(groups == 3).nonzero()[:2].flatten()] = 1
    labels[groups == 6] = 1
    positive_cases = torch.tensor([1, 3, 6])
    size = torch.tensor(sizes)
    replicates = [r for chunk in _resamples(labels, groups, 200, torch.Generator().manual_seed(1)) for r in chunk]
    assert len(replicates) == 200
    lengths = set()
    for rows in replicates:
        counts = torch.bincount(rows.flatten(), minlength=len(groups))
        drawn = torch.zeros(len(sizes), dtype=torch.int64)
        for g in range(len(sizes)):
            in_g = counts[groups == g]
            assert (in_g == in_g[0]).all(), "a drawn case brings all of its rows, each once per draw"
            drawn[g] = in_g[0]
        assert int(drawn.sum()) == len(sizes)  # as many cases as there are
        assert int(drawn[positive_cases].sum()) == 3  # as many positive-holding cases as there are
        assert rows.numel() == int((drawn * size).sum())
        lengths.add(rows.numel())
    assert len(lengths) > 5  # replicates differ in their number of rows


def test_case_grouping_widens_intervals_of_correlated_rows(tmp_path):
    """Every case repeated as 6 identical candidates: a row bootstrap believes there are 6 times as many samples
    and gives an interval about sqrt(6) times too narrow; resampling cases does not."""
    cases = _samples(50, 1, seed=2)
    y_case = _labels(cases)
    logits_case = _probs(cases, 1.0, 21)
    samples, logits = [], []
    for s, lg in zip(cases, logits_case, strict=True):
        for k in range(6):
            samples.append({**s, "index": len(samples), "center_z": float(k)})
            logits.append(lg)
    other = np.asarray(logits) + np.random.default_rng(3).normal(0, 0.5, len(logits))
    runs = {
        "a": _write(tmp_path / "a.csv", samples, np.asarray(logits)),
        "b": _write(tmp_path / "b.csv", samples, other),
    }
    by_case = compare_runs(runs, n_boot=500, seed=0)
    by_row = compare_runs(runs, n_boot=500, seed=0, group_by=None)
    assert by_case["bootstrap"]["unit"] == "case" and by_case["bootstrap"]["num_groups"] == 50
    assert "50 cases" in by_case["bootstrap"]["description"]
    assert by_row["bootstrap"]["unit"] == "row" and by_row["bootstrap"]["num_groups"] is None
    width = {k: r["runs"][0]["auc_ci"][1] - r["runs"][0]["auc_ci"][0] for k, r in (("case", by_case), ("row", by_row))}
    assert width["case"] > 1.8 * width["row"], width
    assert by_case["runs"][0]["auc"] == by_row["runs"][0]["auc"]
    assert 0 < y_case.sum() < len(y_case)


def test_one_row_per_case_is_the_row_bootstrap_and_no_case_column_falls_back_to_rows(tmp_path):
    samples = _samples(80, 1, seed=4)
    a_logits, b_logits = _probs(samples, 1.0, 5), _probs(samples, 1.5, 6)
    runs = {"a": _write(tmp_path / "a.csv", samples, a_logits), "b": _write(tmp_path / "b.csv", samples, b_logits)}
    grouped = compare_runs(runs, n_boot=300, seed=1)
    rows = compare_runs(runs, n_boot=300, seed=1, group_by=None)
    assert grouped["bootstrap"]["unit"] == "case" and rows["bootstrap"]["unit"] == "row"
    assert grouped["runs"][0]["auc_ci"] == rows["runs"][0]["auc_ci"]
    assert grouped["differences"][0]["ci"] == rows["differences"][0]["ci"]

    no_case = [c for c in COLUMNS if c != "case"]
    runs = {k: _write(tmp_path / f"{k}_nc.csv", samples, lg, no_case) for k, lg in (("a", a_logits), ("b", b_logits))}
    result = compare_runs(runs, n_boot=300, seed=1)
    assert result["bootstrap"]["unit"] == "row" and result["bootstrap"]["group_column"] is None
    assert "no 'case' column" in result["bootstrap"]["description"]
    assert result["differences"][0]["ci"] == rows["differences"][0]["ci"]


def test_write_comparison_files(tmp_path, three_runs):
    out = tmp_path / "cmp"
    result = write_comparison(out, three_runs, n_boot=300, seed=0, reference="image")
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.html",
        "comparison.json",
        "comparison.md",
        "roc_comparison.png",
    ]
    stored = json.loads((out / "comparison.json").read_text())
    assert stored == json.loads(json.dumps(result)) and stored["files"]["roc"] == "roc_comparison.png"
    png = out / "roc_comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert abs(image.shape[1] - 5 * DPI) <= 2 and image.std() > 0.01
    md = (out / "comparison.md").read_text()
    fusion = next(r for r in result["runs"] if r["name"] == "fusion")
    assert f"| fusion | {fusion['auc']:.3f} | [{fusion['auc_ci'][0]:.3f}, {fusion['auc_ci'][1]:.3f}] |" in md
    assert "| fusion \u2212 image | +" in md and "![ROC curves](roc_comparison.png)" in md
    assert "300 paired bootstrap replicates of the 60 cases" in md
    html = (out / "comparison.html").read_text()
    assert "data:image/png;base64," in html and "fusion \u2212 image" in html
    assert not list(out.glob(".*"))  # no temporary files left


def test_plot_from_runs_and_other_levels(tmp_path, three_runs):
    path = plot_roc_comparison(three_runs, tmp_path / "a" / "roc.png")
    assert path == tmp_path / "a" / "roc.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = compare_runs(three_runs, n_boot=100, level=0.9)
    assert plot_roc_comparison(result, tmp_path / "roc90.png", title="ROC $x$").is_file()


def test_read_predictions_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(PredictionsError, match="nowhere.csv: cannot read CSV"):
        read_predictions(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("index,image,label,score\n0,a,1,0.5\n")
    with pytest.raises(PredictionsError, match=r"bad.csv: missing column\(s\) \['prob'\]"):
        read_predictions(bad)
    bad.write_text("index,image,label,prob_0,prob_1,prob_2\n0,a,1,0.2,0.5,0.3\n")
    with pytest.raises(PredictionsError, match="bad.csv: multi-class"):
        read_predictions(bad)
    bad.write_text("index,image,label,prob\n0,a,1,0.5\n1,b,0,high\n2,c,2,0.1\n3,d,0,nan\n")
    with pytest.raises(PredictionsError) as e:
        read_predictions(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: 3 bad row(s)") and "line 3: prob 'high'" in msg and "line 4: label 2" in msg
    assert "line 5" in msg
    bad.write_text("index,image,label,prob\n")
    with pytest.raises(PredictionsError, match="bad.csv: no rows"):
        read_predictions(bad)
    good = tmp_path / "good.csv"
    good.write_text("index,image,label,prob\n0,a,1,0.75\n1,b,0,0.25\n")
    pred = read_predictions(good)
    assert len(pred) == 2 and pred.labels.tolist() == [1, 0] and pred.probs.dtype == torch.float64
    assert pred.lines == (2, 3) and pred.rows[1]["image"] == "b"


def test_one_class_and_bad_arguments(tmp_path):
    samples = _samples(10, 2)
    for s in samples:
        s["label"] = 0
    logits = _probs(samples, 0.0, 1)
    runs = {"a": _write(tmp_path / "a.csv", samples, logits), "b": _write(tmp_path / "b.csv", samples, logits)}
    with pytest.raises(PredictionsError, match="a.csv: ROC AUC needs both classes"):
        compare_runs(runs, n_boot=50)
    with pytest.raises(ValueError, match="at least two runs"):
        compare_runs({"a": runs["a"]})
    with pytest.raises(ValueError, match="reference 'c'"):
        compare_runs(runs, reference="c")
    with pytest.raises(ValueError, match="n_boot"):
        compare_runs(runs, n_boot=0)


def test_cli_compares_and_writes(tmp_path, three_runs, capsys):
    argv = ["compare", *(f"{k}={v}" for k, v in three_runs.items()), "--out", str(tmp_path / "o")]
    assert main([*argv, "--n-boot", "200", "--seed", "3", "--reference", "image"]) == 0
    out = capsys.readouterr().out
    assert "fusion \u2212 image" in out and "200 paired bootstrap replicates of the 60 cases" in out
    stored = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert stored["bootstrap"]["seed"] == 3 and stored["reference"] == "image"
    assert main([*argv, "--n-boot", "100", "--no-group"]) == 0
    stored = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert stored["bootstrap"]["unit"] == "row" and len(stored["differences"]) == 3


def test_cli_exit_codes(tmp_path, three_runs, caplog):
    caplog.set_level(logging.ERROR)
    a, b = (f"{k}={v}" for k, v in list(three_runs.items())[:2])
    out = ["--out", str(tmp_path / "o")]
    missing = str(tmp_path / "nowhere.csv")
    assert main(["compare", a, *out]) == 2  # one run
    assert main(["compare", a, str(three_runs["fusion"]), *out]) == 2  # no NAME=
    assert main(["compare", a, f"x={missing}", *out]) == 2
    assert missing in caplog.text
    assert main(["compare", a, a, *out]) == 2  # a name twice
    assert main(["compare", a, b, *out, "--reference", "fusion"]) == 2
    assert main(["compare", a, b, *out, "--n-boot", "0"]) == 2
    assert main(["compare", a, b, *out, "--level", "1.5"]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", a, b, "--out", str(blocker / "sub"), "--n-boot", "50"]) == 2
    for argv in (["compare", a, b, *out, "--n-bo", "5"], ["compare", a, b, *out, "--no-group", "--group-by", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2

    caplog.clear()
    samples = _samples()
    other = _write(tmp_path / "other.csv", samples[::-1], _probs(samples, 1.0, 0))
    assert main(["compare", a, f"other={other}", *out, "--n-boot", "50"]) == 1
    assert str(three_runs["image"]) in caplog.text and str(other) in caplog.text and "row 0" in caplog.text
    broken = tmp_path / "broken.csv"
    broken.write_text("index,label,prob\n0,1,x\n")
    assert main(["compare", a, f"broken={broken}", *out]) == 1
    assert "broken.csv: 1 bad row(s)" in caplog.text
    assert not (tmp_path / "o").exists()  # nothing written by the failed runs


def test_compare_is_a_listed_command():
    assert "compare" in build_parser().format_help()
