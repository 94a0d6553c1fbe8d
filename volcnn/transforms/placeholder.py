"""``PlaceholderImaged``: a zero image in place of the CT, for a model that does not look at it.

A clinical-only model (``modality: clinical``) takes ``(image, features)`` like the fusion model, so that one
bundle trains every modality through the same engines, but reads only the image's batch size. Loading and
resampling every CT for it is wasted work: most of a clinical run's time (loading a 512 x 512 x 300 ``.nii.gz`` and
resampling it take about a second on two cores). With
``deterministic_transforms(read_image=False)`` the chain puts this placeholder where the CT would be; nothing opens
the image files.

The placeholder is one zero broadcast to the patch shape (a stride-0 view), so a cached sample holds a single
float; batching (``torch.stack``) makes each batch a real tensor of the usual shape, and the augmentation and the
engines run unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from volcnn.transforms.crop import center_tensor

__all__ = ["PlaceholderImaged"]


class PlaceholderImaged(MapTransform):
    """Replace each key's image path by a zero MetaTensor ``(1, *shape)`` (identity affine, the path kept as its
    ``filename_or_obj``), without reading it.

    ``center`` becomes a float32 tensor ``(3,)`` (NaN without one) as :class:`~volcnn.transforms.crop.CropOrFitd`
    makes it (:func:`~volcnn.transforms.crop.center_tensor`), so that samples collate as they do with images.

    Args:
        keys: the image key(s).
        shape: the spatial shape the real chain would give (``patch_size + 2 * margin``).
        center_key: the candidate centre's key.
    """

    def __init__(self, keys: KeysCollection, shape: Sequence[int], center_key: str = "center") -> None:
        super().__init__(keys)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes, got {shape}")
        self.center_key = center_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            zero = torch.zeros(1, 1, 1, 1).expand(1, *self.shape)
            # the path stays in the metadata, where the loader puts it: predictions.csv names the image as for a CT
            d[key] = MetaTensor(zero, affine=torch.eye(4, dtype=torch.float64), meta={"filename_or_obj": str(d[key])})
        d[self.center_key] = center_tensor(d.get(self.center_key))
        return d
