"""A fusion run packaged into a bundle: the features declared in its configs and metadata, the normaliser's training
statistics in ``model.pt``, the offline check, and ``volcnn infer --features`` on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from volcnn.cli import main
from volcnn.commands.infer import infer
from volcnn.core.errors import UsageError
from volcnn.data import synthesize_cohort

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
TINY = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "amp": False, "max_epochs": 2, "progress": False, "learning_rate": 0.003}  # fmt: skip
DECL = {"age": {"type": "numeric", "unit": "years"}, "smoker": {"type": "binary"}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg_mm_cohort")
    synthesize_cohort(out, cases=6, seed=5, size="tiny", negatives=4)
    data = json.loads((out / "datalist.json").read_text())
    rng = np.random.default_rng(0)
    data = {"features": DECL, **data}
    for section in ("training", "validation", "test"):
        for e in data[section]:
            e["features"] = {"age": float(50 + 20 * e["label"] + rng.integers(0, 5)), "smoker": bool(e["label"])}
    (out / "datalist_mm.json").write_text(json.dumps(data))
    return out


def _train(cohort: Path, out: Path, modality: str) -> Path:
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "multimodal.json")], workflow_type=None,
        run_id="training", bundle_root=str(CONFIGS.parent), dataset_dir=str(cohort),
        datalist=str(cohort / "datalist_mm.json"), output_dir=str(out), modality=modality, **TINY,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    return out


@pytest.fixture(scope="module")
def fusion_bundle(cohort, tmp_path_factory) -> Path:
    run = _train(cohort, tmp_path_factory.mktemp("pkg_mm_run"), "fusion")
    out = tmp_path_factory.mktemp("pkg_mm_out") / "bundle"
    assert main(["package", str(run), "--out", str(out)]) == 0
    return out


def test_packaged_fusion_bundle_declares_its_features(fusion_bundle):
    inference = json.loads((fusion_bundle / "configs" / "inference.json").read_text())
    assert inference["modality"] == "fusion"
    assert [d["name"] for d in inference["features"]] == list(DECL)  # declaration order kept (a list, not an object)
    meta = json.loads((fusion_bundle / "configs" / "metadata.json").read_text())
    assert meta["modality"] == "fusion"
    assert [d["name"] for d in meta["clinical_features"]["declaration"]] == list(DECL)
    assert "(B, 2)" in meta["clinical_features"]["input"]
    state = torch.load(fusion_bundle / "models" / "model.pt", weights_only=True)
    assert float(state["tabular.normalize.mean"][0]) > 45  # the training ages' mean travels with the weights


def test_infer_with_and_without_a_features_csv(fusion_bundle, cohort, tmp_path, caplog):
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    case = image.name.split(".")[0]
    old, young = tmp_path / "old.csv", tmp_path / "young.csv"
    old.write_text(f"case,age,smoker\n{case},80,1\n")
    young.write_text(f"case,age,smoker\n{case},30,0\n")
    common = ["--bundle", str(fusion_bundle), "--device", "cpu", "--stride-mm", "8"]
    assert main(["infer", *common, "--out", str(tmp_path / "old"), "--features", str(old), str(image)]) == 0
    assert main(["infer", *common, "--out", str(tmp_path / "young"), "--features", str(young), str(image)]) == 0
    assert main(["infer", *common, "--out", str(tmp_path / "none"), str(image)]) == 0
    assert "no --features CSV was given" in caplog.text
    docs = {k: json.loads((tmp_path / k / case / "findings.json").read_text()) for k in ("old", "young", "none")}
    assert docs["old"]["features"]["provided"] == ["age", "smoker"] and docs["old"]["features"]["missing"] == []
    assert (
        docs["none"]["features"]["missing"] == ["age", "smoker"]
        and "no features given" in docs["none"]["features"]["note"]
    )
    assert "80" not in json.dumps(docs["old"]["features"])  # names and a hash, not the values
    assert docs["old"]["max_probability"] != docs["young"]["max_probability"]  # the features reach the network


def test_features_csv_for_an_image_bundle_is_a_usage_error(cohort, tmp_path):
    run = _train(cohort, tmp_path / "run", "image")
    assert main(["package", str(run), "--out", str(tmp_path / "bundle")]) == 0
    csv = tmp_path / "f.csv"
    csv.write_text("case,age\ncase_000,60\n")
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    args = ["infer", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "o"), "--features", str(csv)]
    assert main([*args, str(image)]) == 2
    with pytest.raises(UsageError, match="takes no clinical features"):
        infer(str(tmp_path / "bundle"), str(tmp_path / "o"), [str(image)], features=str(csv), device="cpu")
