"""Exported models (.pt eager, .ts TorchScript, .onnx onnxruntime): parity, embedded settings, errors, the runner."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.conftest import blob_volume, make_affine
from volcnn.bundle.export import export_bundle
from volcnn.bundle.package import configure_bundle, install_model
from volcnn.bundle.verify import check_export
from volcnn.core.hashing import sha256_file as file_sha256
from volcnn.inference import InferenceRunner
from volcnn.models.exported import (
    ExportedModel,
    ExportedModelError,
    OnnxModel,
    TorchScriptModel,
    _finding_settings,
    load_exported,
    read_description,
)
from volcnn.networks import create_network

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
ATOL = 1e-4
FORMATS = ("pt", "ts", "onnx")


def _trained_like(name: str, patch: int, seed: int = 0) -> nn.Module:
    """A registry network with weights that make the comparison sensitive: non-default normalisation statistics (an
    export in training mode would differ) and a last layer rescaled so that the nodule probability of
    :func:`_patches` spreads over (0, 1) instead of sitting at 0.5 or saturating."""
    torch.manual_seed(seed)
    net = create_network(name, spatial_size=(patch,) * 3).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        logits = net(_patches(16, patch, seed=99))
        margin = logits[:, 1] - logits[:, 0]
        scale = 2.0 / float(margin.std())
        last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        last.bias[1] -= scale * float(margin.mean())
    return net


def _patches(n: int, patch: int, seed: int = 1) -> torch.Tensor:
    """Random windowed patches in [0, 1], each with its own level and contrast so that probabilities spread."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(n, 1, 1, 1, 1, generator=g) * 0.7
    contrast = 0.05 + torch.rand(n, 1, 1, 1, 1, generator=g) * 0.5
    return (level + contrast * torch.rand(n, 1, patch, patch, patch, generator=g)).clamp(0.0, 1.0)


def make_bundle(root: Path, name: str, patch: int, **settings: object) -> tuple[Path, nn.Module]:
    """A configured copy of the real bundle for ``name`` at ``patch``^3 with weights in ``models/model.pt``."""
    bundle = configure_bundle(
        BUNDLE, root / f"{name}_{patch}", {"network_def": name, "patch_size": [patch] * 3, **settings}
    )
    net = _trained_like(name, patch)
    torch.save(net.state_dict(), root / f"{name}.pt")
    install_model(bundle, root / f"{name}.pt")
    return bundle, net


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """seed_cnn3d (intensity ``zscore``) and resnet10 (``hu``) bundles at 16^3, exported to .ts and .onnx once for the
    module."""
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, intensity in (("seed_cnn3d", "zscore"), ("resnet10", "hu")):
        bundle, net = make_bundle(root, name, 16, pixdim=[1.5, 1.5, 1.5], hu_window=[-1000, 500], intensity=intensity)
        export_bundle(bundle)
        out[name] = (bundle, net)
    return out


def _probabilities(bundle: Path, n: int = 6) -> dict[str, torch.Tensor]:
    probs = {}
    for fmt in FORMATS:
        net, settings = load_exported(bundle / "models" / f"model.{fmt}")
        with torch.inference_mode():
            probs[fmt] = torch.softmax(net(_patches(n, settings["patch_size"][0])), dim=1)
    return probs


@pytest.mark.parametrize("name", ["seed_cnn3d", "resnet10"])
def test_probabilities_agree_across_formats(exported, name: str) -> None:
    bundle, eager = exported[name]
    probs = _probabilities(bundle)
    with torch.inference_mode():
        reference = torch.softmax(eager(_patches(6, 16)), dim=1)
    assert float(reference[:, 1].max() - reference[:, 1].min()) > 0.3  # not all ~0.5: the comparison means something
    for fmt in FORMATS:
        torch.testing.assert_close(probs[fmt], reference, atol=ATOL, rtol=0, msg=f"{fmt} differs from eager")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "patch"), [("densenet121", 32), ("resnet18", 32), ("resnet10", 48)])
def test_probabilities_agree_across_formats_bigger_networks(tmp_path: Path, name: str, patch: int) -> None:
    bundle, eager = make_bundle(tmp_path, name, patch)
    export_bundle(bundle)
    probs = _probabilities(bundle, n=4)
    with torch.inference_mode():
        reference = torch.softmax(eager(_patches(4, patch)), dim=1)
    for fmt in FORMATS:
        torch.testing.assert_close(probs[fmt], reference, atol=ATOL, rtol=0, msg=f"{fmt} differs from eager")


