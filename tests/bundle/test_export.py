"""Exporting a bundle to models/model.ts and models/model.onnx: files, embedded settings, fallbacks, atomicity."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from volcnn.bundle import export as export_mod
from volcnn.bundle.export import EXPORT_FORMATS, ONNX_OPSET, export_bundle
from volcnn.bundle.package import configure_bundle, install_model
from volcnn.models import load_exported
from volcnn.networks import create_network

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
PATCH = [8, 8, 8]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_network("seed_cnn3d", spatial_size=PATCH).eval()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A configured copy of the real bundle (seed_cnn3d, 8^3 patches, 2 mm voxels) with weights in models/."""
    root = configure_bundle(
        BUNDLE, tmp_path / "bundle", {"network_def": "seed_cnn3d", "patch_size": PATCH, "pixdim": [2.0, 2.0, 2.0]}
    )
    torch.save(_net().state_dict(), tmp_path / "weights.pt")
    install_model(root, tmp_path / "weights.pt")
    return root


def _outputs_match(path: Path, net: nn.Module) -> None:
    exported, _ = load_exported(path)
    x = torch.rand(3, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(exported(x), net(x), atol=1e-5, rtol=0)


def test_export_writes_both_files_with_their_settings(bundle: Path) -> None:
    written = export_bundle(bundle)
    models = bundle / "models"
    assert written == {"ts": models / "model.ts", "onnx": models / "model.onnx"}
    assert sorted(p.name for p in models.iterdir()) == ["model.onnx", "model.pt", "model.ts"]  # no temporary left
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    expected = {
        "patch_size": PATCH,
        "pixdim": [2.0, 2.0, 2.0],
        "hu_window": [-1000.0, 400.0],
        "in_channels": 1,
        "num_classes": 2,
        "class_names": ["non-nodule", "nodule"],
        "network_def": "seed_cnn3d",
        "bundle_name": meta["name"],
        "bundle_version": meta["version"],
        "source_model": "model.pt",
        "source_sha256": _sha256(models / "model.pt"),
        "output": "logits",
    }

    model = onnx.load(str(models / "model.onnx"))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert set(props) == {"volcnn", "metadata.json", "inference.json"}
    described = json.loads(props["volcnn"])
    assert described.items() >= {**expected, "exporter": "onnx-dynamo", "opset": ONNX_OPSET}.items()
    assert json.loads(props["inference.json"]) == config and json.loads(props["metadata.json"]) == meta
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    (image,), (logits,) = model.graph.input, model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *PATCH]  # dynamic batch, fixed patch

    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(models / "model.ts"), _extra_files=extra)
    ts_meta = json.loads(extra["metadata.json"])
    assert ts_meta.pop("volcnn").items() >= {**expected, "exporter": "torchscript-script"}.items()
    assert ts_meta == meta and json.loads(extra["inference.json"]) == config

    for fmt in EXPORT_FORMATS:
        _outputs_match(written[fmt], _net())


def test_export_of_a_given_nested_checkpoint(bundle: Path, tmp_path: Path) -> None:
    other = _net(seed=5)
    ckpt = tmp_path / "checkpoint_epoch0003.pt"
    torch.save({"network": other.state_dict(), "epoch": 3}, ckpt)
    written = export_bundle(bundle, formats=("onnx",), ckpt=ckpt)
    assert list(written) == ["onnx"] and not (bundle / "models" / "model.ts").exists()
    described = json.loads({p.key: p.value for p in onnx.load(str(written["onnx"])).metadata_props}["volcnn"])
    assert (described["source_model"], described["source_sha256"]) == (ckpt.name, _sha256(ckpt))
    _outputs_match(written["onnx"], other)


def test_bad_requests_are_refused(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown export format\(s\) \['trt'\]"):
        export_bundle(bundle, formats=("onnx", "trt"))
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        export_bundle(bundle, ckpt=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="not a bundle"):
        export_bundle(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_bundle(bundle, opset=13)
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.pt"]


def test_onnx_falls_back_to_the_torchscript_exporter(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original = torch.onnx.export

    def no_dynamo(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dynamo", True):
            raise RuntimeError("dynamo exporter unavailable\nsecond line")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    caplog.set_level(logging.WARNING, logger="volcnn.bundle.export")
    written = export_bundle(bundle, formats=("onnx",))
    assert "dynamo ONNX export failed (dynamo exporter unavailable); using the TorchScript-based" in caplog.text
    model = onnx.load(str(written["onnx"]))
    assert json.loads({p.key: p.value for p in model.metadata_props}["volcnn"])["exporter"] == "onnx-torchscript"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch still dynamic
    _outputs_match(written["onnx"], _net())


def test_torchscript_falls_back_to_tracing(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import monai.bundle

    original = monai.bundle.ckpt_export

    def no_script(**kwargs: Any) -> None:
        if not kwargs["use_trace"]:
            raise RuntimeError("cannot script this network")
        original(**kwargs)

    monkeypatch.setattr(monai.bundle, "ckpt_export", no_script)
    caplog.set_level(logging.WARNING, logger="volcnn.bundle.export")
    written = export_bundle(bundle, formats=("ts",))
    assert "torch.jit.script failed (cannot script this network); retrying with torch.jit.trace" in caplog.text
    extra = {"metadata.json": ""}
    torch.jit.load(str(written["ts"]), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["volcnn"]["exporter"] == "torchscript-trace"
    _outputs_match(written["ts"], _net())


def test_failed_parity_check_keeps_the_previous_export(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = export_bundle(bundle)
    before = {fmt: path.read_bytes() for fmt, path in written.items()}
    torch.save(_net(seed=9).state_dict(), bundle / "models" / "model.pt")

    def diverging_onnx(network: nn.Module, dest: Path, *args: Any, **kwargs: Any) -> str:
        return original(_net(seed=11), dest, *args, **kwargs)  # a different network than the checkpoint's

    original = export_mod.export_onnx
    monkeypatch.setattr(export_mod, "export_onnx", diverging_onnx)
    with pytest.raises(ValueError, match=r"model\..*\.onnx: exported probabilities differ from eager"):
        export_bundle(bundle, formats=("onnx",))
    assert written["onnx"].read_bytes() == before["onnx"]
    assert sorted(p.name for p in (bundle / "models").iterdir()) == ["model.onnx", "model.pt", "model.ts"]
