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


def test_packaged_fusion_bundle_passes_every_offline_check(fusion_bundle):
    from volcnn.bundle import verify_bundle

    results = {r.name: r for r in verify_bundle(fusion_bundle)}
    assert all(r.status == "pass" for r in results.values()), {k: (r.status, r.detail) for k, r in results.items()}
    assert "(image, features)" in results["export"].detail


@pytest.fixture(scope="module")
def exported_fusion(fusion_bundle, tmp_path_factory) -> Path:
    import shutil

    root = tmp_path_factory.mktemp("mm_export") / "bundle"
    shutil.copytree(fusion_bundle, root)
    assert main(["export", "--bundle", str(root)]) == 0
    return root


@pytest.mark.parametrize("fmt", ["ts", "onnx"])
def test_exported_fusion_model_equals_eager_with_missing_values(exported_fusion, fmt):
    """The exported graph takes (image, raw features) and imputes NaN as the eager network does (its training
    means travel inside it); it refuses to run without the features or with the wrong width, naming the file."""
    from volcnn.bundle.export import example_inputs
    from volcnn.models import load_exported
    from volcnn.models.bundle_config import load_bundle_network

    eager, description, _ = load_bundle_network(exported_fusion, exported_fusion / "models" / "model.pt", "cpu")
    model, settings = load_exported(exported_fusion / "models" / f"model.{fmt}")
    assert [d["name"] for d in settings["features"]] == list(DECL)
    image, feats = example_inputs(description, batch=4, seed=3)
    assert torch.isnan(feats).any() and torch.isnan(feats[-1]).all() and not torch.isnan(feats[0]).all()
    with torch.no_grad():
        want = torch.softmax(eager.eval()(image, feats), dim=1)
        got = torch.softmax(model(image, features=feats), dim=1)
        one_row = torch.softmax(model(image, features=feats[:1]), dim=1)  # one case's features for all its windows
        assert torch.allclose(one_row, torch.softmax(eager(image, feats[:1].expand(4, -1)), dim=1), atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)
    other = feats.clone()
    other[:, 0] = 90.0  # another age changes the answer: the features reach the graph
    with torch.no_grad():  # logits: the tiny model's probabilities saturate
        assert not torch.allclose(model(image, features=other), model(image, features=feats), atol=1e-3)
    name = f"model.{fmt}"
    with pytest.raises(ValueError, match=f"{name}.*takes clinical features"):
        model(image)
    with pytest.raises(ValueError, match=f"{name}.*features \\(B, 2\\)"):
        model(image, features=feats[:, :1])


def test_infer_with_the_exported_model_and_a_features_csv(exported_fusion, cohort, tmp_path):
    """``volcnn infer --model model.ts --features CSV`` gives the probabilities of ``--bundle`` with the same CSV
    (both window by window)."""
    image = sorted((cohort / "images").glob("*.nii.gz"))[0]
    case = image.name.split(".")[0]
    csv = tmp_path / "f.csv"
    csv.write_text(f"case,age,smoker\n{case},72,1\n")
    common = ["--device", "cpu", "--stride-mm", "8", "--features", str(csv), "--heatmap-method", "window"]
    model = exported_fusion / "models" / "model.ts"
    assert main(["infer", "--model", str(model), *common, "--out", str(tmp_path / "ts"), str(image)]) == 0
    assert main(["infer", "--bundle", str(exported_fusion), *common, "--out", str(tmp_path / "b"), str(image)]) == 0
    ts, eager = (json.loads((tmp_path / k / case / "findings.json").read_text()) for k in ("ts", "b"))
    assert ts["features"]["provided"] == ["age", "smoker"]
    assert ts["max_probability"] == pytest.approx(eager["max_probability"], abs=1e-4)
    assert ts["score"] == pytest.approx(eager["score"], abs=1e-4)
