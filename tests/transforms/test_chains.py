"""The evaluation chain: ``evaluation_transforms`` is the bundle's ``validate#preprocessing``, and running it on a
volume already loaded (``preprocess_loaded``, as volume-mode inference does) gives the same fitted volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from tests.conftest import blob_volume, make_affine
from volcnn.io import load_volume, write_nifti
from volcnn.transforms import deterministic_transforms, evaluation_transforms, preprocess_loaded, volume_transforms
from volcnn.transforms.crop import CropOrFitd

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundles" / "lung_nodule_ct_classification" / "configs" / "train.json"
SETTINGS = {"pixdim": [1.5, 1.5, 1.5], "hu_window": [-1000, 500], "patch_size": [14, 12, 16], "margin": 3}


@pytest.fixture
def scan(tmp_path: Path) -> str:
    """An LPS, anisotropic, non-cubic scan with a bright blob off centre, so that a wrong fit or orientation shows."""
    aff = make_affine((1.2, 0.9, 2.5), (-1, -1, 1), origin=(40.0, 30.0, -20.0))
    path = tmp_path / "lps.nii.gz"
    write_nifti(path, blob_volume((50, 70, 24), aff, (25.0, 5.0, 10.0), radius_mm=6.0, noise=20.0), aff)
    return str(path)


def _bundle_chain(**settings) -> Compose:
    """``validate#preprocessing`` as train.json builds it, with ``settings`` overridden as on the command line."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(settings)
    chain = parser.get_parsed_content("validate#preprocessing")
    assert isinstance(chain, Compose)
    return chain


def test_evaluation_transforms_are_the_bundles_validation_chain(scan):
    ours = evaluation_transforms(**SETTINGS)
    bundle = _bundle_chain(**SETTINGS)
    assert [type(t) for t in ours.transforms] == [type(t) for t in bundle.transforms]
    a, b = ours({"image": scan}), bundle({"image": scan})
    assert tuple(a["image"].shape) == (1, *SETTINGS["patch_size"])
    assert torch.equal(a["image"].as_subclass(torch.Tensor), b["image"].as_subclass(torch.Tensor))
    np.testing.assert_array_equal(np.asarray(a["image"].affine), np.asarray(b["image"].affine))
    assert torch.isnan(a["center"]).all()  # no centre: the whole volume fitted
    assert float(a["image"].max()) > 0.5  # the blob made it in: the comparison means something


def test_preprocess_loaded_runs_a_dataset_chain_on_a_loaded_volume(scan):
    chain = evaluation_transforms(**SETTINGS)
    expected = chain({"image": scan})["image"]
    handed = [load_volume(scan)]
    got = preprocess_loaded(chain, handed)
    assert handed == []  # the caller's reference was handed over
    assert torch.equal(got.as_subclass(torch.Tensor), expected.as_subclass(torch.Tensor))
    np.testing.assert_array_equal(np.asarray(got.affine), np.asarray(expected.affine))
    # a volume_transforms chain still gives the preprocessed volume itself
    plain = preprocess_loaded(volume_transforms("image", SETTINGS["pixdim"], SETTINGS["hu_window"]), load_volume(scan))
    assert plain.shape[1:] != got.shape[1:] and plain.ndim == 4


def test_preprocess_loaded_refuses_other_chains(scan):
    with pytest.raises(TypeError, match="LoadVolumed or PreprocessVolumed, got CropOrFitd"):
        preprocess_loaded(Compose([CropOrFitd("image", patch_size=(8, 8, 8))]), load_volume(scan))


def test_without_reading_the_image_a_zero_placeholder_of_the_patch_shape_stands_in():
    import torch

    from volcnn.transforms import PlaceholderImaged

    chain = deterministic_transforms(patch_size=(16, 12, 8), margin=2, read_image=False)
    a = chain({"image": "/no/such/file.nii.gz", "label": 1, "center": [1.0, -2.0, 3.5]})  # nothing is opened
    b = chain({"image": "/no/such/other.nii.gz", "label": 0})
    assert a["image"].shape == b["image"].shape == (1, 20, 16, 12) and not a["image"].any()
    assert a["image"].untyped_storage().nbytes() == 4  # one broadcast zero: a cached sample costs nothing
    assert a["image"].meta["filename_or_obj"] == "/no/such/file.nii.gz"  # predictions name the image as for a CT
    assert a["center"].dtype == torch.float32 and a["center"].tolist() == [1.0, -2.0, 3.5]
    assert torch.isnan(b["center"]).all() and a["label"] == 1
    batch = torch.stack([a["image"], b["image"]])  # batches are real tensors of the usual shape
    assert batch.shape == (2, 1, 20, 16, 12) and batch.is_contiguous()
    with pytest.raises(ValueError, match="three positive sizes"):
        PlaceholderImaged("image", (16, 16))
