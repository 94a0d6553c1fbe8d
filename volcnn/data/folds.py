"""Cross-validation folds of a datalist: patient-grouped and stratified (scikit-learn's ``StratifiedGroupKFold``).

Only the ``training`` and ``validation`` sections are pooled and split; the ``test`` section is never read into a
fold. A patient is an entry's ``patient`` when it has one, else its image's case name, so that every candidate of a
CT, and every CT of a patient, falls into one fold. Stratification is by entry label, so in candidate mode the
folds keep the datalist's mix of nodules and non-nodules as well as the grouping allows.

Fold ``i`` of ``k`` (:func:`fold_datalist`): its ``test`` is fold ``i`` (the out-of-fold predictions come from it),
its ``validation`` fold ``(i + 1) mod k`` (best epoch, early stopping, calibration and threshold), its
``training`` the other ``k - 2`` folds. The fold that scores a model never chose its epoch or calibration, so the
pooled out-of-fold figures are unbiased by model selection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from volcnn.core.errors import UsageError
from volcnn.io.sources import case_name

__all__ = ["assign_folds", "fold_datalist", "patient_of"]


def patient_of(entry: Mapping[str, Any]) -> str:
    """The patient an entry belongs to: its ``patient``, else its image's case name."""
    patient = entry.get("patient")
    return str(patient) if patient not in (None, "") else case_name(str(entry["image"]))


def assign_folds(entries: Sequence[Mapping[str, Any]], k: int, seed: int = 0) -> list[int]:
    """The fold (0..k-1) of each entry: patient-grouped, stratified by label, deterministic for a seed.

    Raises:
        UsageError: ``k`` below 3 (a fold needs other folds for training and validation), fewer patients than
            ``k``, or a class held by fewer than ``k`` patients (some fold could not score it).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 3:
        raise UsageError(f"k must be at least 3 (each fold needs one fold to validate on and one to train on), got {k}")
    labels = np.asarray([int(e.get("label", 0)) for e in entries])
    groups = np.asarray([patient_of(e) for e in entries])
    if len(set(groups.tolist())) < k:
        raise UsageError(f"{len(set(groups.tolist()))} patients cannot make {k} folds")
    for label in sorted(set(labels.tolist())):
        holders = len(set(groups[labels == label].tolist()))
        if holders < k:
            raise UsageError(f"class {label} is held by {holders} patient(s); {k} folds need at least {k}")
    folds = np.full(len(entries), -1)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(entries)), labels, groups)):
        folds[held] = fold
    return folds.tolist()


def fold_datalist(
    raw: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], folds: Sequence[int], fold: int, k: int, seed: int
) -> dict[str, Any]:
    """The datalist of fold ``fold``: ``raw``'s other keys (labels, features...), ``entries`` split as in the module
    docstring (``raw``'s own ``test`` section is left out), and ``"crossval": {"fold", "k", "seed"}``."""
    validation = (fold + 1) % k
    split: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for entry, f in zip(entries, folds, strict=True):
        section = "test" if f == fold else "validation" if f == validation else "training"
        split[section].append(dict(entry))
    others = {key: value for key, value in raw.items() if key not in ("training", "validation", "test")}
    return {**others, **split, "crossval": {"fold": fold, "k": k, "seed": seed}}
