"""A packaged bundle's metadata describes its model: input, output classes, version, changelog."""

from __future__ import annotations

import json
from pathlib import Path

from volcnn.bundle.metadata import class_names, packaged_metadata, packaged_version
from volcnn.bundle.verify import validate_metadata

META = json.loads(
    (Path(__file__).resolve().parents[2] / "bundles/lung_nodule_ct_classification/configs/metadata.json").read_text()
)
SHA = "0123456789abcdef" * 4


def _packaged(**kwargs):
    args = {"mode": "candidate", "labels": None, "in_channels": 1, "weights_sha256": SHA,
            "datalist_sha256": "f" * 64, "volcnn_version": "9.9.9"}  # fmt: skip
    settings = kwargs.pop("settings", {"network_def": "seed_cnn3d", "num_classes": 2, "patch_size": [16, 16, 16]})
    return packaged_metadata(META, settings, **{**args, **kwargs})


def test_class_names():
    assert class_names({"0": "benign", "1": "malignant"}, 2) == ["benign", "malignant"]
    assert class_names({"0": "a"}, 2) == ["a", "class 1"]
    assert class_names(None, 2, {"0": "non-nodule", "1": "nodule"}) == ["non-nodule", "nodule"]
    assert class_names(None, 3, {"0": "non-nodule", "1": "nodule"}) == ["class 0", "class 1", "class 2"]


def test_version_label():
    assert packaged_version("0.3.0", SHA) == "0.3.0+0123456789ab"
    assert packaged_version("0.3.0+feedbeef0000", SHA) == "0.3.0+0123456789ab"  # packaged again: label replaced


def test_candidate_metadata_is_valid_and_describes_the_model():
    meta = _packaged(labels={"0": "benign", "1": "malignant"})
    validate_metadata(meta)
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [16, 16, 16] and fmt["inputs"]["image"]["is_patch_data"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "benign", "1": "malignant"}
    assert meta["pred_classes"].endswith("channel 0 = benign, channel 1 = malignant")
    assert meta["version"] == "0.7.0+0123456789ab"
    line = meta["changelog"]["0.7.0+0123456789ab"]
    assert "volcnn 9.9.9" in line and "network_def seed_cnn3d" in line and "patch_size [16, 16, 16]" in line
    assert meta["changelog"]["0.3.0"] == META["changelog"]["0.3.0"]  # the releases' lines are kept
    assert META["version"] == "0.7.0" and "is_patch_data" in META["network_data_format"]["inputs"]["image"]


def test_volume_metadata_with_three_classes():
    settings = {"network_def": "resnet10", "num_classes": 3, "patch_size": [64, 64, 64]}
    meta = _packaged(settings=settings, mode="volume", labels={"0": "none", "1": "benign", "2": "malignant"})
    validate_metadata(meta)
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["is_patch_data"] is False
    assert fmt["outputs"]["pred"]["num_channels"] == 3 and fmt["outputs"]["pred"]["spatial_shape"] == [3]
    assert meta["label_classes"] == "integer class per volume: 0 = none, 1 = benign, 2 = malignant"


def test_an_input_not_in_hu_is_not_described_as_hounsfield():
    settings = {"network_def": "seed_cnn3d", "num_classes": 2, "patch_size": [16, 16, 16], "intensity": "percentile"}
    meta = _packaged(settings=settings)
    validate_metadata(meta)
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "magnitude" and image["value_range"] == []
    hu = _packaged(settings={**settings, "intensity": "hu"})["network_data_format"]["inputs"]["image"]
    assert hu["format"] == "hounsfield" and hu["value_range"] == [-1024, 3071]
