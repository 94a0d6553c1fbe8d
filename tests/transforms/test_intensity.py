from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from volcnn.transforms import INTENSITY_MODES, HUWindow, HUWindowd, check_intensity, intensity_transform
from volcnn.transforms.intensity import PERCENTILES


def test_window_maps_and_clips():
    x = torch.tensor([[-2000.0, -1000.0, -300.0, 400.0, 3000.0]])
    y = HUWindow((-1000, 400))(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_window_keeps_metadata_and_input():
    x = MetaTensor(torch.tensor([[0.0, 100.0]]), meta={"filename_or_obj": "a.nii.gz"})
    out = HUWindowd("image", (0, 200))({"image": x})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.nii.gz"
    torch.testing.assert_close(out.as_tensor(), torch.tensor([[0.0, 0.5]]))
    assert x[0, 1] == 100.0  # the input is not modified in place


def test_window_rejects_empty_range():
    with pytest.raises(ValueError, match="lower < upper"):
        HUWindow((400, -1000))


def _volume(values: torch.Tensor) -> dict:
    return {"image": MetaTensor(values[None].float(), meta={"filename_or_obj": "a.nii.gz"})}


def test_hu_setting_is_the_hu_window():
    x = torch.linspace(-1500.0, 1500.0, 1000).reshape(10, 10, 10)
    got = intensity_transform("image", "hu", (-1000, 400))(_volume(x))["image"]
    torch.testing.assert_close(got.as_tensor(), HUWindow((-1000, 400))(x[None]))


def test_percentile_setting_maps_the_volumes_own_range_to_0_1():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 20, 20), generator=g).float() * 3.0 + 100.0  # an 8-bit export, rescaled
    got = intensity_transform("image", "percentile")(_volume(x))["image"].as_tensor()
    lo, hi = np.percentile(x.numpy(), PERCENTILES)
    expected = np.clip((x.numpy() - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6)
    assert got.dtype == torch.float32 and got.min() == 0.0 and got.max() == 1.0
    # scale and offset of the stored values do not matter
    again = intensity_transform("image", "percentile")(_volume(x * 0.01 - 7.0))["image"].as_tensor()
    np.testing.assert_allclose(again.numpy(), got.numpy(), atol=1e-5)


def test_zscore_and_none_settings():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 12, 12, generator=g) * 40.0 + 500.0
    z = intensity_transform("image", "zscore")(_volume(x))["image"].as_tensor()
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-3 and z.dtype == torch.float32
    constant = intensity_transform("image", "zscore")(_volume(torch.full((4, 4, 4), 3.0)))["image"].as_tensor()
    assert torch.isfinite(constant).all()  # no division by a zero standard deviation
    mask = torch.zeros(6, 6, 6, dtype=torch.uint8)
    mask[2:4, 2:4, 2:4] = 1
    same = intensity_transform("image", "none")(_volume(mask))["image"]
    assert same.dtype == torch.float32 and torch.equal(same.as_tensor()[0], mask.float())


def test_unknown_setting_is_refused_naming_the_valid_ones():
    for bad in ("HU", "minmax", ""):
        with pytest.raises(ValueError, match="hu, percentile, zscore, none"):
            intensity_transform("image", bad)
    assert check_intensity("zscore") == "zscore" and INTENSITY_MODES[0] == "hu"


@pytest.mark.parametrize(("intensity", "warned"), [("hu", True), ("percentile", False), ("none", False)])
def test_only_the_hu_setting_warns_on_values_that_are_not_hu(tmp_path, caplog, intensity, warned):
    import nibabel as nib

    from volcnn.transforms.volume_cache import volume_transforms

    path = tmp_path / "eight_bit.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 256, (8, 8, 8)).astype(np.uint8), np.eye(4)), path)
    with caplog.at_level("WARNING", logger="volcnn.io.checks"):
        out = volume_transforms("image", intensity=intensity)({"image": str(path)})["image"]
    assert out.shape == (1, 8, 8, 8)
    assert any("eight_bit.nii.gz" in r.getMessage() and "8-bit" in r.getMessage() for r in caplog.records) == warned
