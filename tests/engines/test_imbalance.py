from __future__ import annotations

import pytest
import torch

from volcnn.core import as_bool
from volcnn.engines import class_weights


def test_balanced_weights_equalise_class_contributions():
    entries = [{"label": 0}] * 30 + [{"label": 1}] * 10
    w = class_weights(entries, 2, "balanced")
    torch.testing.assert_close(w, torch.tensor([40 / 60, 40 / 20]))
    assert float(w[0] * 30) == pytest.approx(float(w[1] * 10))  # equal total weight per class
    torch.testing.assert_close(class_weights(entries, 2, "sqrt"), w.sqrt())
    assert class_weights(entries, 2, "none") is None


def test_missing_class_gets_zero_and_bad_labels_raise():
    w = class_weights([{"label": 0}] * 4, 3)
    assert w.tolist() == [pytest.approx(4 / 12), 0.0, 0.0]
    with pytest.raises(ValueError, match="outside"):
        class_weights([{"label": 2}], 2)
    with pytest.raises(ValueError, match="not one of"):
        class_weights([{"label": 0}], 2, "inverse")


@pytest.mark.parametrize(
    ("value", "expected"), [("false", False), ("True", True), (0, False), ("1", True), (True, True)]
)
def test_as_bool(value, expected):
    assert as_bool(value) is expected


def test_as_bool_refuses_garbage():
    with pytest.raises(ValueError, match="expected a boolean"):
        as_bool("maybe")
