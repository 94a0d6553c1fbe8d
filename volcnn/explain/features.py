"""Per-feature attributions of a clinical or fusion network: how much each clinical feature moved a prediction
(one case, occlusion) and how much the model's ranking relies on it (a cohort, permutation importance).

Both methods are *model-agnostic*: they only call the network, never read its gradients or weights, so they work the
same for the clinical MLP, late (``concat``) and FiLM fusion, and ensembles of them.

**Occlusion of one feature** (:func:`occlusion_attributions`) is the "leave-one-covariate-out" (LOCO) idea of Lei et
al., *Distribution-free predictive inference for regression* (JASA 2018), applied to one prediction: the attribution
of feature ``f`` is ``p(all values) - p(f missing)``. Setting a value *missing* (NaN) is what the network already
handles: it imputes the value from the case's other values (its conditional mean under the training covariance; the
training mean where nothing correlates) and raises the feature's missingness indicator
(:class:`~volcnn.networks.tabular.FeatureNormalizer`), so no retraining and no choice of baseline are needed, and the
number has an exact meaning: *how far knowing this value moved the probability away from what the model says when
the value is unknown*. It costs ``F + 1`` forward passes, batched into one call. The attributions need not sum to
``p - p(all missing)`` (features interact); a feature already missing gets 0.

In ``findings.json`` (``volcnn infer --explain N`` with a clinical or fusion model) each explained finding has
``feature_attributions`` ``{name: value}`` (4 decimals), computed on the window centred at it, on the scale of its
``probability``: calibrated when the model is; with ``--tta`` averaged over the window mirrored along each axis, as
refined findings are scored (a heat map without refinement mirrors the volume instead). In volume mode the
attributions of the fitted volume are the top-level ``feature_attributions``, on the scale of ``score`` (uncalibrated).

**Permutation importance** (:func:`permutation_importance`, Breiman 2001; Fisher, Rudin and Dominici 2019) is the
drop in ROC AUC over a labelled set when one feature's values are shuffled across the samples (all its one-hot
columns together, its missing values with them): the share of the model's discrimination that relies on that
feature. It is averaged over ``n_repeats`` shuffles drawn from ``seed``.

:func:`network_predictor` turns a network and its images into the ``predict(raw) -> probabilities`` both methods
take; for a :class:`~volcnn.networks.FusionClassifier` the image trunk runs once per image, not once per call.
:func:`finding_feature_attributions` and :func:`patch_feature_attributions` are what ``volcnn infer --explain`` uses.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from volcnn.explain.cam import crop_patch
from volcnn.io.features import FeatureSpec, parse_feature_spec
from volcnn.networks.fusion import FusionClassifier
from volcnn.networks.introspect import unwrap

__all__ = [
    "Predictor",
    "finding_feature_attributions",
    "network_predictor",
    "occlusion_attributions",
    "patch_feature_attributions",
    "permutation_importance",
    "plot_feature_importance",
]

#: ``predict(raw (M, C) float32, NaN = missing) -> probabilities (M,)`` of the class of interest
Predictor = Callable[[np.ndarray], np.ndarray]


def _raw_matrix(raw: Any, spec: FeatureSpec, name: str = "raw") -> np.ndarray:
    out = np.asarray(raw, dtype=np.float32)
    if out.ndim != 2 or out.shape[1] != spec.n_columns:
        raise ValueError(f"{name} must be (N, {spec.n_columns}) raw features, got shape {out.shape}")
    return out


def _probabilities(predict: Predictor, raw: np.ndarray) -> np.ndarray:
    p = np.asarray(predict(raw), dtype=np.float64)
    if p.shape != (raw.shape[0],) or not np.isfinite(p).all():
        raise ValueError(
            f"predict gave {p.shape} values (finite: {bool(np.isfinite(p).all())}) for {raw.shape[0]} rows"
        )
    return p


def _is_missing(raw: np.ndarray, spec: FeatureSpec, name: str) -> np.ndarray:
    """Per row of ``raw`` ``(N, C)``: feature ``name`` is missing (all its columns NaN, as the encoding writes it)."""
    return np.isnan(raw[:, spec.column_slice(name)]).all(axis=1)


def occlusion_attributions(
    predict: Predictor, raw: np.ndarray, spec: FeatureSpec | Mapping[str, Any]
) -> dict[str, float]:
    """Leave-one-feature-out attribution of one prediction (see the module's docstring).

    Args:
        predict: ``predict(raw (M, C)) -> (M,)`` probabilities of the class of interest, every row for the same
            image(s) (:func:`network_predictor`).
        raw: one sample's raw encoding ``(C,)`` (:meth:`FeatureSpec.encode`: NaN where missing).
        spec: the declared features.

    Returns:
        ``{name: p(all values) - p(name set missing)}`` for every declared feature, in declaration order; positive:
        the value raised the probability above what the network gives with it imputed from the other values. A
        feature already missing gets 0.0 (the case's ``features`` record in ``findings.json`` lists it under
        ``missing``).

    Raises:
        ValueError: ``raw`` is not ``(C,)``, or ``predict`` does not give one finite value per row.
    """
    spec = parse_feature_spec(spec)
    row = np.asarray(raw, dtype=np.float32)
    if row.shape != (spec.n_columns,):
        raise ValueError(f"raw must be one sample's ({spec.n_columns},) raw features, got shape {row.shape}")
    present = [n for n in spec.names if not _is_missing(row[None], spec, n)[0]]
    variants = np.repeat(row[None], 1 + len(present), axis=0)
    for i, name in enumerate(present, start=1):
        variants[i, spec.column_slice(name)] = np.nan
    p = _probabilities(predict, variants)  # one call: the F + 1 variants together
    out = dict.fromkeys(spec.names, 0.0)
    for i, name in enumerate(present, start=1):
        out[name] = float(p[0] - p[i])
    return out


def permutation_importance(
    predict: Predictor,
    raw: np.ndarray,
    labels: np.ndarray | Sequence[int],
    spec: FeatureSpec | Mapping[str, Any],
    *,
    n_repeats: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Drop in ROC AUC when each feature is shuffled across the samples (see the module's docstring).

    Args:
        predict: ``predict(raw (N, C)) -> (N,)``: row ``i`` scored with sample ``i``'s image (:func:`network_predictor`
            over the samples' images).
        raw: the samples' raw features ``(N, C)`` (NaN = missing).
        labels: ``(N,)`` 0/1, both present.
        spec: the declared features.
        n_repeats: shuffles per feature.
        seed: of the shuffles (``numpy.random.default_rng``); the same seed gives the same result.

    Returns:
        ``{"metric": "roc_auc", "baseline": AUC of the unshuffled data, "n_samples", "n_repeats", "seed",
        "features": {name: {"mean", "std", "drops": [n_repeats], "missing_fraction"}}}``: ``mean`` / ``std``
        (population) of ``baseline - AUC(shuffled)`` over the repeats, in declaration order.

    Raises:
        ValueError: bad shapes, ``n_repeats < 1``, or labels of one class only.
    """
    from volcnn.evaluation.classification import roc_auc  # evaluation code loads only when used

    spec = parse_feature_spec(spec)
    x = _raw_matrix(raw, spec)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},), got shape {y.shape}")
    if int(n_repeats) < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    baseline = roc_auc(_probabilities(predict, x), y)
    rng = np.random.default_rng(int(seed))
    drops: dict[str, list[float]] = {n: [] for n in spec.names}
    for _ in range(int(n_repeats)):
        for name in spec.names:
            cols = spec.column_slice(name)
            shuffled = x.copy()
            shuffled[:, cols] = x[rng.permutation(x.shape[0]), cols]
            drops[name].append(baseline - roc_auc(_probabilities(predict, shuffled), y))
    return {
        "metric": "roc_auc",
        "baseline": float(baseline),
        "n_samples": int(x.shape[0]),
        "n_repeats": int(n_repeats),
        "seed": int(seed),
        "features": {
            n: {
                "mean": float(np.mean(d)),
                "std": float(np.std(d)),
                "drops": [float(v) for v in d],
                "missing_fraction": float(_is_missing(x, spec, n).mean()),
            }
            for n, d in drops.items()
        },
    }


