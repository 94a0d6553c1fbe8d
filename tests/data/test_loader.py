"""volcnn's ThreadDataLoader: the batches of a DataLoader, and an error in a batch reaches the consumer."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.data import ThreadDataLoader as MonaiThreadDataLoader

from volcnn.data import ThreadDataLoader


class _Items(Dataset):
    def __init__(self, n: int, bad: int | None = None) -> None:
        super().__init__(list(range(n)))
        self.bad = bad

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError(f"case_{i:03d}.nii.gz: not a NIfTI file")
        return {"image": torch.full((1, 2, 2, 2), float(i)), "label": i % 2}


def _values(batches) -> list[list[float]]:
    return [b["image"][:, 0, 0, 0, 0].tolist() for b in batches]


def test_same_batches_as_a_data_loader():
    ds = _Items(10)
    assert _values(ThreadDataLoader(ds, batch_size=3)) == _values(DataLoader(ds, batch_size=3))


def test_repeats_yield_each_batch_again():
    got = _values(ThreadDataLoader(_Items(4), batch_size=2, repeats=2))
    assert got == [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]


def test_error_in_a_batch_is_raised_not_a_short_epoch():
    loader = ThreadDataLoader(_Items(10, bad=7), batch_size=2)
    seen = []
    with pytest.raises(ValueError, match="case_007.nii.gz: not a NIfTI file"):
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 3  # batches 0-1, 2-3, 4-5; the batch holding item 7 raised


def test_monai_thread_loader_ends_the_epoch_silently_on_the_same_error():
    """Why the subclass exists: MONAI 1.6's loader drops the error and yields a shortened epoch."""
    loader = MonaiThreadDataLoader(_Items(10, bad=7), batch_size=2)
    old = threading.excepthook
    threading.excepthook = lambda args: None  # the dying thread would print the traceback
    try:
        batches = list(loader)
    finally:
        threading.excepthook = old
    assert len(batches) == 3


def test_stopping_early_joins_the_producer():
    loader = ThreadDataLoader(_Items(50), batch_size=1)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert not [t for t in threading.enumerate() if t.name == "volcnn-thread-loader"]
