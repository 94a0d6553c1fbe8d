"""Explanations of findings: Grad-CAM / Grad-CAM++ / occlusion saliency on the classifier's patch, written on the
input's own grid (NIfTI) and as a PNG of three orthogonal slices; in volume mode one map for the whole volume
(:func:`explain_volume`). Clinical features get per-feature attributions (:mod:`volcnn.explain.features`: one
prediction with each feature left out in turn, and permutation importance over a labelled set).

Typical use, for the top findings of one case::

    from volcnn.explain import explain_findings

    explain_findings("scan.nii.gz", runner.network, runner, doc["findings"], "out/scan", top=3)
"""

from __future__ import annotations

from volcnn.explain.cam import (
    EXPLAIN_METHODS,
    MIN_CAM_GRID,
    PADDING_MODES,
    Explainer,
    Explanation,
    candidate_layers,
    crop_patch,
    default_target_layer,
    explain_finding,
    log_odds,
)
from volcnn.explain.features import (
    network_predictor,
    occlusion_attributions,
    permutation_importance,
    plot_feature_importance,
)
from volcnn.explain.output import (
    METHOD_LABELS,
    explain_findings,
    paste_to_grid,
    write_explanation,
)
from volcnn.explain.render import render_explanation_png, to_ras
from volcnn.explain.volume import VOLUME_EXPLANATION_NAME, explain_volume, write_volume_explanation

__all__ = [
    "EXPLAIN_METHODS",
    "METHOD_LABELS",
    "MIN_CAM_GRID",
    "PADDING_MODES",
    "VOLUME_EXPLANATION_NAME",
    "Explainer",
    "Explanation",
    "candidate_layers",
    "crop_patch",
    "default_target_layer",
    "explain_finding",
    "explain_findings",
    "explain_volume",
    "log_odds",
    "network_predictor",
    "occlusion_attributions",
    "paste_to_grid",
    "permutation_importance",
    "plot_feature_importance",
    "render_explanation_png",
    "to_ras",
    "write_explanation",
    "write_volume_explanation",
]
