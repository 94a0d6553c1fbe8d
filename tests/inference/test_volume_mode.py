"""Volume-mode inference: each input fitted into the patch exactly as evaluation fits an entry without ``center``,
one forward pass, ``findings.json`` with every class probability and no spatial findings, no heat map; the volume's
explanation on the input's grid; resume; the bundle (``mode`` in ``inference.json``) and exported models."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from torch import nn

from tests.inference import GEOMETRIES, NODULE_RAS, nodule_scan
from tests.inference.test_runner import BUNDLE, infer_main
from volcnn.core.geometry import voxel_to_world
from volcnn.inference import InferenceRunner, load_bundle_runner
from volcnn.io import input_sha256, write_nifti
from volcnn.models import ExportedModelError
from volcnn.models.exported import _settings
from volcnn.networks import create_network

PATCH = (16, 16, 16)
SETTINGS = {"patch_size": PATCH, "pixdim": (2.0, 2.0, 2.0), "hu_window": (-1000.0, 400.0), "margin": 2}
TRAIN = BUNDLE / "configs" / "train.json"


class LinearNet(nn.Module):
    """Logits ``(B, K)``: a fixed random linear map of the whole patch, scaled so that the probabilities spread and
    any change of the input (a shifted fit, another spacing or window) changes them."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(int(np.prod(PATCH)), num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.randn(self.linear.weight.shape, generator=torch.Generator().manual_seed(seed))
            )
            self.linear.weight.mul_(0.05)
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class BrightnessNet(nn.Module):
    """Logit 1 = ``gain * (mean(conv(x)) - offset)`` with a 1x1x1 convolution of weight 1: its Grad-CAM on ``conv`` is
    the (windowed) input itself, brightest at the nodule, so the map's position can be checked."""

    def __init__(self, gain: float = 20.0, offset: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
        self.gain, self.offset = gain, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.conv(x).mean(dim=(1, 2, 3, 4))
        return torch.stack([torch.zeros_like(m), self.gain * (m - self.offset)], dim=1)


def _scan(folder: Path, name: str) -> Path:
    shape, aff = GEOMETRIES[name]
    path = folder / f"{name}.nii.gz"
    write_nifti(path, nodule_scan(shape, aff), aff)
    return path


def _runner(network: nn.Module, **kwargs) -> InferenceRunner:
    options = {**SETTINGS, "device": "cpu", "progress": False, "mode": "volume", "model_info": {"sha256": "abc"}}
    return InferenceRunner(network, **{**options, **kwargs})


def _evaluation_probabilities(network: nn.Module, path: Path, **settings) -> np.ndarray:
    """What the evaluate overlay computes for ``{"image": path}`` (no centre): train.json's own
    ``validate#preprocessing``, the network, softmax."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({k: list(v) if isinstance(v, tuple) else v for k, v in {**SETTINGS, **settings}.items()})
    chain = parser.get_parsed_content("validate#preprocessing")
    assert isinstance(chain, Compose)
    image = chain({"image": str(path)})["image"]
    with torch.no_grad():
        return torch.softmax(network(image[None].as_subclass(torch.Tensor)), dim=1)[0].double().numpy()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One volume-mode pass over the four geometries and a truncated input, with a K = 3 network scoring class 2."""
    root = tmp_path_factory.mktemp("volume_mode")
    inputs = {name: _scan(root / "in", name) for name in sorted(GEOMETRIES)}
    bad = root / "in" / "truncated.nii.gz"
    bad.write_bytes(inputs["ras"].read_bytes()[:300])
    net = LinearNet(num_classes=3)
    runner = _runner(net, class_index=2)
    result = runner.run([str(p) for p in inputs.values()] + [str(bad)], root / "out")
    return {"inputs": inputs, "bad": bad, "out": root / "out", "result": result, "net": net}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_probabilities_equal_the_evaluation_chain(batch, name):
    doc = json.loads((batch["out"] / name / "findings.json").read_text())
    expected = _evaluation_probabilities(batch["net"], batch["inputs"][name])
    assert len(doc["probabilities"]) == 3  # K = 3: every class probability
    np.testing.assert_allclose(doc["probabilities"], expected, rtol=0, atol=1e-6)
    assert doc["score"] == doc["probabilities"][2] and doc["class_index"] == 2
    assert sum(doc["probabilities"]) == pytest.approx(1.0, abs=1e-6)
    assert float(np.ptp(expected)) > 0.05  # the probabilities differ by class: the comparison means something


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_findings_json_in_volume_mode(batch, name):
    case = batch["out"] / name
    doc = json.loads((case / "findings.json").read_text())
    assert set(doc) == {
        "case",
        "mode",
        "score",
        "class_index",
        "probabilities",
        "findings",
        "model",
        "input_sha256",
        "settings",
    }
    assert doc["case"] == name and doc["mode"] == "volume" and doc["findings"] == []
    assert doc["input_sha256"] == input_sha256(batch["inputs"][name])
    assert doc["settings"] == {
        "mode": "volume",
        "patch_size": list(PATCH),
        "pixdim": [2.0, 2.0, 2.0],
        "intensity": "hu",
        "hu_window": [-1000.0, 400.0],
        "margin": 2,
        "class_index": 2,
    }
    assert sorted(p.name for p in case.iterdir()) == ["findings.json"]  # no heat map: nothing spatial to map


def test_summary_and_failures(batch):
    with open(batch["out"] / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["status"]) for r in rows] == [(n, "ok") for n in sorted(GEOMETRIES)] + [
        ("truncated", "failed")
    ]
    for row in rows[:-1]:
        doc = json.loads((batch["out"] / row["case"] / "findings.json").read_text())
        assert float(row["score"]) == doc["score"] == float(row["max_probability"]) and row["n_findings"] == "0"
    (failure,) = json.loads((batch["out"] / "failures.json").read_text())
    assert failure["input"] == str(batch["bad"]) and str(batch["bad"]) in failure["error"]


