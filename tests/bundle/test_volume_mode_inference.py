"""A bundle trained in volume mode (datalist entries without ``center``) is inferred the way it was evaluated: for the
same weights, ``volcnn infer``'s per-volume probabilities equal the ``evaluate.json`` overlay's ``predictions.csv``
(so the two ROC AUCs agree), with the bundle, an exported ``.onnx`` / ``.ts`` model, two classes and three.

The runs are tiny (24 synthetic CTs, ``seed_cnn3d`` at 16^3, 2 epochs on the CPU): only the agreement is tested, not
how good the model is.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from volcnn.bundle import configure_bundle, export_bundle, install_model
from volcnn.cli import main as volcnn_main
from volcnn.data import synthesize_cohort

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
CONFIGS = BUNDLE / "configs"
#: the training settings, given to training and evaluation on the command line and written into the bundle
SETTINGS: dict[str, Any] = {
    "network_def": "seed_cnn3d",
    "patch_size": [16, 16, 16],
    "margin": 2,
    "pixdim": [3.0, 3.0, 3.0],
    "hu_window": [-1000, 500],
}
#: what the issue asks of the AUC, and what the probabilities meet
AUC_TOLERANCE, PROB_TOLERANCE = 0.002, 1e-5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """24 tiny CTs and two volume-mode datalists (no ``center``), split by patient with every class in every split:
    ``datalist_large.json`` (has a nodule of 10 mm or more: K = 2) and ``datalist_count.json`` (0-1, 2, 3+ nodules:
    K = 3)."""
    out = tmp_path_factory.mktemp("volume_cohort")
    synthesize_cohort(out, cases=24, seed=3, size="tiny")
    with open(out / "nodules.csv", newline="") as f:
        nodules = list(csv.DictReader(f))
    per_case: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in nodules:
        per_case[row["case"]].append(row)
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (out / "images").glob("*.nii.gz"))
    large = {c: int(any(float(n["diameter_mm"]) >= 10 for n in per_case[c])) for c in cases}
    count = {c: min(max(len(per_case[c]) - 1, 0), 2) for c in cases}
    _write_datalist(out / "datalist_large.json", large, {"0": "no nodule >= 10 mm", "1": "nodule >= 10 mm"})
    _write_datalist(out / "datalist_count.json", count, {"0": "0-1 nodules", "1": "2 nodules", "2": "3+ nodules"})
    return out


def _write_datalist(path: Path, labels: dict[str, int], names: dict[str, str]) -> None:
    """Per class, half the cases to test, a quarter each to validation and training (one case = one patient)."""
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for k in sorted(set(labels.values())):
        members = [c for c in sorted(labels) if labels[c] == k]
        for i, case in enumerate(members):
            split = "test" if i % 2 == 0 else ("validation" if i % 4 == 1 else "training")
            splits[split].append({"image": f"images/{case}.nii.gz", "label": k, "patient": case})
    for split, entries in splits.items():
        assert {e["label"] for e in entries} == set(labels.values()), f"{path.name}: {split} lacks a class"
    path.write_text(json.dumps({"name": path.stem, "labels": names, **splits}, indent=1))


def _bundle_run(configs: list[Path], args: list[str], cwd: Path) -> None:
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _train_evaluate_infer(cohort: Path, datalist: str, num_classes: int, root: Path) -> dict[str, Any]:
    """Train 2 epochs and evaluate with the overlay (fp32: ``amp false``), package the best weights into a bundle in
    volume mode with the run's settings, run ``volcnn infer`` over the test images."""
    run = root / "run"
    settings = [a for k, v in SETTINGS.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]
    common = ["--dataset_dir", str(cohort), "--datalist", str(cohort / datalist), "--output_dir", str(run),
              "--device", "cpu", "--num_classes", str(num_classes), "--batch_size", "4", "--num_workers", "0",
              "--amp", "false", "--max_epochs", "2", "--learning_rate", "0.003", "--seed", "1", *settings]  # fmt: skip
    _bundle_run([CONFIGS / "train.json"], ["training", *common], root)
    _bundle_run([CONFIGS / "train.json", CONFIGS / "evaluate.json"], [*common, "--n_boot", "20"], root)
    bundle = configure_bundle(BUNDLE, root / "bundle", {**SETTINGS, "num_classes": num_classes, "mode": "volume"})
    install_model(bundle, run / "models" / "model.pt")
    test = json.loads((cohort / datalist).read_text())["test"]
    images = [str(cohort / e["image"]) for e in test]
    out = root / "infer"
    assert volcnn_main(["infer", "--bundle", str(bundle), "--out", str(out), "--device", "cpu", *images]) == 0
    with open(run / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    return {"run": run, "bundle": bundle, "out": out, "images": images, "test": test, "predictions": predictions}


def _case(image: str) -> str:
    return Path(image).name.removesuffix(".nii.gz")


def _inferred(out: Path, predictions: list[dict[str, str]]) -> np.ndarray:
    """``volcnn infer``'s probabilities ``(N, K)`` in the order of ``predictions.csv``."""
    docs = [json.loads((out / _case(row["image"]) / "findings.json").read_text()) for row in predictions]
    assert all(d["mode"] == "volume" and d["findings"] == [] for d in docs)
    return np.asarray([d["probabilities"] for d in docs], dtype=np.float64)


def _evaluated(predictions: list[dict[str, str]], num_classes: int) -> np.ndarray:
    """The evaluate overlay's probabilities ``(N, K)`` from ``predictions.csv`` (``prob`` is class 1 when K = 2)."""
    if num_classes == 2:
        p1 = np.asarray([float(r["prob"]) for r in predictions])
        return np.stack([1.0 - p1, p1], axis=1)
    return np.asarray([[float(r[f"prob_{k}"]) for k in range(num_classes)] for r in predictions])


@pytest.fixture(scope="module")
def binary(cohort, tmp_path_factory) -> dict[str, Any]:
    return _train_evaluate_infer(cohort, "datalist_large.json", 2, tmp_path_factory.mktemp("binary"))


def test_infer_scores_equal_the_evaluate_overlays(binary):
    preds = binary["predictions"]
    assert sorted(r["image"] for r in preds) == sorted(e["image"] for e in binary["test"])
    inferred, evaluated = _inferred(binary["out"], preds), _evaluated(preds, 2)
    assert float(np.ptp(evaluated[:, 1])) > 1e-3  # the volumes get different probabilities: the test means something
    diff = float(np.abs(inferred - evaluated).max())
    assert diff <= PROB_TOLERANCE, f"max |p_infer - p_evaluate| = {diff:.2e}"
    labels = [int(r["label"]) for r in preds]
    auc_evaluate = json.loads((binary["run"] / "metrics.json").read_text())["metrics"]["auc"]
    auc_infer = roc_auc_score(labels, inferred[:, 1])
    assert abs(auc_infer - auc_evaluate) <= AUC_TOLERANCE, (auc_infer, auc_evaluate)
    print(f"K=2: max |p_infer - p_evaluate| = {diff:.2e}; AUC infer {auc_infer:.6f}, evaluate {auc_evaluate:.6f}")
    with open(binary["out"] / "summary.csv", newline="") as f:
        summary = {r["case"]: r for r in csv.DictReader(f)}
    for row, p in zip(preds, inferred[:, 1], strict=True):
        assert summary[_case(row["image"])]["status"] == "ok" and float(summary[_case(row["image"])]["score"]) == p


def test_exported_model_gives_the_same_scores(binary, tmp_path):
    paths = export_bundle(binary["bundle"])
    evaluated = _evaluated(binary["predictions"], 2)
    for fmt, model in paths.items():
        out = tmp_path / fmt
        assert (
            volcnn_main(["infer", "--model", str(model), "--out", str(out), "--device", "cpu", *binary["images"]]) == 0
        )
        diff = float(np.abs(_inferred(out, binary["predictions"]) - evaluated).max())
        assert diff <= PROB_TOLERANCE, f"{fmt}: max |p_infer - p_evaluate| = {diff:.2e}"
        print(f"{fmt}: max |p_infer - p_evaluate| = {diff:.2e}")


def test_explanation_has_the_inputs_shape_and_affine(binary, tmp_path):
    image = binary["images"][0]
    out = tmp_path / "explain"
    argv = ["infer", "--bundle", str(binary["bundle"]), "--out", str(out), "--device", "cpu", "--explain", "1", image]
    assert volcnn_main(argv) == 0
    case = out / _case(image)
    (expl,) = json.loads((case / "findings.json").read_text())["explanations"]
    src, img = nib.load(image), nib.load(case / expl["nifti"])
    assert expl["nifti"] == "volume_gradcam.nii.gz" and img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
    assert (case / expl["png"]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # a second training run; tests/inference/test_volume_mode.py checks K = 3 against the chain itself
def test_three_classes(cohort, tmp_path_factory):
    three = _train_evaluate_infer(cohort, "datalist_count.json", 3, tmp_path_factory.mktemp("three"))
    inferred, evaluated = _inferred(three["out"], three["predictions"]), _evaluated(three["predictions"], 3)
    assert inferred.shape == (len(three["test"]), 3)
    diff = float(np.abs(inferred - evaluated).max())
    assert diff <= PROB_TOLERANCE, f"K=3: max |p_infer - p_evaluate| = {diff:.2e}"
    print(f"K=3: max |p_infer - p_evaluate| = {diff:.2e}")