class _Lookup(nn.Module):
    """Stands in for a fusion network's trunk: ``forward(index (B,))`` gives the trunk outputs computed beforehand."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.maps[index]


def _without_trunk(net: FusionClassifier, maps: torch.Tensor) -> FusionClassifier:
    """A shallow copy of ``net`` (the same parameters, its own module table) whose trunk returns ``maps[index]``;
    its ``forward(index, features)`` is ``net``'s own forward, so the fusion itself is exactly the network's."""
    fast = copy.copy(net)
    fast._modules = dict(net._modules)
    fast.trunk = _Lookup(maps)
    return fast


def network_predictor(
    network: nn.Module,
    images: torch.Tensor,
    *,
    class_index: int = 1,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    flips: bool = False,
    calibration: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Predictor:
    """``predict(raw)`` for :func:`occlusion_attributions` / :func:`permutation_importance` from a multimodal network.

    Args:
        network: ``network(image, features=raw)`` -> logits ``(B, K)`` (a clinical or fusion network, or an
            ensemble of them), in eval mode; not modified.
        images: ``(N, C_img, X, Y, Z)``: row ``i`` of ``raw`` is scored with image ``i``; or ``(1, ...)``: every row
            with the one image (one case's window).
        class_index: the softmax class whose probability is returned.
        device: where the network runs (default: its parameters').
        batch_size: rows per forward pass.
        flips: average the class probabilities over the image and its mirror along each spatial axis, as
            ``InferenceRunner(flips=True)`` does for its heat map.
        calibration: applied to the probabilities (e.g. :meth:`volcnn.models.Calibration.apply`), as the findings'
            probabilities are reported.

    Returns:
        ``predict(raw (M, C)) -> float64 (M,)`` with ``M == N`` (or any ``M`` for one image). For a
        :class:`~volcnn.networks.FusionClassifier` the trunk's outputs are computed once here (per flip) and every
        call runs only the tabular branch, the fusion and the head: the features never reach the trunk.

    Raises:
        ValueError: ``network`` is in training mode (dropout would make attributions random) or ``images`` is not 5D.
    """
    net = unwrap(network)
    if net.training:
        raise ValueError("the network is in training mode: call .eval() first (dropout would randomise attributions)")
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    x = torch.as_tensor(images).as_subclass(torch.Tensor).to(torch.float32)
    if x.ndim != 5:
        raise ValueError(f"images must be (N, C, X, Y, Z), got shape {tuple(x.shape)}")
    views = [x, x.flip(2), x.flip(3), x.flip(4)] if flips else [x]
    n_img, step = int(x.shape[0]), max(1, int(batch_size))
    # per view: (the module called, the images it takes; None: the window indices, for the fusion network whose
    # trunk outputs, computed here once, stand in for the images)
    runs: list[tuple[nn.Module, torch.Tensor | None]] = []
    with torch.inference_mode():
        for view in views:
            if isinstance(net, FusionClassifier):
                maps = torch.cat([net.trunk(view[i : i + step].to(device)) for i in range(0, n_img, step)])
                runs.append((_without_trunk(net, maps), None))
            else:
                runs.append((net, view))

    def predict(raw: np.ndarray) -> np.ndarray:
        rows = torch.as_tensor(np.asarray(raw, dtype=np.float32))
        if rows.ndim != 2 or (n_img != 1 and rows.shape[0] != n_img):
            raise ValueError(f"raw features of shape {tuple(rows.shape)} for {n_img} image(s)")
        out = []
        with torch.inference_mode():
            for start in range(0, rows.shape[0], step):
                feats = rows[start : start + step].to(device)
                idx = (
                    torch.arange(start, start + feats.shape[0])
                    if n_img > 1
                    else torch.zeros(feats.shape[0], dtype=torch.long)
                )
                logits = [
                    module(idx.to(device) if view is None else view[idx].to(device), features=feats).float()
                    for module, view in runs
                ]
                p = torch.stack([torch.softmax(z, dim=1) for z in logits]).mean(0)
                out.append(p[:, class_index].cpu())
        probs = torch.cat(out).double().numpy()
        return np.asarray(calibration(probs), dtype=np.float64) if calibration is not None else probs

    return predict


def patch_feature_attributions(
    network: nn.Module,
    patch: torch.Tensor,
    raw: np.ndarray,
    spec: FeatureSpec | Mapping[str, Any],
    *,
    class_index: int = 1,
    device: str | torch.device | None = None,
    flips: bool = False,
    calibration: Callable[[np.ndarray], np.ndarray] | None = None,
    decimals: int = 4,
) -> dict[str, float]:
    """:func:`occlusion_attributions` of the window ``patch`` ``(C_img, X, Y, Z)`` the classifier scored, with the
    case's raw features ``raw`` ``(C,)``, rounded to ``decimals`` (see :func:`network_predictor` for the rest)."""
    predict = network_predictor(
        network, torch.as_tensor(patch)[None], class_index=class_index, device=device, flips=flips,
        calibration=calibration,
    )  # fmt: skip
    return {k: round(v, decimals) for k, v in occlusion_attributions(predict, raw, spec).items()}


def finding_feature_attributions(
    network: nn.Module,
    image: torch.Tensor,
    centers_ras_mm: Sequence[Sequence[float]],
    patch_size: Sequence[int],
    raw: np.ndarray,
    spec: FeatureSpec | Mapping[str, Any],
    *,
    class_index: int = 1,
    device: str | torch.device | None = None,
    flips: bool = False,
    calibration: Callable[[np.ndarray], np.ndarray] | None = None,
    decimals: int = 4,
) -> list[dict[str, float]]:
    """Per finding, :func:`patch_feature_attributions` of the window centred on it, cut from the preprocessed
    ``image`` (MetaTensor ``(1, X, Y, Z)``) as inference and Grad-CAM cut it (:func:`~volcnn.explain.crop_patch`,
    border voxels replicated), so ``p(all values)`` is the probability the heat map recorded there.

    Returns:
        One ``{name: attribution}`` per centre, in order.
    """
    out = []
    for center in centers_ras_mm:
        patch, _ = crop_patch(image, np.asarray(center, dtype=np.float64), patch_size)
        out.append(
            patch_feature_attributions(
                network,
                patch,
                raw,
                spec,
                class_index=class_index,
                device=device,
                flips=flips,
                calibration=calibration,
                decimals=decimals,
            )  # fmt: skip
        )
    return out


def plot_feature_importance(
    result: Mapping[str, Any], path: str | os.PathLike[str], title: str = "Feature importance"
) -> Path:
    """Horizontal bar chart of per-feature importance, the largest on top, written atomically as PNG.

    Args:
        result: :func:`permutation_importance`'s result (bars: ``mean``, error bars: ``std``), or a plain
            ``{name: value}`` (:func:`occlusion_attributions`; no error bars).
        path: the PNG.
        title: the figure's title.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib loads only to draw
    from matplotlib.figure import Figure

    from volcnn.core.atomic import atomic_write_bytes

    features = result.get("features", result)
    names = list(features)
    if isinstance(result.get("features"), Mapping):
        means = np.asarray([float(features[n]["mean"]) for n in names])
        stds: np.ndarray | None = np.asarray([float(features[n].get("std", 0.0)) for n in names])
        label = f"drop in {'ROC AUC' if result.get('metric', 'roc_auc') == 'roc_auc' else result['metric']} when "
        label += f"shuffled (mean \u00b1 std over {result.get('n_repeats', '?')} repeats)"
    else:
        means, stds, label = np.asarray([float(features[n]) for n in names]), None, "attribution (probability)"
    order = np.argsort(means, kind="stable")  # barh draws the first bar at the bottom
    fig = Figure(figsize=(6.0, 1.2 + 0.38 * max(1, len(names))), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(
        np.arange(len(names)), means[order], xerr=None if stds is None else stds[order], color="#4c72b0",
        ecolor="#333333", capsize=3,
    )  # fmt: skip
    ax.set_yticks(np.arange(len(names)), [str(names[i]).replace("$", r"\$") for i in order])
    ax.axvline(0.0, color="#555555", linewidth=0.8)
    ax.set_xlabel(label)
    ax.set_title(str(title).replace("$", r"\$"))
    ax.grid(axis="x", alpha=0.3)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120, facecolor="white")
    finally:
        fig.clear()
    return atomic_write_bytes(path, buf.getvalue())
