from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from volcnn.transforms import HUWindow, HUWindowd


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