@pytest.mark.parametrize("name", ["lps", "oblique"])
def test_explanation_of_the_volume_lies_on_the_input_grid_at_the_nodule(tmp_path, name):
    """``--explain``: one Grad-CAM map of the whole volume, with the input's shape and affine, brightest where the
    evidence is (this network's evidence is the windowed input, whose brightest part is the nodule)."""
    path = _scan(tmp_path, name)
    runner = _runner(BrightnessNet(), patch_size=(24, 24, 24))
    runner.explain = 1
    assert runner.run([str(path)], tmp_path / "out")["failures"] == []
    case = tmp_path / "out" / name
    doc = json.loads((case / "findings.json").read_text())
    (expl,) = doc["explanations"]
    assert expl["nifti"] == "volume_gradcam.nii.gz" and expl["png"] == "volume_gradcam.png"
    assert expl["target_layer"] == "conv" and expl["patch_probability"] == pytest.approx(doc["score"], abs=1e-4)
    src, img = nib.load(path), nib.load(case / expl["nifti"])
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
    sal = np.asarray(img.dataobj)
    assert sal.min() >= 0.0 and 0.9 <= sal.max() <= 1.0 + 1e-6
    peak = voxel_to_world(src.affine, np.unravel_index(int(np.argmax(sal)), sal.shape))
    fitted_voxel_mm = max(np.asarray(src.shape) * np.sqrt((src.affine[:3, :3] ** 2).sum(axis=0))) / 24
    assert np.linalg.norm(peak - np.asarray(NODULE_RAS)) <= fitted_voxel_mm
    assert (case / expl["png"]).read_bytes().startswith(b"\x89PNG")


def test_done_cases_are_skipped_until_input_model_settings_or_explanation_change(tmp_path, caplog):
    path = _scan(tmp_path, "ras")
    out = tmp_path / "out"
    _runner(LinearNet()).run([str(path)], out)
    stamp = (out / "ras" / "findings.json").stat().st_mtime_ns
    caplog.set_level(logging.INFO)
    assert _runner(LinearNet()).run([str(path)], out)["skipped"] == ["ras"]
    assert (out / "ras" / "findings.json").stat().st_mtime_ns == stamp
    for changed in ({"margin": 4}, {"model_info": {"sha256": "def"}}, {"class_index": 0}, {"resume": False}):
        assert _runner(LinearNet(), **changed).run([str(path)], out)["skipped"] == [], changed
        _runner(LinearNet()).run([str(path)], out)  # back to the first settings
    explaining = _runner(BrightnessNet())
    explaining.explain = 1
    assert explaining.run([str(path)], out)["skipped"] == []  # asked for an explanation it did not write before
    candidate = InferenceRunner(LinearNet(), **{**SETTINGS, "device": "cpu", "progress": False})
    assert candidate.run([str(path)], out)["skipped"] == []  # candidate mode never reuses a volume-mode case


def test_mode_is_checked():
    with pytest.raises(ValueError, match="unknown inference mode 'patch'; choose one of candidate, volume"):
        _runner(LinearNet(), mode="patch")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        _runner(LinearNet(), margin=-1)


# ---- the bundle: "mode" in configs/inference.json; exported models carry it ----


