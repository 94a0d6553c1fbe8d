"""AugmentOnDevice (the trainer's ``prepare_batch``) and the checkpointing of its augmenter's random state."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset, MetaTensor, ThreadDataLoader

from volcnn.engines import AugmentOnDevice, TrainingCheckpointer, VolcnnTrainer, train_random_sources
from volcnn.engines.checkpoint import CheckpointError
from volcnn.engines.rng_state import capture_rng, restore_rng, transform_random_states
from volcnn.transforms import BatchRandAugment

PATCH = (12, 12, 12)
N, BATCH = 8, 4


def _data(n: int = N) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": MetaTensor(torch.rand((1, 16, 16, 16), generator=g)), "label": i % 2} for i in range(n)]


def _augment(seed: int) -> BatchRandAugment:
    aug = BatchRandAugment(PATCH)
    aug.set_random_state(seed=seed)
    return aug


def test_moves_strips_metadata_and_keeps_labels():
    batch = {"image": MetaTensor(torch.rand(2, 1, 8, 8, 8)), "label": torch.tensor([0, 1])}
    image, label = AugmentOnDevice()(batch, torch.device("cpu"))
    assert type(image) is torch.Tensor and torch.equal(image, batch["image"].as_tensor())
    assert torch.equal(label, batch["label"])
    image, label = AugmentOnDevice()({"image": torch.rand(2, 1, 8, 8, 8)}, "cpu")
    assert label is None


def test_augments_without_gradients_and_in_channels_last():
    seen = {}

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen["grad"] = torch.is_grad_enabled()
        seen["type"] = type(x)
        return x[:, :, :4, :4, :4] * 2

    x = torch.rand(2, 1, 8, 8, 8)
    image, _ = AugmentOnDevice(augment, channels_last=True)({"image": MetaTensor(x), "label": torch.zeros(2)})
    assert seen == {"grad": False, "type": torch.Tensor}
    assert image.shape == (2, 1, 4, 4, 4) and image.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(image, x[:, :, :4, :4, :4] * 2)


def test_batch_rand_augment_output():
    batch = {"image": MetaTensor(torch.rand(BATCH, 1, 16, 16, 16)), "label": torch.tensor([0, 1, 0, 1])}
    image, label = AugmentOnDevice(_augment(0))(batch, "cpu")
    assert image.shape == (BATCH, 1, *PATCH) and image.dtype == torch.float32 and not image.requires_grad


def _trainer(ckpt_dir: Path, augment: BatchRandAugment | None, max_epochs: int = 3, init_seed: int = 0):
    torch.manual_seed(init_seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loader = ThreadDataLoader(Dataset(_data()), batch_size=BATCH, shuffle=False, num_workers=0)
    trainer = VolcnnTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(), prepare_batch=AugmentOnDevice(augment),
    )  # fmt: skip
    images: dict[tuple[int, int], torch.Tensor] = {}

    def record(engine) -> None:
        images[(engine.state.epoch, engine.state.iteration)] = engine.state.output[0]["image"].clone()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    ckpt = TrainingCheckpointer(ckpt_dir, {"model": net, "optimizer": opt})
    ckpt.attach(trainer)
    return trainer, ckpt, net, images


def test_train_random_sources_find_the_augmenter():
    aug = _augment(1)
    trainer, *_ = _trainer(Path("unused"), aug)
    states = transform_random_states(train_random_sources(trainer))
    assert any(s is aug.R for s in states)
    assert len(states) == 2 and states[-1] is aug.R  # the dataset's (empty) Compose first, then the augmenter


def test_capture_draw_restore_draw_gives_the_same_augmentation():
    aug = _augment(2)
    trainer, *_ = _trainer(Path("unused"), aug)
    prepare = trainer.prepare_batch
    batch = {"image": torch.rand(BATCH, 1, 16, 16, 16), "label": torch.zeros(BATCH, dtype=torch.long)}
    prepare(batch, "cpu")
    snapshot = capture_rng(train_random_sources(trainer))
    first, _ = prepare(batch, "cpu")
    assert not torch.equal(first, prepare(batch, "cpu")[0])  # the stream moves on
    restore_rng(snapshot, train_random_sources(trainer))
    assert torch.equal(first, prepare(batch, "cpu")[0])


def test_resume_restores_the_augmenter_and_continues_bit_exact(tmp_path):
    """Reference: 3 epochs. Resumed: a fresh trainer whose augmenter is seeded differently continues from the
    epoch-2 checkpoint; its epoch-3 batches and final weights equal the reference's."""
    ref_trainer, _, ref_net, ref_images = _trainer(tmp_path / "ref", _augment(7))
    ref_trainer.run()
    resume_dir = tmp_path / "resumed"
    resume_dir.mkdir()
    shutil.copy(tmp_path / "ref" / "checkpoint_epoch0002.pt", resume_dir)

    trainer, ckpt, net, images = _trainer(resume_dir, _augment(99), init_seed=1)
    assert ckpt.resume(trainer) is False
    trainer.run()
    assert sorted(images) == [(3, 5), (3, 6)]
    for key, image in images.items():
        assert torch.equal(image, ref_images[key]), key
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref_net.state_dict().values(), strict=True))
    # and the augmentation did something: the epochs' batches of the same samples differ
    assert not torch.equal(ref_images[(3, 5)], ref_images[(2, 3)])


def test_resume_without_the_augmenter_is_refused(tmp_path):
    trainer, *_ = _trainer(tmp_path, _augment(3), max_epochs=1)
    trainer.run()
    plain, ckpt, *_ = _trainer(tmp_path, None, max_epochs=2)
    with pytest.raises(CheckpointError, match="augmentation chain changed"):
        ckpt.resume(plain)


def test_metatensor_and_plain_batches_augment_identically():
    x = torch.rand(BATCH, 1, 16, 16, 16)
    a, b = _augment(5), _augment(5)
    out_plain = a(x)
    out_meta = b(MetaTensor(x))
    assert torch.equal(out_plain, out_meta) and np.array_equal(a.params.angles, b.params.angles)
