"""Under ``multi_gpu_train.json`` every rank draws its own augmentations (gloo, two spawned processes).

DDP averages the gradients of the ranks' batches; if the ranks augmented with the same random stream, the run
would see fewer distinct augmentations than a single process on the same number of samples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from tests.distributed.two_ranks import on_two_ranks

pytestmark = pytest.mark.dist

CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "lung_nodule_ct_classification" / "configs"
SMALL = {"patch_size": [16, 16, 16], "margin": 2, "device": "cpu", "amp": False, "progress": False}


def _augmented(overlays: list[str], batch: torch.Tensor) -> torch.Tensor:
    """Run the bundle's ``initialize`` (seeding) and put ``batch`` through its ``train#prepare_batch``."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in ["train.json", *overlays]])
    parser.update(SMALL)
    parser.parse()
    parser.get_parsed_content("initialize")
    prepare = parser.get_parsed_content("train#prepare_batch")
    image, _ = prepare({"image": batch.clone()}, torch.device("cpu"))
    return image


def _streams(rank: int) -> dict[str, torch.Tensor]:
    batch = torch.arange(4 * 20**3, dtype=torch.float32).reshape(4, 1, 20, 20, 20) / 1000.0
    return {
        "ddp": _augmented(["multi_gpu_train.json"], batch),
        "single": _augmented([], batch),  # the one-process seeding, on both ranks
    }


def test_each_rank_augments_with_its_own_stream(tmp_path):
    r0, r1 = on_two_ranks(_streams, tmp_path)
    assert r0["ddp"].shape == (4, 1, 16, 16, 16)
    assert torch.equal(r0["single"], r1["single"])  # same seed, same draws: the augmentation is seeded ...
    assert torch.equal(r0["ddp"], r0["single"])  # ... rank 0 keeps the single-process stream ...
    assert not torch.equal(r0["ddp"], r1["ddp"])  # ... and rank 1 draws its own
