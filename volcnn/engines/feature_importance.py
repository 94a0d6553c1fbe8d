"""Permutation feature importance of a trained clinical or fusion run of the bundle, on one datalist section.

:func:`feature_importance_from_workflow` builds the bundle's workflow from its config files and overrides (as
``python -m monai.bundle run`` would), loads the run's best weights (``ckpt_dir/model.pt``, what ``evaluate.json``'s
``load_best`` loads), runs ``validate#dataset``'s deterministic preprocessing over the section once, and computes
:func:`volcnn.explain.features.permutation_importance` over those samples. It lives with the engines because it
runs a bundle workflow; the method itself is in :mod:`volcnn.explain.features`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volcnn.core.atomic import atomic_write_json
from volcnn.explain.features import network_predictor, permutation_importance, plot_feature_importance
from volcnn.models.weights import load_weights

__all__ = ["FEATURE_IMPORTANCE_JSON", "FEATURE_IMPORTANCE_PNG", "feature_importance_from_workflow"]

FEATURE_IMPORTANCE_JSON = "feature_importance.json"
FEATURE_IMPORTANCE_PNG = "feature_importance.png"


def feature_importance_from_workflow(
    config_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    overrides: Mapping[str, Any],
    section: str = "test",
    n_repeats: int = 10,
    seed: int = 0,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    class_index: int = 1,
) -> dict[str, Any]:
    """Permutation importance of each clinical feature for a trained run, on the datalist's ``section``.

    Args:
        config_files: the bundle's configs as for the training run, e.g. ``[train.json, multimodal.json]``.
        overrides: the run's config values (``datalist``, ``dataset_dir``, ``output_dir``, ``modality``,
            ``network_def``, ``patch_size``...), as given to the training run.
        section: the datalist section scored (``validate#section`` is set to it).
        n_repeats, seed: see :func:`~volcnn.explain.features.permutation_importance`.
        out_dir: when given, ``feature_importance.json`` (the result) and ``feature_importance.png`` (the bar chart)
            are written there, atomically.
        class_index: the class scored; a sample's label is positive when it equals ``class_index``.

    Returns:
        :func:`~volcnn.explain.features.permutation_importance`'s result plus ``section``, ``modality`` and
        ``checkpoint`` (the weights' path).

    Raises:
        ValueError: the run's model takes no clinical features (``modality`` image).
        FileNotFoundError: no ``model.pt`` in the run's ``ckpt_dir``.
    """
    from monai.bundle import ConfigWorkflow  # the bundle machinery loads only here

    files = [str(f) for f in ([config_files] if isinstance(config_files, str | os.PathLike) else config_files)]
    workflow = ConfigWorkflow(config_file=files, workflow_type=None, **{**dict(overrides), "validate#section": section})
    workflow.initialize()
    parser = workflow.parser
    spec, modality = parser.get_parsed_content("features"), parser.get_parsed_content("modality")
    if spec is None:
        raise ValueError(f"modality {modality!r}: the model takes no clinical features; nothing to attribute")
    device = parser.get_parsed_content("device")
    checkpoint = Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    network = load_weights(parser.get_parsed_content("network"), checkpoint, device)
    images, raws, labels = [], [], []
    for batch in parser.get_parsed_content("validate#dataloader"):
        images.append(torch.as_tensor(batch["image"]).as_subclass(torch.Tensor).float().cpu())
        raws.append(np.asarray(torch.as_tensor(batch["features"]).float().cpu()))
        labels.append(np.asarray(torch.as_tensor(batch["label"]).reshape(-1).cpu()))
    y = (np.concatenate(labels).astype(np.int64) == int(class_index)).astype(np.int64)
    predict = network_predictor(
        network, torch.cat(images), class_index=class_index, device=device,
        batch_size=int(parser.get_parsed_content("batch_size")),
    )  # fmt: skip
    result = permutation_importance(predict, np.concatenate(raws), y, spec, n_repeats=n_repeats, seed=seed)
    result.update({"section": section, "modality": modality, "checkpoint": str(checkpoint)})
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / FEATURE_IMPORTANCE_JSON, result)
        title = f"{modality} model: permutation importance ({section}, {result['n_samples']} samples)"
        plot_feature_importance(result, out / FEATURE_IMPORTANCE_PNG, title)
    return result
