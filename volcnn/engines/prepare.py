"""``prepare_batch`` for the trainer: move the cached batch to the device, then augment it there in one call.

MONAI's fast-training recipe (cache the deterministic transforms, ``ThreadDataLoader``, random transforms on
the GPU) applied to our chain: the loader only collates cached ``(1, *(patch_size + 2 * margin))`` tensors, and
:class:`~volcnn.transforms.BatchRandAugment` turns the whole batch into augmented ``patch_size`` patches on the
training device. The trainer's ``prepare_batch`` hook is the one place that sees the batch right after the move,
which is why the augmentation lives here and not in the dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

__all__ = ["AugmentOnDevice", "train_random_sources"]


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else t


class AugmentOnDevice(PrepareBatch):
    """A trainer's ``prepare_batch``: ``(batchdata, device, non_blocking, **kwargs) -> (image, label)``.

    Args:
        augment: called on the image batch ``(B, C, *S)`` once it is on ``device``, under ``torch.no_grad()``;
            returns ``(B, C, *patch_size)`` (e.g. :class:`~volcnn.transforms.BatchRandAugment`). ``None``: no
            augmentation (then this is MONAI's default ``prepare_batch`` minus the metadata).
        image_key, label_key: keys of ``batchdata``.
        channels_last: return the image in ``torch.channels_last_3d`` memory format (for networks trained that way).
        features_key: a key of ``batchdata`` holding raw clinical features ``(B, F_raw)`` (NaN = missing); when set
            the batch is ``(image, label, (), {"features": ...})`` so the engine calls ``network(image,
            features=...)`` (multimodal networks, :mod:`volcnn.networks.fusion`).
        features_augment: called on those features ``(B, C)`` on ``device`` (training: e.g.
            :class:`~volcnn.transforms.FeatureDropout`); None: passed as they are.

    A MetaTensor image or label is reduced to its plain tensor before the move: the batch's affine and metadata
    are not used by training, the augmentation changes the geometry anyway, and every op on a MetaTensor pays for
    ``__torch_function__`` and metadata copies.
    """

    def __init__(
        self,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        image_key: str = "image",
        label_key: str = "label",
        channels_last: bool = False,
        features_key: str | None = None,
        features_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.augment = augment
        self.image_key = image_key
        self.label_key = label_key
        self.channels_last = bool(channels_last)
        self.features_key = features_key
        self.features_augment = features_augment

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Returns ``image`` ``(B, C, *patch_size)`` and ``label`` (``(B,)`` class indices, or None) on ``device``;
        with ``features_key``, also ``()`` and ``{"features": (B, F_raw) float32}``."""
        image = _plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = _plain(label).to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            label = None
        if self.augment is not None:
            with torch.no_grad():
                image = self.augment(image)
        if self.channels_last and image.ndim == 5:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        if self.features_key is not None:
            if self.features_key not in batchdata:
                raise KeyError(f"the batch has no {self.features_key!r}: does the datalist declare clinical features?")
            feats = torch.as_tensor(_plain(batchdata[self.features_key])).float()
            feats = feats.to(device=device, non_blocking=non_blocking)
            if self.features_augment is not None:
                feats = self.features_augment(feats)
            return image, label, (), {"features": feats}
        return image, label


def train_random_sources(engine: Any) -> list[Any]:
    """What holds a training run's transform random states: the data loader's dataset transform and the
    engine's ``prepare_batch`` (an :class:`AugmentOnDevice` with a random ``augment``), in that order.

    Pass the list to :func:`volcnn.engines.rng_state.capture_rng` / ``restore_rng`` (it walks lists).
    """
    loader = getattr(engine, "data_loader", None)
    dataset = getattr(loader, "dataset", None)
    return [getattr(dataset, "transform", None), getattr(engine, "prepare_batch", None)]
