"""RocAuc (train_auc / val_auc): the evaluation's scikit-learn AUC over an epoch's outputs, as MONAI's ROCAUC was."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import from_engine
from monai.metrics import compute_roc_auc
from sklearn.metrics import roc_auc_score

from volcnn.engines import RocAuc
from volcnn.evaluation import mean_ovr_auc


def _outputs(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``(n, k)`` float32 with signal, and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, k)
    return torch.softmax(logits, dim=1), labels


def _batches(probs: torch.Tensor, labels: torch.Tensor, batch_size: int = 4) -> list[list[dict[str, torch.Tensor]]]:
    """Decollated batches as a MONAI evaluator's output holds them: lists of ``{"pred", "label" (one-hot)}``."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).float()
    items = [{"pred": p, "label": y} for p, y in zip(probs, onehot, strict=True)]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _engine() -> Engine:
    engine = Engine(lambda engine, batch: batch)
    RocAuc(output_transform=from_engine(["pred", "label"])).attach(engine, "val_auc")
    return engine


def _run(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return _engine().run(_batches(probs, labels), max_epochs=1).metrics["val_auc"]


@pytest.mark.parametrize("k", [2, 3])
def test_auc_of_an_epoch_is_sklearns_and_monais_definition(k):
    probs, labels = _outputs(101, k, seed=k)
    value = _run(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, k)
    assert value == mean_ovr_auc(probs, labels)
    assert value == roc_auc_score(onehot.numpy(), probs.double().numpy(), average="macro")
    assert value == pytest.approx(float(compute_roc_auc(probs, onehot)), abs=1e-12)  # MONAI's ROCAUC figure
    assert 0.6 < value < 1.0


def test_each_run_starts_afresh():
    """A validator runs its engine once per training epoch: each run's AUC is over that run's cases only."""
    probs, labels = _outputs(40, 2, seed=5)
    engine = _engine()
    first = engine.run(_batches(probs, labels), max_epochs=1).metrics["val_auc"]
    second = engine.run(_batches(probs.flip(1), labels), max_epochs=1).metrics["val_auc"]  # every ranking reversed
    assert first == pytest.approx(_run(probs, labels), abs=0) and first > 0.7
    assert second == pytest.approx(1 - first, abs=1e-12)


def test_one_class_epoch_gives_nan_with_a_warning():
    probs, _ = _outputs(12, 2, seed=6)
    with pytest.warns(UserWarning, match="undefined for classes"):
        value = _run(probs, torch.zeros(12, dtype=torch.long))
    assert math.isnan(value)


def test_bad_scores_still_raise():
    probs, labels = _outputs(12, 2, seed=7)
    probs[3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _run(probs, labels)


def test_positive_class_scores_of_shape_n():
    probs, labels = _outputs(30, 2, seed=8)
    metric = RocAuc()
    metric.reset()
    metric.update((probs[:, 1:], labels[:, None].float()))  # (N, 1) outputs are squeezed to (N,) by Ignite
    assert metric.compute() == roc_auc_score(labels.numpy(), probs[:, 1].double().numpy())
