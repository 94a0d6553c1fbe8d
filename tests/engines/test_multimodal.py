"""Image, clinical and fusion training through the one bundle (``configs/multimodal.json``): statistics from the
training split only, bit-exact resume for every modality, evaluation with features, and a packaged fusion bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from tests.engines.feature_cohort import DECL, feature_cohort
from volcnn.engines import load_training_checkpoint
from volcnn.io.features import FeatureError, attach_features, feature_matrix, fit_feature_stats

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "lung_nodule_ct_classification" / "configs"
EPOCHS = 3
TINY = {"network_def": "seed_cnn3d", "patch_size": [16, 16, 16], "margin": 2, "batch_size": 4, "num_workers": 0,
        "device": "cpu", "amp": False, "max_epochs": EPOCHS, "seed": 7, "deterministic": True,
        "learning_rate": 0.003, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A tiny cohort whose candidate datalist carries features (age separates the labels; some values missing)."""
    return feature_cohort(tmp_path_factory.mktemp("mm_cohort"))


def _workflow(cohort: Path, out: Path, run_id: str = "training", datalist: str = "datalist_mm.json", **extra):
    files = [str(CONFIGS / "train.json")]
    if run_id == "evaluating":
        files.append(str(CONFIGS / "evaluate.json"))
    files.append(str(CONFIGS / "multimodal.json"))
    wf = ConfigWorkflow(
        config_file=files, meta_file=str(CONFIGS / "metadata.json"), workflow_type=None, run_id=run_id,
        dataset_dir=str(cohort), datalist=str(cohort / datalist), output_dir=str(out), **{**TINY, **extra},
    )  # fmt: skip
    wf.initialize()
    return wf


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_training_checkpoint(out / "models" / f"checkpoint_epoch{EPOCHS:04d}.pt")["state"]["model"]


def test_statistics_come_from_the_training_split_only(cohort, tmp_path):
    data = json.loads((cohort / "datalist_mm.json").read_text())
    for e in data["validation"] + data["test"]:  # wildly different values outside training change nothing
        e["features"]["age"] = 119.0
    (tmp_path / "dl.json").write_text(json.dumps(data))
    wf = _workflow(cohort, tmp_path / "out", datalist=str(tmp_path / "dl.json"), modality="fusion")
    net = wf.parser.get_parsed_content("network")
    train = attach_features(data["training"], DECL)
    expected = fit_feature_stats(DECL, feature_matrix(train))
    assert torch.allclose(net.tabular.normalize.mean, torch.tensor(expected["mean"]))
    assert torch.allclose(net.tabular.normalize.std, torch.tensor(expected["std"]))
    precision = net.tabular.normalize.precision
    assert torch.allclose(precision, torch.tensor(expected["precision"], dtype=torch.float32), atol=1e-5)
    everything = attach_features(data["training"] + data["validation"] + data["test"], DECL)
    pooled = torch.tensor(fit_feature_stats(DECL, feature_matrix(everything))["precision"], dtype=torch.float32)
    assert not torch.allclose(precision, pooled, atol=1e-3)  # the correlations too are the training split's
    ages = [e["features"]["age"] for e in data["training"]]
    assert net.tabular.normalize.mean[0].item() == pytest.approx(np.mean(ages), rel=1e-6)
    assert net.tabular.normalize.mean[0].item() < 100  # the validation / test ages were not pooled in


@pytest.mark.parametrize(
    ("modality", "fusion", "dropout"),
    [("image", "concat", 0.0), ("clinical", "concat", 0.0), ("fusion", "concat", 0.3), ("fusion", "film", 0.0)],
)
def test_every_modality_trains_and_resumes_bit_exact(cohort, tmp_path, modality, fusion, dropout):
    kw = {"modality": modality, "fusion": fusion, "feature_dropout": dropout}
    ref = _workflow(cohort, tmp_path / "ref", **kw)
    ref.run()
    cut = _workflow(cohort, tmp_path / "cut", **kw)
    cut.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate()
    )
    cut.run()
    _workflow(cohort, tmp_path / "cut", resume=True, **kw).run()
    a, b = _final_state(tmp_path / "ref"), _final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    record = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert record["modality"] == modality
    if modality == "image":
        assert record["features"] is None
        assert not any("normalize" in k for k in a)
    else:  # the statistics travel in the checkpoint, the declaration (in its order) in the record
        assert [d["name"] for d in record["features"]] == list(DECL)
        assert "tabular.normalize.mean" in a
        assert float(a["tabular.normalize.mean"][0]) > 40  # the training ages' mean, not the placeholder 0


def test_clinical_model_learns_from_features(cohort, tmp_path):
    """Age separates the classes in this cohort: a clinical model must rank the validation entries well."""
    wf = _workflow(cohort, tmp_path, modality="clinical", max_epochs=30, learning_rate=0.01)
    wf.run()
    auc = wf.parser.get_parsed_content("validate#evaluator").state.metrics["val_auc"]
    assert auc > 0.9


def test_clinical_model_opens_no_image(cohort, tmp_path, monkeypatch):
    """A clinical-only model does not look at the CT, so its runs read none (a zero placeholder stands in)."""
    import volcnn.io.reader as reader

    opened: list[str] = []
    load = reader.load_volume

    def recording(path, *args, **kwargs):
        opened.append(str(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(reader, "load_volume", recording)
    rows = {}
    for modality in ("clinical", "fusion"):
        opened.clear()
        out = tmp_path / modality
        _workflow(cohort, out, modality=modality, max_epochs=1).run()
        _workflow(cohort, out, run_id="evaluating", modality=modality, n_boot=20).run()
        assert (opened == []) == (modality == "clinical"), (modality, opened[:3])
        with open(out / "predictions.csv", newline="") as fh:
            rows[modality] = [{k: r[k] for k in ("case", "image", "center_x", "label")} for r in csv.DictReader(fh)]
    assert rows["clinical"] == rows["fusion"] and rows["clinical"][0]["image"].endswith(".nii.gz")  # comparable


def test_bad_feature_value_is_refused_naming_entry_and_feature(cohort, tmp_path):
    data = json.loads((cohort / "datalist_mm.json").read_text())
    data["training"][2]["features"]["age"] = "sixty"
    (tmp_path / "dl.json").write_text(json.dumps(data))
    wf = _workflow(cohort, tmp_path / "out", datalist=str(tmp_path / "dl.json"), modality="fusion")
    with pytest.raises(Exception) as err:  # MONAI wraps what the config expression raised
        wf.parser.get_parsed_content("train#datalist")
    chain = []
    e: BaseException | None = err.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    feature_errors = [x for x in chain if isinstance(x, FeatureError)]
    assert feature_errors, chain
    assert "training[2]" in str(feature_errors[0]) and "'age'" in str(feature_errors[0])


def test_fusion_evaluation_writes_predictions(cohort, tmp_path):
    _workflow(cohort, tmp_path, modality="fusion").run()
    _workflow(cohort, tmp_path, run_id="evaluating", modality="fusion", n_boot=50).run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    test_entries = json.loads((cohort / "datalist_mm.json").read_text())["test"]
    assert len(rows) == 1 + len(test_entries)
    assert 0.0 <= metrics["metrics"]["auc"] <= 1.0
