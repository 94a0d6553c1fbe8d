"""Inference with clinical features: the per-case record in findings.json, missing and bad rows, resume, image
networks, ``volcnn infer --features`` on an image bundle, and per-feature attributions (``--explain``, occlusion and
permutation importance)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import blob_volume, make_affine
from tests.inference.test_runner import BUNDLE, SMALL, infer_main
from volcnn.commands.infer import _attach_features
from volcnn.explain.cam import crop_patch
from volcnn.explain.features import (
    network_predictor,
    occlusion_attributions,
    permutation_importance,
    plot_feature_importance,
)
from volcnn.inference import InferenceRunner
from volcnn.io import write_nifti
from volcnn.io.features import parse_feature_spec
from volcnn.io.volume import load_volume
from volcnn.networks import create_multimodal_network, create_network
from volcnn.transforms.volume_cache import preprocess_loaded

PATCH = (16, 16, 16)
DECL = {
    "age": {"type": "numeric", "unit": "years", "min": 0, "max": 120},
    "sex": {"type": "categorical", "values": ["F", "M"]},
    "smoker": {"type": "binary"},
}
SPEC = parse_feature_spec(DECL)
STATS = {"mean": [60.0, 0.5, 0.5, 0.4], "std": [10.0, 1.0, 1.0, 1.0]}
HIDDEN = 32
#: one case's features per row of the CSV (``None``: no row); ``d`` is a bad row (its case fails alone)
ROWS = {
    "a": {"age": "70", "sex": "M", "smoker": "1"},
    "b": {"age": "40", "sex": "F", "smoker": "0"},
    "c": None,
    "d": {"age": "old", "sex": "F", "smoker": "0"},
    "e": {"age": "70", "sex": "M", "smoker": ""},
}


def fusion_net(fusion: str = "concat", ignore: str | None = None) -> torch.nn.Module:
    """A fusion network whose features move the probability visibly (the concat head's tabular part is scaled up;
    FiLM gets non-zero conditioning); ``ignore``: that feature's columns and missingness indicator are cut from the
    tabular branch's first layer, so the network cannot read it."""
    torch.manual_seed(0)
    net = create_multimodal_network(
        "fusion", "seed_cnn3d", features=DECL, feature_stats=STATS, fusion=fusion, spatial_size=PATCH, hidden=HIDDEN
    )
    with torch.no_grad():
        if fusion == "film":
            net.film.weight.normal_(0.0, 0.5)
            net.head.weight.mul_(5.0)
        else:
            net.head.weight[:, -HIDDEN:] *= 10.0
        if ignore is not None:
            first = net.tabular.mlp[0].weight
            first[:, SPEC.column_slice(ignore)] = 0.0
            first[:, SPEC.n_columns + SPEC.names.index(ignore)] = 0.0
    return net.eval()


def _write_scan(path: Path) -> Path:
    aff = make_affine((1.0, 1.0, 1.0), origin=(-12.0, -12.0, -12.0))
    write_nifti(path, blob_volume((24, 24, 24), aff, (0.5, -0.5, 1.0), radius_mm=4.0, background=-800.0), aff)
    return path


