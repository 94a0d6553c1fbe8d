"""Permutation feature importance of a trained run through the bundle's own workflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engines.feature_cohort import DECL, feature_cohort
from volcnn.engines import feature_importance_from_workflow
from volcnn.networks import create_multimodal_network

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
FILES = [str(CONFIGS / "train.json"), str(CONFIGS / "multimodal.json")]
TINY = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "amp": False, "seed": 7, "progress": False, "cache": "none"}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A tiny cohort whose age separates the labels, and a "trained" clinical run whose model.pt reads age only:
    probability = sigmoid((age - 60) / 10)."""
    root = tmp_path_factory.mktemp("importance")
    data = json.loads((feature_cohort(root / "data") / "datalist_mm.json").read_text())
    stats = {"mean": [60.0, 0.5, 0.5, 0.5], "std": [10.0, 1.0, 1.0, 1.0]}
    net = create_multimodal_network("clinical", "seed_cnn3d", features=DECL, feature_stats=stats)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.tabular.mlp[0].weight[0, 0] = 1.0  # the standardised age, kept positive through the ReLUs
        net.tabular.mlp[0].bias[0] = 10.0
        net.tabular.mlp[3].weight[0, 0] = 1.0
        net.head.weight[1, 0] = 1.0
        net.head.bias[0] = 10.0
    (root / "out" / "models").mkdir(parents=True)
    torch.save(net.state_dict(), root / "out" / "models" / "model.pt")
    overrides = {
        **TINY, "modality": "clinical", "dataset_dir": str(root / "data"),
        "datalist": str(root / "data" / "datalist_mm.json"), "output_dir": str(root / "out"),
    }  # fmt: skip
    return {"root": root, "data": data, "overrides": overrides}


def test_importance_of_a_run_on_its_test_section(run):
    report = run["root"] / "report"
    result = feature_importance_from_workflow(FILES, run["overrides"], "test", n_repeats=4, seed=1, out_dir=report)
    test = run["data"]["test"]
    assert result["n_samples"] == len(test) and result["section"] == "test" and result["modality"] == "clinical"
    ages = np.array([e["features"]["age"] for e in test])
    labels = np.array([e["label"] for e in test])
    expected = np.mean([a > b for a in ages[labels == 1] for b in ages[labels == 0]])  # AUC of age, no ties here
    assert result["baseline"] == pytest.approx(expected)
    features = result["features"]
    assert features["age"]["mean"] > 0.1
    assert features["sex"]["mean"] == 0.0 and features["smoker"]["mean"] == 0.0  # the model does not read them
    assert json.loads((report / "feature_importance.json").read_text()) == json.loads(json.dumps(result))
    assert (report / "feature_importance.png").read_bytes()[:4] == b"\x89PNG"
    again = feature_importance_from_workflow(FILES, run["overrides"], "test", n_repeats=4, seed=1)
    assert again["features"] == features


def test_an_image_run_has_no_features_to_attribute(run):
    with pytest.raises(ValueError, match="no clinical features"):
        feature_importance_from_workflow(FILES, {**run["overrides"], "modality": "image"})
