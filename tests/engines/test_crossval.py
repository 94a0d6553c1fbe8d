"""``volcnn crossval`` end to end on a tiny cohort: k folds trained and evaluated through the bundle, out-of-fold
predictions of every pooled entry once, metrics recomputable from them, resume after a failed fold, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import volcnn.engines.crossval as crossval
from volcnn.cli import main
from volcnn.data import synthesize_cohort
from volcnn.evaluation.classification import roc_auc

REPO = Path(__file__).resolve().parents[2]
CHEAP = ["--network_def", "seed_cnn3d", "--patch_size", "[16,16,16]", "--pixdim", "[2.0,2.0,2.0]", "--margin", "2",
         "--batch_size", "4", "--num_workers", "0", "--amp", "False", "--max_epochs", "1", "--progress", "False",
         "--learning_rate", "0.003", "--n_boot", "20"]  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv_cohort")
    synthesize_cohort(out, cases=8, seed=5, size="tiny", negatives=5)
    return out


def _argv(cohort: Path, out: Path, k: int = 3) -> list[str]:
    return ["crossval", "--datalist", str(cohort / "datalist.json"), "--k", str(k), "--out", str(out),
            "--device", "cpu", *CHEAP]  # fmt: skip


def test_crossval_pools_every_entry_once_and_resumes_after_a_failed_fold(cohort, tmp_path, monkeypatch):
    from monai.bundle import run as real_run

    out = tmp_path / "cv"
    calls: list[tuple[str, str]] = []
    kill = {"fold_1": True}

    def failing_run(run_id="run", **kwargs):
        fold = Path(kwargs["output_dir"]).name
        calls.append((fold, run_id))
        if run_id == "run" and kill.get(fold):
            raise RuntimeError("killed")
        return real_run(run_id, **kwargs)

    monkeypatch.setattr("monai.bundle.run", failing_run)
    assert main(_argv(cohort, out)) == 1  # fold 1's evaluation died: fold 0 is finished, nothing pooled yet
    assert (out / "fold_0" / "done.json").is_file() and not (out / "fold_1" / "done.json").exists()
    assert not (out / "cv_metrics.json").exists()
    calls.clear()
    kill.clear()
    assert main(_argv(cohort, out)) == 0
    assert [c[0] for c in calls] == ["fold_1", "fold_1", "fold_2", "fold_2"]  # fold 0 skipped

    data = json.loads((cohort / "datalist.json").read_text())
    pooled = data["training"] + data["validation"]
    folds = json.loads((out / "folds.json").read_text())
    with open(out / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pooled)  # every training/validation entry held out exactly once
    assert {r["image"] for r in rows} == {e["image"] for e in pooled}
    assert not {r["image"] for r in rows} & {e["image"] for e in data["test"]}  # the test patients never used
    fold_of_image = {e["image"]: e["fold"] for e in folds["entries"]}
    assert all(int(r["fold"]) == fold_of_image[r["image"]] for r in rows)
    metrics = json.loads((out / "cv_metrics.json").read_text())
    probs, labels = np.array([float(r["prob"]) for r in rows]), np.array([int(r["label"]) for r in rows])
    assert metrics["pooled_roc_auc"] == pytest.approx(float(roc_auc(probs, labels)))
    lo, hi = metrics["pooled_roc_auc_ci95"]
    assert lo <= metrics["pooled_roc_auc"] <= hi and len(metrics["folds"]) == 3
    assert (out / "roc.png").stat().st_size > 0 and "Pooled out-of-fold ROC AUC" in (out / "report.md").read_text()
    for fold in range(3):
        run = json.loads((out / f"fold_{fold}" / "run.json").read_text())
        assert run["network_def"] == "seed_cnn3d" and run["datalist"] == str(out / f"fold_{fold}" / "datalist.json")

    # the same folder with other folds is refused, naming what differs
    assert main(_argv(cohort, out, k=4)) == 2


def test_crossval_refuses_overrides_it_sets_itself(cohort, tmp_path):
    assert main([*_argv(cohort, tmp_path / "cv"), "--output_dir", str(tmp_path)]) == 2
    assert not (tmp_path / "cv").exists()


def test_args_file_settings_reach_every_fold(cohort, tmp_path, monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(crossval, "crossval_summary", lambda root, k, seed: {"pooled_roc_auc": None,
                        "pooled_roc_auc_ci95": None, "n": 0})  # fmt: skip
    monkeypatch.setattr("monai.bundle.run", lambda run_id="run", **kw: seen.append(kw) or _fake_fold(kw, run_id))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"hu_window": [-500, 500], "intensity": "percentile", "max_epochs": 7}))
    argv = [*_argv(cohort, tmp_path / "cv"), "--args-file", str(plan), "--max_epochs", "2"]
    assert main(argv) == 0
    assert len(seen) == 6 and all(s["intensity"] == "percentile" and s["hu_window"] == [-500, 500] for s in seen)
    assert all(s["max_epochs"] == 2 for s in seen)  # the command line wins over the args file
    assert all(s["dataset_dir"] == str(cohort) and s["seed"] == 0 for s in seen)


def _fake_fold(kwargs: dict, run_id: str) -> None:
    if run_id == "run":
        (Path(kwargs["output_dir"]) / "predictions.csv").write_text("image,label,prob\n")


def test_packaged_crossval_is_one_bundle_whose_probability_is_the_mean_of_its_folds(cohort, tmp_path):
    from tests.bundle.test_package import _window_probabilities
    from volcnn.models.exported import load_exported

    out = tmp_path / "cv"
    assert main(_argv(cohort, out)) == 0
    ensemble = tmp_path / "ensemble"
    assert main(["package", str(out), "--out", str(ensemble)]) == 0
    config = json.loads((ensemble / "configs" / "inference.json").read_text())
    assert config["ensemble"] == 3 and config["network_def"] == "seed_cnn3d"
    # calibrated on the pooled out-of-fold predictions, not on any fold's validation patients
    from volcnn.models.calibration import fit_platt, read_calibration

    with open(out / "oof_predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    want = fit_platt(np.asarray([float(r["prob"]) for r in oof]), np.asarray([int(r["label"]) for r in oof]))
    got_cal = read_calibration(ensemble / "models" / "calibration.json")
    assert got_cal is not None and got_cal.fitted_on == "out-of-fold" and got_cal.num_cases == len(oof)
    assert (got_cal.a, got_cal.b) == pytest.approx((want.a, want.b), abs=1e-9)
    folds_own = [read_calibration(out / f"fold_{i}" / "calibration.json") for i in range(3)]
    assert all(c is None or (c.a, c.b) != (got_cal.a, got_cal.b) for c in folds_own)
    singles = []
    for fold in range(3):
        assert main(["package", str(out / f"fold_{fold}"), "--out", str(tmp_path / f"single_{fold}")]) == 0
        singles.append(tmp_path / f"single_{fold}")

    with open(out / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:12]
    got, inside = _window_probabilities(ensemble, rows, cohort)
    members = np.stack([_window_probabilities(b, rows, cohort)[0] for b in singles])
    assert inside.any() and members.std(axis=0).max() > 1e-3  # the folds disagree: a mean is a real test
    np.testing.assert_allclose(got, members.mean(axis=0), atol=1e-5, rtol=0)

    # one graph: the exported TorchScript gives the eager ensemble's output
    import torch

    eager, _ = load_exported(ensemble / "models" / "model.pt", bundle_dir=ensemble)
    scripted, settings = load_exported(ensemble / "models" / "model.ts")
    x = torch.rand(3, 1, *settings["patch_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=0)

    scan = cohort / rows[0]["image"]
    assert main(["infer", "--bundle", str(ensemble), "--out", str(tmp_path / "inf"), "--device", "cpu", str(scan)]) == 0
    doc = json.loads((tmp_path / "inf" / scan.name.split(".")[0] / "findings.json").read_text())
    assert doc["model"]["version"] == json.loads((ensemble / "configs" / "metadata.json").read_text())["version"]
    assert doc["calibration"]["fitted_on"] == "out-of-fold"


def test_package_refuses_an_unfinished_crossval(cohort, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    monkeypatch.setattr("monai.bundle.run", lambda run_id="run", **kw: _fake_fold(kw, run_id))
    monkeypatch.setattr(crossval, "crossval_summary", lambda root, k, seed: {"pooled_roc_auc": None,
                        "pooled_roc_auc_ci95": None, "n": 0})  # fmt: skip
    assert main(_argv(cohort, out)) == 0
    (out / "fold_2" / "done.json").unlink()
    assert main(["package", str(out), "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b").exists()


def test_folds_run_in_separate_calls_are_pooled_by_the_last(cohort, tmp_path, monkeypatch, capsys):
    """One process per GPU: each runs its folds into the same folder; only the call that finishes the last pools."""
    ran: list[str] = []
    pooled: list[int] = []

    def fake_run(run_id="run", **kwargs):
        ran.append(Path(kwargs["output_dir"]).name)
        _fake_fold(kwargs, run_id)

    monkeypatch.setattr("monai.bundle.run", fake_run)
    monkeypatch.setattr(crossval, "crossval_summary", lambda root, k, seed: pooled.append(k) or {
                        "pooled_roc_auc": None, "pooled_roc_auc_ci95": None, "n": 0})  # fmt: skip
    out = tmp_path / "cv"
    assert main([*_argv(cohort, out), "--folds", "2"]) == 0
    assert ran == ["fold_2", "fold_2"] and not pooled and "[0, 1] are not finished" in capsys.readouterr().out
    assert main([*_argv(cohort, out), "--folds", "0,1"]) == 0
    assert ran[2:] == ["fold_0", "fold_0", "fold_1", "fold_1"] and pooled == [3]
    assert main([*_argv(cohort, out), "--folds", "3"]) == 2  # k = 3: folds 0..2
    assert main([*_argv(cohort, out), "--folds", "a"]) == 2


def test_the_evaluate_overlay_scores_a_packaged_ensemble(cohort, tmp_path):
    """``--ensemble k --ckpt_dir BUNDLE/models`` with the evaluate overlay gives the ensemble bundle's probabilities."""
    from monai.bundle import ConfigWorkflow

    from tests.bundle.test_package import _window_probabilities

    out = tmp_path / "cv"
    assert main(_argv(cohort, out)) == 0
    ensemble = tmp_path / "ensemble"
    assert main(["package", str(out), "--out", str(ensemble)]) == 0
    config = [
        str(ensemble / "configs" / "train.json"),
        str(REPO / "bundles/lung_nodule_ct_classification/configs/evaluate.json"),
    ]
    overrides = {"bundle_root": str(ensemble), "dataset_dir": str(cohort), "datalist": str(cohort / "datalist.json"),
                 "output_dir": str(tmp_path / "eval"), "ckpt_dir": str(ensemble / "models"), "ensemble": 3,
                 "device": "cpu", "amp": False, "num_workers": 0, "batch_size": 4, "n_boot": 20,
                 "progress": False}  # fmt: skip
    workflow = ConfigWorkflow(config_file=config, workflow_type=None, **overrides)
    workflow.initialize()
    workflow.run()
    with open(tmp_path / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = np.asarray([float(r["prob"]) for r in rows])
    got, inside = _window_probabilities(ensemble, rows, cohort)
    assert inside.sum() >= 4 and expected[inside].std() > 1e-3
    np.testing.assert_allclose(got[inside], expected[inside], atol=1e-5, rtol=0)


def _argv_devices(cohort: Path, out: Path) -> list[str]:
    """:func:`_argv` without ``--device``: ``--devices`` names them."""
    argv = _argv(cohort, out)
    i = argv.index("--device")
    return argv[:i] + argv[i + 2 :]


def test_devices_train_the_folds_in_parallel_workers_and_the_caller_pools(cohort, tmp_path):
    """``--devices cpu,cpu``: two worker processes, fold i on worker i mod 2, logs under O/logs; the caller pools
    every entry once; the folds ran at the same time (their training intervals overlap)."""
    out = tmp_path / "cv"
    assert main([*_argv_devices(cohort, out), "--devices", "cpu,cpu"]) == 0
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert sorted(logs) == ["worker_0_cpu.log", "worker_1_cpu.log"]
    assert "fold 0 of 3: training" in logs["worker_0_cpu.log"] and "fold 2 of 3: training" in logs["worker_0_cpu.log"]
    assert "fold 1 of 3: training" in logs["worker_1_cpu.log"] and "fold 0 of 3" not in logs["worker_1_cpu.log"]
    with open(out / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    data = json.loads((cohort / "datalist.json").read_text())
    assert sorted(r["image"] for r in rows) == sorted(e["image"] for e in data["training"] + data["validation"])
    assert json.loads((out / "cv_metrics.json").read_text())["n"] == len(rows)
    # a fold starts by writing its datalist and ends with done.json: folds 0 and 1 ran at the same time
    spans = {f: [(out / f"fold_{f}" / name).stat().st_mtime for name in ("datalist.json", "done.json")] for f in (0, 1)}
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA device 7")
def test_a_failed_worker_is_named_and_a_rerun_resumes_the_rest(cohort, tmp_path, caplog):
    out = tmp_path / "cv"
    assert main([*_argv_devices(cohort, out), "--devices", "cpu,cuda:7"]) == 1  # no CUDA here: the second worker fails
    assert "worker_1_cuda7.log" in caplog.text and "folds [1]" in caplog.text
    assert (out / "fold_0" / "done.json").is_file() and (out / "fold_2" / "done.json").is_file()
    assert not (out / "fold_1" / "done.json").exists() and not (out / "cv_metrics.json").exists()
    assert main([*_argv_devices(cohort, out), "--devices", "cpu"]) == 0
    assert (out / "cv_metrics.json").is_file()
    assert "fold 0 of 3: finished earlier, skipped" in (out / "logs" / "worker_0_cpu.log").read_text()


@pytest.mark.parametrize(
    "extra", [["--devices", "gpu0"], ["--devices", "cpu,cpu,cpu,cpu"], ["--devices", "cpu", "--device", "cpu"],
              ["--devices", "cpu", "--folds", "1"], ["--devices", ""], ["--devices", "cpu", "--k", "50"]],
)  # fmt: skip
def test_bad_devices_are_usage_errors(cohort, tmp_path, extra):
    assert main([*_argv_devices(cohort, tmp_path / "cv"), *extra]) == 2
    assert not (tmp_path / "cv" / "logs").exists()


def test_fold_assignment_round_robin():
    from volcnn.commands.crossval_workers import fold_assignment

    assert fold_assignment(5, ["cuda:0", "cuda:1"]) == [[0, 2, 4], [1, 3]]
    assert fold_assignment(3, ["cpu"]) == [[0, 1, 2]]
