"""Tests of the offline bundle checks: vendored schema, metadata validation, network I/O and export."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from volcnn.bundle import (
    SCHEMA_NAME,
    SCHEMA_SHA256,
    MetadataValidationError,
    SchemaIntegrityError,
    check_export,
    check_network_io,
    load_schema,
    validate_metadata,
    verify_bundle,
)
from volcnn.bundle import verify as verify_mod

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lung_nodule_ct_classification"
SCHEMA_FILE = REPO / "volcnn" / "bundle" / "schema" / SCHEMA_NAME
SCHEMA_URL = f"https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/{SCHEMA_NAME}"
REQUIRED = (
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)


def _metadata(patch: int = 8, classes: int = 2) -> dict[str, Any]:
    return {
        "schema": SCHEMA_URL,
        "version": "0.0.1",
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.0.0",
        "required_packages_version": {},
        "task": "test",
        "description": "tiny test bundle",
        "authors": "tests",
        "copyright": "none",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "spatial_shape": [patch, patch, patch],
                    "dtype": "float32",
                    "value_range": [-1024, 3071],
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": classes,
                    "spatial_shape": [classes],
                    "dtype": "float32",
                    "value_range": [0, 1],
                }
            },
        },
    }


# a small 3D classifier (B, 1, D, H, W) -> (B, K) with BatchNorm, so that eval mode matters in the export check
_TINY_NET = (
    "$torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),"
    " torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(4, @num_classes))"
)


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A bundle with the real key layout (``network_def`` a name, ``network`` the module) and a tiny network."""
    root = tmp_path / "tiny_bundle"
    (root / "configs").mkdir(parents=True)
    config = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "tiny",
        "num_classes": 2,
        "patch_size": [8, 8, 8],
        "network": _TINY_NET,
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "configs" / "metadata.json").write_text(json.dumps(_metadata()))
    return root


def test_vendored_schema_matches_pinned_hash() -> None:
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = load_schema()
    assert set(REQUIRED) == set(schema["required"])


def test_tampered_schema_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = tmp_path / SCHEMA_NAME
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["required"].remove("authors")
    tampered.write_text(json.dumps(schema, indent=4))
    with pytest.raises(SchemaIntegrityError, match="sha256"):
        load_schema(tampered)
    with pytest.raises(SchemaIntegrityError, match="not found"):
        load_schema(tmp_path / "missing.json")
    monkeypatch.setattr(verify_mod, "_SCHEMA_PATH", tampered)
    with pytest.raises(SchemaIntegrityError):
        verify_bundle(BUNDLE, export=False)


def test_valid_metadata_passes() -> None:
    validate_metadata(_metadata())


@pytest.mark.parametrize("field", ["authors", "numpy_version", "network_data_format"])
def test_missing_required_field_is_named(field: str) -> None:
    meta = _metadata()
    del meta[field]
    with pytest.raises(MetadataValidationError, match=f"'{field}' is a required property") as info:
        validate_metadata(meta)
    assert len(info.value.errors) == 1


def test_all_violations_listed_with_their_path() -> None:
    meta = _metadata()
    del meta["copyright"]
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = "1"
    del meta["network_data_format"]["outputs"]["pred"]["dtype"]
    with pytest.raises(MetadataValidationError) as info:
        validate_metadata(meta)
    text = str(info.value)
    assert "'copyright' is a required property" in text
    assert "network_data_format/inputs/image" in text
    assert "network_data_format/outputs/pred" in text


def test_metadata_for_another_schema_is_refused() -> None:
    meta = copy.deepcopy(_metadata())
    meta["schema"] = SCHEMA_URL.replace(SCHEMA_NAME, "meta_schema_20220324.json")
    with pytest.raises(MetadataValidationError, match="does not name the vendored"):
        validate_metadata(meta)


def test_real_bundle_metadata_validates() -> None:
    meta_file = BUNDLE / "configs" / "metadata.json"
    validate_metadata(meta_file)
    meta = json.loads(meta_file.read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["spatial_shape"]) == (1, [48, 48, 48])
    assert (pred["num_channels"], pred["channel_def"]) == (2, {"0": "non-nodule", "1": "nodule"})


def test_network_io_passes_and_catches_mismatch(tiny_bundle: Path) -> None:
    assert "(1, 2)" in check_network_io(tiny_bundle)
    meta_file = tiny_bundle / "configs" / "metadata.json"
    meta_file.write_text(json.dumps(_metadata(classes=3)))
    with pytest.raises(ValueError, match="output channel number"):
        check_network_io(tiny_bundle)


def test_network_io_catches_patch_size_mismatch(tiny_bundle: Path) -> None:
    (tiny_bundle / "configs" / "metadata.json").write_text(json.dumps(_metadata(patch=12)))
    with pytest.raises(ValueError, match="patch_size"):
        check_network_io(tiny_bundle)


def test_export_without_checkpoint_uses_a_temporary_dir(tiny_bundle: Path) -> None:
    detail = check_export(tiny_bundle)
    assert "fresh weights" in detail
    assert not (tiny_bundle / "models").exists()


@pytest.mark.parametrize("nested", [False, True])
def test_export_of_checkpoint_writes_model_ts(tiny_bundle: Path, nested: bool) -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.BatchNorm3d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    net[1].running_mean.fill_(0.3)  # non-default buffers: a state not loaded would change the output
    (tiny_bundle / "models").mkdir()
    state = net.state_dict()
    torch.save({"model": state, "epoch": 3} if nested else state, tiny_bundle / "models" / "model.pt")

    check_export(tiny_bundle)

    ts = torch.jit.load(str(tiny_bundle / "models" / "model.ts"))
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net.eval()(x), atol=1e-5, rtol=0)


def test_export_reports_a_wrong_output_shape(tiny_bundle: Path) -> None:
    (tiny_bundle / "configs" / "metadata.json").write_text(json.dumps(_metadata(classes=3)))
    with pytest.raises(ValueError, match=r"expected \(1, 3\)"):
        check_export(tiny_bundle)


def _load_tool() -> Any:
    spec = importlib.util.spec_from_file_location("verify_bundle_tool", REPO / "tools" / "verify_bundle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_verify_bundle_and_tool_exit_codes(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = verify_bundle(tiny_bundle)
    assert [(r.name, r.status) for r in results] == [("metadata", "pass"), ("network_io", "pass"), ("export", "pass")]

    tool = _load_tool()
    assert tool.main([str(tiny_bundle), "--no-export"]) == 0
    assert "SKIP export" in capsys.readouterr().out

    meta = _metadata()
    del meta["authors"]
    (tiny_bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert tool.main([str(tiny_bundle), "--no-export"]) == 1
    out = capsys.readouterr().out
    assert "FAIL metadata" in out and "'authors' is a required property" in out


def test_real_bundle_network_io() -> None:
    check_network_io(BUNDLE)


def test_real_bundle_verifies() -> None:
    results = verify_bundle(BUNDLE)
    assert all(r.ok for r in results), "\n".join(map(str, results))