def _write_csv(path: Path, rows: dict[str, dict[str, str] | None]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", *DECL])
        writer.writeheader()
        writer.writerows({"case": case, **row} for case, row in rows.items() if row is not None)
    return path


def _runner(network: torch.nn.Module, features=DECL, **kwargs) -> InferenceRunner:
    options = {
        "patch_size": PATCH, "stride_mm": 8.0, "threshold": 0.0, "max_findings": 2, "method": "window",
        "device": "cpu", "progress": False, "model_info": {"sha256": "abc"}, "features": features,
    }  # fmt: skip
    return InferenceRunner(network, **{**options, **kwargs})


def _run(runner: InferenceRunner, inputs: list[Path], out: Path, csv_path: Path | None) -> dict:
    _attach_features(runner, None if csv_path is None else str(csv_path), [str(p) for p in inputs], "test")
    return runner.run([str(p) for p in inputs], out)


def _doc(out: Path, case: str) -> dict:
    return json.loads((out / case / "findings.json").read_text())


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The same CT under five case names (a score difference between them comes from the features alone)."""
    root = tmp_path_factory.mktemp("case_features")
    first = _write_scan(root / "a.nii.gz")
    out = {"a": first}
    for case in "bcde":
        out[case] = root / f"{case}.nii.gz"
        shutil.copy(first, out[case])
    return out


@pytest.fixture(scope="module")
def batch(scans, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("case_features_run")
    table = _write_csv(root / "features.csv", {k: ROWS[k] for k in "abcd"})
    inputs = [scans[k] for k in "abcd"]
    result = _run(_runner(fusion_net()), inputs, root / "out", table)
    return {"out": root / "out", "result": result, "csv": table, "inputs": inputs, "root": root}


def test_findings_record_the_features_by_name_without_values(batch):
    record = _doc(batch["out"], "a")["features"]
    assert set(record) == {"provided", "missing", "sha256"}
    assert record["provided"] == ["age", "sex", "smoker"] and record["missing"] == []
    text = (batch["out"] / "a" / "findings.json").read_text()
    assert '"age": 70' not in text and '"M"' not in text


def test_different_features_change_the_score(batch):
    a, b = _doc(batch["out"], "a"), _doc(batch["out"], "b")
    assert a["input_sha256"] == b["input_sha256"]  # the same CT
    assert abs(a["max_probability"] - b["max_probability"]) > 0.02


def test_a_case_without_a_row_runs_with_every_feature_missing(batch):
    doc = _doc(batch["out"], "c")
    assert doc["features"]["provided"] == [] and doc["features"]["missing"] == ["age", "sex", "smoker"]
    assert "no row" in doc["features"]["note"]
    assert doc["max_probability"] not in (_doc(batch["out"], "a")["max_probability"], None)


def test_a_bad_row_fails_its_case_alone(batch):
    failures = json.loads((batch["out"] / "failures.json").read_text())
    assert [f["input"] for f in failures] == [str(batch["inputs"][3])]
    assert "'age'" in failures[0]["error"] and "old" in failures[0]["error"]
    assert not (batch["out"] / "d" / "findings.json").exists()
    assert sorted(p["case"] for p in batch["result"]["processed"]) == ["a", "b", "c"]


def test_resume_skips_the_same_features_and_reruns_changed_ones(batch):
    again = _run(_runner(fusion_net()), batch["inputs"], batch["out"], batch["csv"])
    assert sorted(again["skipped"]) == ["a", "b", "c"]
    changed = _write_csv(
        batch["root"] / "changed.csv", {**{k: ROWS[k] for k in "abcd"}, "a": {**ROWS["a"], "age": "50"}}
    )
    before = _doc(batch["out"], "a")["features"]["sha256"]
    third = _run(_runner(fusion_net()), batch["inputs"], batch["out"], changed)
    assert sorted(third["skipped"]) == ["b", "c"]
    assert _doc(batch["out"], "a")["features"]["sha256"] != before


def test_an_image_network_writes_no_features_record(scans, tmp_path):
    torch.manual_seed(0)
    net = create_network("seed_cnn3d", num_classes=2, spatial_size=PATCH)
    runner = _runner(net, features=None)
    runner.explain = 1
    runner.run([str(scans["a"])], tmp_path)
    doc = _doc(tmp_path, "a")
    assert "features" not in doc and doc["explanations"]
    assert all("feature_attributions" not in f for f in doc["findings"])


def test_infer_features_on_an_image_bundle_is_a_usage_error(scans, tmp_path, caplog):
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    torch.save(
        create_network("seed_cnn3d", num_classes=2, spatial_size=(8, 8, 8)).state_dict(), root / "models" / "model.pt"
    )
    table = _write_csv(tmp_path / "f.csv", {"a": ROWS["a"]})
    caplog.set_level(logging.ERROR)
    assert infer_main(root, tmp_path / "out", [str(scans["a"])], features=str(table), **SMALL) == 2
    assert "takes no clinical features" in caplog.text
    assert not (tmp_path / "out" / "a").exists()


# ---- attributions ----


@pytest.fixture(scope="module")
def explained(scans, tmp_path_factory) -> dict:
    """Cases a (every feature) and e (smoker missing), explained, with a network that cannot read ``sex``."""
    root = tmp_path_factory.mktemp("case_features_explain")
    table = _write_csv(root / "features.csv", {k: ROWS[k] for k in "ae"})
    net = fusion_net(ignore="sex")
    runner = _runner(net)
    runner.explain = 1
    _run(runner, [scans["a"], scans["e"]], root / "out", table)
    return {"out": root / "out", "net": net, "runner": runner}


def test_explained_findings_carry_attributions_of_every_declared_feature(explained):
    for case in "ae":
        findings = _doc(explained["out"], case)["findings"]
        assert list(findings[0]["feature_attributions"]) == list(DECL)  # every declared feature, in order
        assert all("feature_attributions" not in f for f in findings[1:])  # only the top finding is explained


def test_ignored_and_missing_features_get_zero(explained):
    a = _doc(explained["out"], "a")["findings"][0]["feature_attributions"]
    e = _doc(explained["out"], "e")["findings"][0]["feature_attributions"]
    assert abs(a["sex"]) < 1e-4 and abs(e["sex"]) < 1e-4  # the network cannot read it
    assert abs(a["age"]) > 0.01 and abs(a["smoker"]) > 1e-3  # those it reads move the probability
    assert e["smoker"] == 0.0  # missing: nothing to leave out
    assert abs(e["age"]) > 0.01


@pytest.mark.parametrize("settings", [{}, {"calibration": {"a": 2.0, "b": -0.5}, "flips": True}])
def test_attributions_are_taken_on_the_window_of_the_finding(scans, tmp_path, settings):
    """p(all values) on the window cut at the finding is the probability the heat map gave there, calibrated as the
    findings are, and the attribution of age is p minus p without age on that window. With flips the window itself
    is mirrored (as refined findings are scored); the heat map mirrors the volume, whose windows of an even size
    are then one voxel off, so there p agrees only roughly."""
    net = fusion_net()
    runner = _runner(net, **settings)
    runner.explain = 1
    _run(runner, [scans["a"]], tmp_path, _write_csv(tmp_path / "f.csv", {"a": ROWS["a"]}))
    finding = _doc(tmp_path, "a")["findings"][0]
    image = preprocess_loaded(runner._chains[0], [load_volume(scans["a"])])  # as the runner preprocessed the case
    patch, _ = crop_patch(image, finding["center_ras_mm"], PATCH)
    calibration = None if runner.calibration is None else runner.calibration.apply
    predict = network_predictor(net, patch[None], flips=bool(settings), calibration=calibration)
    raw = SPEC.encode({"age": 70.0, "sex": "M", "smoker": 1}, "a")
    no_age = raw.copy()
    no_age[SPEC.column_slice("age")] = np.nan
    p = predict(np.stack([raw, no_age]))
    assert p[0] == pytest.approx(finding["probability"], abs=0.01 if settings else 2e-4)
    assert finding["feature_attributions"]["age"] == pytest.approx(p[0] - p[1], abs=2e-4)
    assert abs(p[0] - p[1]) > 0.01


def test_volume_mode_attributes_the_volume(scans, tmp_path):
    table = _write_csv(tmp_path / "features.csv", {"a": ROWS["a"]})
    runner = _runner(fusion_net(ignore="sex"), mode="volume", margin=2)
    runner.explain = 1
    _run(runner, [scans["a"]], tmp_path / "out", table)
    doc = _doc(tmp_path / "out", "a")
    attributions = doc["feature_attributions"]
    assert list(attributions) == list(DECL) and abs(attributions["sex"]) < 1e-4 and abs(attributions["age"]) > 0.01


@pytest.mark.parametrize("fusion", ["concat", "film"])
def test_the_predictor_equals_the_network(fusion):
    """The fusion network's trunk is run once by the predictor; its probabilities are the network's own, and the
    network is left as it was."""
    net = fusion_net(fusion)
    trunk = net.trunk
    torch.manual_seed(1)
    images = torch.rand(5, 1, *PATCH)
    raw = np.stack([SPEC.encode(v, "t") for v in ({"age": 30 + 10 * i, "sex": "FM"[i % 2]} for i in range(5))])
    expected = torch.softmax(net(images, features=torch.from_numpy(raw)), dim=1)[:, 1].detach().double().numpy()
    np.testing.assert_allclose(network_predictor(net, images, batch_size=2)(raw), expected, atol=1e-6)
    assert net.trunk is trunk
    flipped = network_predictor(net, images[:1], flips=True)(raw)
    views = [images[:1], images[:1].flip(2), images[:1].flip(3), images[:1].flip(4)]
    with torch.no_grad():
        mean = np.mean(
            [
                torch.softmax(net(v.expand(5, -1, -1, -1, -1), features=torch.from_numpy(raw)), 1)[:, 1].numpy()
                for v in views
            ],
            axis=0,
        )
    np.testing.assert_allclose(flipped, mean, atol=1e-6)


def _linear_predict(calls: list[int]):
    """p = 0.5 + 0.01 (age - 60) + 0.1 [sex = M] - 0.1 [sex = F], a missing value contributing 0; smoker unused."""

    def predict(raw: np.ndarray) -> np.ndarray:
        calls.append(raw.shape[0])
        age = np.nan_to_num(raw[:, 0] - 60.0)
        sex = np.nan_to_num(raw[:, 2] - raw[:, 1])
        return 0.5 + 0.01 * age + 0.1 * sex

    return predict


def test_occlusion_attributions_leave_one_feature_out_in_one_call():
    calls: list[int] = []
    raw = SPEC.encode({"age": 75, "sex": "F", "smoker": True}, "t")
    out = occlusion_attributions(_linear_predict(calls), raw, DECL)
    assert calls == [4]  # F + 1 variants, one call
    assert out == pytest.approx({"age": 0.15, "sex": -0.1, "smoker": 0.0})
    calls.clear()
    out = occlusion_attributions(_linear_predict(calls), SPEC.encode({"age": 50}, "t"), DECL)
    assert calls == [2] and out == pytest.approx({"age": -0.1, "sex": 0.0, "smoker": 0.0})
    with pytest.raises(ValueError, match=r"\(4,\)"):
        occlusion_attributions(_linear_predict(calls), raw[:3], DECL)


def _cohort(n: int = 120, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    values = [
        {
            "age": float(np.clip(55 + 12 * y + 6 * rng.standard_normal(), 1, 119)),
            "sex": None if rng.random() < 0.1 else str(rng.choice(["F", "M"])),
            "smoker": bool(rng.random() < 0.5),
        }
        for y in labels
    ]
    return np.stack([SPEC.encode(v, "t") for v in values]), labels


def test_permutation_importance_finds_the_one_feature_the_model_uses():
    raw, labels = _cohort()

    def predict(rows: np.ndarray) -> np.ndarray:
        sex = rows[:, SPEC.column_slice("sex")]
        ok = np.isnan(sex).all(axis=1) | (np.nansum(sex, axis=1) == 1)  # one-hot columns moved together
        assert ok.all()
        return 1.0 / (1.0 + np.exp(-(np.nan_to_num(rows[:, 0], nan=60.0) - 60.0) / 10.0))

    result = permutation_importance(predict, raw, labels, DECL, n_repeats=5, seed=4)
    features = result["features"]
    assert result["baseline"] > 0.8 and result["n_samples"] == len(labels)
    assert features["age"]["mean"] > 0.1 and features["age"]["std"] > 0
    assert abs(features["sex"]["mean"]) < 1e-12 and abs(features["smoker"]["mean"]) < 1e-12
    assert len(features["age"]["drops"]) == 5
    assert features["sex"]["missing_fraction"] == pytest.approx(np.isnan(raw[:, 1]).mean())
    assert permutation_importance(predict, raw, labels, DECL, n_repeats=5, seed=4) == result
    assert permutation_importance(predict, raw, labels, DECL, n_repeats=5, seed=5) != result
    with pytest.raises(ValueError, match="n_repeats"):
        permutation_importance(predict, raw, labels, DECL, n_repeats=0)


def test_plot_feature_importance_writes_a_png(tmp_path):
    raw, labels = _cohort(40)
    result = permutation_importance(lambda r: np.nan_to_num(r[:, 0], nan=60.0), raw, labels, DECL, n_repeats=2)
    for name, data in (("perm.png", result), ("occ.png", {"age": 0.1, "sex": -0.05, "smoker": 0.0})):
        path = plot_feature_importance(data, tmp_path / name, title="$x$ importance")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