@pytest.fixture
def volume_bundle(tmp_path):
    """A copy of the real bundle configured for volume mode with a random seed_cnn3d (K = 2) as models/model.pt."""
    from volcnn.bundle import configure_bundle

    settings = {"network_def": "seed_cnn3d", "patch_size": list(PATCH), "pixdim": [2.0, 2.0, 2.0], "margin": 2}
    root = configure_bundle(BUNDLE, tmp_path / "bundle", {**settings, "mode": "volume"})
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(create_network("seed_cnn3d", num_classes=2, spatial_size=PATCH).state_dict(), root / "models/model.pt")
    return root


def test_bundle_states_the_mode(volume_bundle):
    runner = load_bundle_runner(volume_bundle, device="cpu", progress=False)
    assert (runner.mode, runner.margin) == ("volume", 2) and runner.volume_mode is not None
    assert load_bundle_runner(volume_bundle, device="cpu", mode="candidate").mode == "candidate"
    # a config whose runner predates the key still gets it from the top level; no key at all is candidate mode
    config_path = volume_bundle / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    del config["runner"]["mode"], config["runner"]["margin"]
    config_path.write_text(json.dumps(config))
    predating = load_bundle_runner(volume_bundle, device="cpu")
    assert (predating.mode, predating.margin) == ("volume", 2)
    del config["mode"]
    config_path.write_text(json.dumps(config))
    assert load_bundle_runner(volume_bundle, device="cpu").mode == "candidate"
    with pytest.raises(RuntimeError, match="Failed to instantiate") as info:  # MONAI wraps the runner's error
        load_bundle_runner(volume_bundle, device="cpu", mode="whole")
    assert "unknown inference mode 'whole'" in str(info.value.__cause__)


def test_infer_main_in_volume_mode(volume_bundle, tmp_path, caplog):
    path = _scan(tmp_path, "lps")
    out = tmp_path / "out"
    caplog.set_level(logging.WARNING)
    assert infer_main(volume_bundle, out, [str(path)], device="cpu", progress=False, stride_mm=8.0) == 0
    assert "a volume-mode model makes no heat map; stride_mm ignored" in caplog.text
    doc = json.loads((out / "lps" / "findings.json").read_text())
    assert doc["mode"] == "volume" and len(doc["probabilities"]) == 2 and doc["findings"] == []
    assert not (out / "lps" / "heatmap.nii.gz").exists()
    assert infer_main(volume_bundle, tmp_path / "expl", [str(path)], device="cpu", progress=False, explain=1) == 0
    assert nib.load(tmp_path / "expl" / "lps" / "volume_gradcam.nii.gz").shape == GEOMETRIES["lps"][0]


def test_exported_volume_mode_model_runs_in_volume_mode(volume_bundle, tmp_path):
    """The description carries the mode: ``volcnn infer --model model.onnx|model.ts`` classifies whole volumes and
    gives the bundle's probabilities."""
    from volcnn.bundle import export_bundle
    from volcnn.models import read_description

    paths = export_bundle(volume_bundle)
    scan = _scan(tmp_path, "oblique")
    assert infer_main(volume_bundle, tmp_path / "bundle", [str(scan)], device="cpu", progress=False) == 0
    reference = json.loads((tmp_path / "bundle" / "oblique" / "findings.json").read_text())
    for fmt, path in paths.items():
        description = read_description(path)
        assert (description["mode"], description["margin"], description["description_version"]) == ("volume", 2, 3)
        assert infer_main(None, tmp_path / fmt, [str(scan)], model=path, device="cpu", progress=False) == 0
        doc = json.loads((tmp_path / fmt / "oblique" / "findings.json").read_text())
        assert doc["mode"] == "volume" and doc["settings"] == reference["settings"]
        np.testing.assert_allclose(doc["probabilities"], reference["probabilities"], rtol=0, atol=1e-5)
        assert not (tmp_path / fmt / "oblique" / "heatmap.nii.gz").exists()


def test_candidate_bundle_and_old_exports_stay_candidate(tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", root / "configs")
    (root / "models").mkdir()
    torch.save(
        create_network("seed_cnn3d", num_classes=2, spatial_size=(8, 8, 8)).state_dict(), root / "models/model.pt"
    )
    runner = load_bundle_runner(root, network_def="seed_cnn3d", patch_size=[8, 8, 8], device="cpu")
    assert runner.mode == "candidate" and runner.volume_mode is None and "mode" not in runner.settings
    old = {"patch_size": [8, 8, 8], "pixdim": [1.0, 1.0, 1.0], "hu_window": [-1000, 400]}  # a version-1 description
    assert _settings(Path("old.onnx"), old, "")["mode"] == "candidate"
    with pytest.raises(ExportedModelError, match="old.onnx: embedded settings: unknown inference mode 'slab'"):
        _settings(Path("old.onnx"), {**old, "mode": "slab"}, "")