def test_settings_are_the_runner_arguments(exported) -> None:
    bundle, _ = exported["seed_cnn3d"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for fmt in FORMATS:
        path = bundle / "models" / f"model.{fmt}"
        net, settings = load_exported(path)
        assert settings == {
            "patch_size": (16, 16, 16),
            "pixdim": (1.5, 1.5, 1.5),
            "intensity": "zscore",
            "hu_window": (-1000.0, 500.0),
            "mode": "candidate",
            "margin": 8,
            "model_info": {"name": meta["name"], "version": meta["version"], "sha256": file_sha256(path)},
        }
        assert set(settings) <= set(inspect.signature(InferenceRunner).parameters)
        assert not net.training
    ts, _ = load_exported(bundle / "models" / "model.ts")
    onnx_net, _ = load_exported(bundle / "models" / "model.onnx")
    eager, _ = load_exported(bundle / "models" / "model.pt")
    assert isinstance(ts, TorchScriptModel) and isinstance(onnx_net, OnnxModel)
    assert not isinstance(eager, ExportedModel)  # the bundle's own network: it can still be split
    assert onnx_net.providers == ["CPUExecutionProvider"]


def test_description_records_the_source(exported) -> None:
    bundle, _ = exported["resnet10"]
    sha = file_sha256(bundle / "models" / "model.pt")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    for fmt, exporter in (("ts", "torchscript-script"), ("onnx", "onnx-dynamo")):
        d = read_description(bundle / "models" / f"model.{fmt}")
        assert (d["network_def"], d["num_classes"], d["in_channels"]) == ("resnet10", 2, 1)
        assert d["class_names"] == ["non-nodule", "nodule"]
        assert (d["source_model"], d["source_sha256"], d["bundle_version"]) == ("model.pt", sha, version)
        assert d["exporter"] == exporter
    assert read_description(bundle / "models" / "model.pt")["source_sha256"] == sha


def test_onnx_and_ts_take_any_batch_size(exported) -> None:
    bundle, eager = exported["resnet10"]
    for fmt in ("ts", "onnx"):
        net, _ = load_exported(bundle / "models" / f"model.{fmt}")
        for n in (1, 3):
            x = _patches(n, 16, seed=n)
            with torch.inference_mode():
                torch.testing.assert_close(net(x), eager(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["ts", "onnx"])
def test_wrong_input_shape_names_the_file(exported, fmt: str) -> None:
    path = exported["seed_cnn3d"][0] / "models" / f"model.{fmt}"
    net, _ = load_exported(path)
    for bad in (torch.rand(2, 1, 8, 8, 8), torch.rand(2, 2, 16, 16, 16), torch.rand(1, 16, 16, 16)):
        with pytest.raises(ValueError, match=rf"{path}.*takes input \(B, 1, 16, 16, 16\)"):
            net(bad)


def test_unknown_missing_and_corrupt_files(tmp_path: Path, exported) -> None:
    with pytest.raises(ExportedModelError, match=r"model\.h5: unknown model format '\.h5'"):
        load_exported(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        load_exported(tmp_path / "missing.onnx")
    for fmt in ("ts", "onnx"):
        good = (exported["seed_cnn3d"][0] / "models" / f"model.{fmt}").read_bytes()
        for kind, data in (("garbage", b"not a model" * 10), ("truncated", good[: len(good) // 2])):
            bad = tmp_path / f"{kind}.{fmt}"
            bad.write_bytes(data)
            with pytest.raises(ExportedModelError, match=rf"{bad}: cannot load the"):
                load_exported(bad)


def test_missing_metadata_is_refused(tmp_path: Path, exported) -> None:
    bundle, _ = exported["seed_cnn3d"]
    plain_ts = tmp_path / "plain.ts"
    torch.jit.save(torch.jit.script(_trained_like("seed_cnn3d", 16)), str(plain_ts))
    with pytest.raises(ExportedModelError, match=rf"{plain_ts}: no model settings embedded"):
        load_exported(plain_ts)

    model = onnx.load(str(bundle / "models" / "model.onnx"))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ExportedModelError, match=rf"{bare}: no model settings embedded"):
        load_exported(bare)

    model.metadata_props.add(key="volcnn", value=json.dumps({"pixdim": [1, 1, 1], "hu_window": [-1000, 400]}))
    partial = tmp_path / "partial.onnx"
    onnx.save(model, str(partial))
    with pytest.raises(ExportedModelError, match=rf"{partial}: embedded model settings lack or mistype 'patch_size'"):
        load_exported(partial)

    settings = {"patch_size": [16] * 3, "pixdim": [1, 1, 1], "hu_window": [-1000, 400], "intensity": "minmax"}
    del model.metadata_props[:]
    model.metadata_props.add(key="volcnn", value=json.dumps(settings))
    unknown = tmp_path / "unknown.onnx"
    onnx.save(model, str(unknown))
    with pytest.raises(ExportedModelError, match=rf"{unknown}: embedded settings: intensity must be one of"):
        load_exported(unknown)


def test_state_dict_needs_its_bundle(tmp_path: Path, exported) -> None:
    bundle, eager = exported["seed_cnn3d"]
    loose = tmp_path / "weights.pt"
    loose.write_bytes((bundle / "models" / "model.pt").read_bytes())
    with pytest.raises(ExportedModelError, match=rf"{loose}: a state dict needs its bundle"):
        load_exported(loose)
    net, settings = load_exported(loose, bundle_dir=bundle)
    x = _patches(2, 16)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), eager(x))
    assert settings["model_info"]["sha256"] == file_sha256(loose)


def test_monai_ckpt_export_ts_is_read_from_its_inference_config(tmp_path: Path) -> None:
    """A model.ts written by MONAI's ckpt_export alone (the verify check) has no volcnn entry: the embedded
    inference.json gives the settings."""
    bundle, eager = make_bundle(tmp_path, "seed_cnn3d", 8, pixdim=[2.0, 2.0, 2.0])
    check_export(bundle)
    net, settings = load_exported(bundle / "models" / "model.ts")
    assert (settings["patch_size"], settings["pixdim"], settings["hu_window"]) == (
        (8,) * 3,
        (2.0,) * 3,
        (-1000.0, 400.0),
    )
    x = _patches(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), eager(x), atol=1e-5, rtol=0)


def test_runner_heatmap_is_the_same_with_exported_models(tmp_path: Path, nifti_factory, exported) -> None:
    bundle, _ = exported["seed_cnn3d"]
    affine = make_affine((1.5, 1.5, 2.0), origin=(-20.0, -20.0, -10.0))
    image = blob_volume((24, 24, 16), affine, (-2.0, -3.0, 4.0), radius_mm=4.0, background=-800.0, value=40.0, noise=30)
    scan = nifti_factory("scan.nii.gz", image, affine)
    extra = {"method": "window"} if "method" in inspect.signature(InferenceRunner).parameters else {}
    heat = {}
    for fmt in FORMATS:
        net, settings = load_exported(bundle / "models" / f"model.{fmt}")
        runner = InferenceRunner(
            net, **settings, stride_mm=6.0, batch_size=40, device="cpu", threshold=0.0, progress=False, **extra
        )
        result = runner.run([scan], tmp_path / fmt)
        assert result["failures"] == []
        heat[fmt] = nib.load(tmp_path / fmt / "scan" / "heatmap.nii.gz").get_fdata()
        doc = json.loads((tmp_path / fmt / "scan" / "findings.json").read_text())
        assert doc["model"]["sha256"] == file_sha256(bundle / "models" / f"model.{fmt}")
    assert heat["pt"].shape == image.shape and np.ptp(heat["pt"]) > 0.05
    for fmt in ("ts", "onnx"):
        np.testing.assert_allclose(heat[fmt], heat["pt"], atol=ATOL, rtol=0, err_msg=fmt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exported_models_on_cuda(exported) -> None:
    bundle, eager = exported["resnet10"]
    x = _patches(4, 16)
    with torch.inference_mode():
        reference = torch.softmax(eager(x), dim=1)
        for fmt in FORMATS:
            net, _ = load_exported(bundle / "models" / f"model.{fmt}", device="cuda")
            out = net.to("cuda")(x.cuda())
            assert out.device.type == "cuda"
            torch.testing.assert_close(torch.softmax(out, dim=1).cpu(), reference, atol=ATOL, rtol=0, msg=fmt)


def test_export_carries_the_findings_settings_and_calibration(tmp_path: Path) -> None:
    """An exported model reports the findings its bundle does: the bundle's finding settings (changed here from the
    defaults) and its calibration are embedded, and ``volcnn infer --model`` builds its runner with them; an old
    description without them still loads, on the runner's defaults."""
    from volcnn.inference import exported_runner
    from volcnn.models import Calibration

    bundle, _ = make_bundle(
        tmp_path, "seed_cnn3d", 16, threshold=0.2, operating_threshold=0.7, refine_mm=3.0, nms="fixed", score="max"
    )
    calibration = Calibration(a=0.8, b=-1.5, num_cases=40, num_positive=6)
    calibration.write(bundle / "models" / "calibration.json")
    export_bundle(bundle)
    for fmt in FORMATS:
        _, plain = load_exported(bundle / "models" / f"model.{fmt}")
        assert "threshold" not in plain and "calibration" not in plain  # the model settings only, as before
        runner = exported_runner(bundle / "models" / f"model.{fmt}", device="cpu", progress=False)
        assert (runner.threshold, runner.operating_threshold, runner.refine_mm) == (0.2, 0.7, 3.0), fmt
        assert (runner.nms, runner.score, runner.calibration) == ("fixed", "max", calibration), fmt
        assert exported_runner(bundle / "models" / f"model.{fmt}", device="cpu", threshold=0.4).threshold == 0.4
    description = read_description(bundle / "models" / "model.ts")
    old = {k: v for k, v in description.items() if k != "findings"}
    assert _finding_settings(Path("old.ts"), old) == {}
    with pytest.raises(ExportedModelError, match="old.ts.*findings"):
        _finding_settings(Path("old.ts"), {**old, "findings": [1, 2]})
