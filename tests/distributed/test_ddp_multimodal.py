"""DDP training of a fusion model (two gloo processes under torchrun, ``multimodal.json`` + ``multi_gpu_train.json``):
features reach every rank's network, the statistics come from the whole training split (not one rank's shard), and
the gathered validation AUC describes the weights rank 0 saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed.torchrun_output import failure_report
from volcnn.data import synthesize_cohort
from volcnn.io.features import attach_features, feature_matrix, fit_feature_stats, load_section

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
SMALL = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "amp": False,
         "progress": False, "device": "cpu", "modality": "fusion", "feature_dropout": 0.2}  # fmt: skip
DECL = {"age": {"type": "numeric"}, "smoker": {"type": "binary"}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(out, cases=6, seed=3, size="tiny", negatives=6)
    data = json.loads((out / "datalist.json").read_text())
    rng = np.random.default_rng(1)
    data["features"] = DECL
    for section in ("training", "validation", "test"):
        for e in data[section]:
            e["features"] = {
                "age": float(50 + 15 * e["label"] + rng.integers(0, 8)),
                "smoker": bool(rng.random() < 0.5),
            }
    (out / "datalist_mm.json").write_text(json.dumps(data))
    return out


def test_fusion_trains_under_ddp_with_whole_split_statistics(cohort, tmp_path):
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multimodal.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    args = ["--dataset_dir", str(cohort), "--datalist", str(cohort / "datalist_mm.json"), "--output_dir", str(tmp_path)]
    for key, value in {**SMALL, "max_epochs": 2}.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--tee=3", "-m",
         "monai.bundle", "run", "training", "--config_file", configs, *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, failure_report(done)
    best = json.loads((tmp_path / "models" / "best.json").read_text())
    state = torch.load(tmp_path / "models" / best["file"], map_location="cpu", weights_only=True)
    train = attach_features(json.loads((cohort / "datalist_mm.json").read_text())["training"], DECL)
    expected = fit_feature_stats(DECL, feature_matrix(train))
    assert torch.allclose(state["tabular.normalize.mean"], torch.tensor(expected["mean"]))

    # the gathered validation AUC equals one process scoring the saved weights with the features
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multimodal.json")])
    parser.update({"dataset_dir": str(cohort), "datalist": str(cohort / "datalist_mm.json"), **SMALL})
    parser.parse()
    network = parser.get_parsed_content("network")
    network.load_state_dict(state)
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert best["value"] == pytest.approx(float(evaluator.state.metrics["val_auc"]), abs=1e-9)
    assert len(load_section(cohort / "datalist_mm.json", "validation", cohort, DECL)) > 2
