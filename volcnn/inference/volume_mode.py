"""Volume-mode inference: one prediction per input for a model trained on whole volumes (datalist entries without
``center``).

Such a model never saw a window of a CT: training and evaluation fitted each whole preprocessed volume into
``patch_size`` (:class:`~volcnn.transforms.FitVolume`, through :class:`~volcnn.transforms.CropOrFitd`). A heat map
of windows would ask it about inputs unlike anything it learned from, so here each input goes through exactly the
chain evaluation used for an entry without ``center`` (:func:`~volcnn.transforms.evaluation_transforms`: load, RAS,
``pixdim``, HU window, fit with ``margin``, centre crop) and the network runs once on the fitted volume. The
probabilities therefore equal those of the ``evaluate.json`` overlay for the same weights (run in float32).

Per case, written atomically (``findings.json`` last, so it exists only for a finished case)::

    OUT/<case>/findings.json                  mode "volume", score (probability of class_index), probabilities
                                              (all K classes), findings [] (nothing spatial), model, input sha256,
                                              settings, and with --explain the explanation's files
    OUT/<case>/volume_<method>.nii.gz, .png   with --explain only: the saliency of the whole volume on the input's
                                              grid (:func:`~volcnn.explain.explain_volume`)

There is no ``heatmap.nii.gz``: the model gives no spatial probability. :class:`VolumeModeProcessor` does one case;
:class:`~volcnn.inference.InferenceRunner` keeps the batch (resume, failures, ``summary.csv``) and hands it each case
when its ``mode`` is ``"volume"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from volcnn.core.atomic import atomic_write_json
from volcnn.explain.volume import VOLUME_EXPLANATION_NAME, explain_volume
from volcnn.io.input_hash import input_sha256
from volcnn.io.volume import load_volume
from volcnn.transforms.chains import evaluation_transforms
from volcnn.transforms.intensity import check_intensity
from volcnn.transforms.volume_cache import preprocess_loaded

__all__ = ["VolumeModeProcessor"]


class VolumeModeProcessor:
    """Classifies whole volumes the way a volume-mode model was evaluated, and writes each case's outputs.

    Args:
        network: classifier ``(B, 1, *patch_size)`` -> logits ``(B, K)``, already on ``device`` in eval mode.
        patch_size: the network's input size; the whole volume is fitted into it.
        pixdim: voxel size (mm) of the preprocessing, as in training.
        hu_window: HU window of the preprocessing, as in training (``intensity="hu"``).
        intensity: the intensity setting of the preprocessing, as in training.
        margin: the training chain's margin (it does not change a fitted volume; kept so the chain is the same).
        device: where the network runs.
        class_index: the class whose probability is the ``score``.
        model_info: ``{"name", "version", "sha256"}`` recorded in every ``findings.json``.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        patch_size: Sequence[int],
        pixdim: Sequence[float],
        hu_window: Sequence[float],
        margin: int,
        intensity: str = "hu",
        device: torch.device,
        class_index: int,
        model_info: Mapping[str, Any],
    ) -> None:
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pixdim = tuple(float(p) for p in pixdim)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.intensity = check_intensity(intensity)
        self.margin = int(margin)
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.device = device
        self.class_index = int(class_index)
        self.model_info = dict(model_info)
        self.chain = evaluation_transforms(
            self.pixdim, self.hu_window, self.patch_size, self.margin, cache_size=0, intensity=self.intensity
        )

    @property
    def settings(self) -> dict[str, Any]:
        """Everything besides the input and the model that a volume-mode output depends on (JSON types)."""
        settings = {
            "mode": "volume",
            "patch_size": self.patch_size,
            "pixdim": self.pixdim,
            "intensity": self.intensity,
            "hu_window": self.hu_window,
            "margin": self.margin,
            "class_index": self.class_index,
        }
        normalised: dict[str, Any] = json.loads(json.dumps(settings))
        return normalised

    def fit(self, volume: Any) -> MetaTensor:
        """The network's input for a loaded :class:`~volcnn.io.Volume` (or a one-item list holding it, emptied
        as in :func:`~volcnn.transforms.preprocess_loaded`): MetaTensor ``(1, *patch_size)`` in [0, 1] with its
        exact affine (patch index -> world RAS mm)."""
        return preprocess_loaded(self.chain, volume)

    def probabilities(self, patch: torch.Tensor) -> np.ndarray:
        """Softmax probabilities ``(K,)`` (float64 holding the float32 values) of one fitted volume ``(1, *patch)``.

        Raises:
            ValueError: the network does not give logits ``(1, K)`` with ``class_index < K``.
        """
        x = torch.as_tensor(patch).as_subclass(torch.Tensor)[None].to(self.device, torch.float32)
        with torch.inference_mode():
            logits = self.network(x)
        if logits.ndim != 2 or logits.shape[0] != 1 or not 0 <= self.class_index < logits.shape[1]:
            raise ValueError(
                f"the network gave output of shape {tuple(logits.shape)} for one volume; expected logits (1, K) "
                f"with K > class_index {self.class_index}"
            )
        return torch.softmax(logits.float(), dim=1)[0].cpu().numpy().astype(np.float64)

    def explanation_file(self, method: str) -> str:
        """File name of the volume's saliency map for ``method`` (``volume_<method>.nii.gz``)."""
        return f"{VOLUME_EXPLANATION_NAME}_{method}.nii.gz"

    def process(
        self,
        path: str | os.PathLike[str],
        case_dir: Path,
        case: str,
        digest: str | None = None,
        *,
        explain: bool = False,
        explain_method: str = "gradcam",
        explain_layer: str | None = None,
        extra: dict[str, Any] | None = None,
        attribute: Callable[[MetaTensor], dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Classify one input and write ``case_dir/findings.json`` (after the explanation when ``explain``).

        Args:
            path: the input (NIfTI, MetaImage, DICOM series folder).
            case_dir: its output folder.
            case: its case name.
            digest: :func:`~volcnn.io.input_sha256` of ``path`` when already known.
            explain: also write the volume's explanation (``volume_<method>.nii.gz`` and ``.png``).
            explain_method: ``gradcam``, ``gradcampp`` or ``occlusion``.
            explain_layer: Grad-CAM layer (default per network).
            extra: further top-level keys of ``findings.json`` (the case's ``features`` record).
            attribute: ``attribute(fitted volume (1, *patch_size)) -> {feature: attribution}``, written as
                ``feature_attributions`` (the runner gives it with ``--explain`` for a network taking features).

        Returns:
            ``{"case", "score", "n_findings": 0, "max_probability"}`` (``max_probability`` is the score: the
            volume's probability of ``class_index``), for the runner's summary.
        """
        vol = load_volume(path, expect_hu=self.intensity == "hu")
        digest = digest or input_sha256(path)
        ct, affine = (vol.array if explain else None), vol.affine.copy()
        handed = [vol]
        del vol  # without --explain nothing keeps the full-resolution array once the chain's loader has it
        patch = self.fit(handed)
        probs = self.probabilities(patch)
        score = float(probs[self.class_index])
        doc: dict[str, Any] = {
            "case": case,
            "mode": "volume",
            "score": score,
            "class_index": self.class_index,
            "probabilities": [float(p) for p in probs],
            "findings": [],
            "model": self.model_info,
            "input_sha256": digest,
            "settings": self.settings,
        }
        if explain:
            assert ct is not None
            doc["explanations"] = [
                explain_volume(
                    patch,
                    self.network,
                    ct,
                    affine,
                    case_dir,
                    method=explain_method,
                    class_index=self.class_index,
                    target_layer=explain_layer,
                    device=self.device,
                    probability=score,
                )
            ]
        if attribute is not None:
            doc["feature_attributions"] = attribute(patch)
        doc.update(extra or {})
        atomic_write_json(Path(case_dir) / "findings.json", doc)
        return {"case": case, "score": score, "n_findings": 0, "max_probability": score}

    def finished(self, case_dir: Path, digest: str, explain_method: str | None = None) -> dict[str, Any] | None:
        """The summary of an earlier volume-mode run of this case with the same input, model and settings (and,
        when ``explain_method`` is given, with that explanation written), or None."""
        findings = Path(case_dir) / "findings.json"
        if not findings.is_file() or self.model_info.get("sha256") is None:
            return None
        if explain_method is not None and not (Path(case_dir) / self.explanation_file(explain_method)).is_file():
            return None
        try:
            doc = json.loads(findings.read_text())
            same = (
                doc.get("mode") == "volume"
                and doc.get("input_sha256") == digest
                and (doc.get("model") or {}).get("sha256") == self.model_info["sha256"]
                and doc.get("settings") == self.settings
            )
            if not same:
                return None
            score = float(doc["score"])
            return {"case": str(doc["case"]), "score": score, "n_findings": 0, "max_probability": score}
        except (OSError, ValueError, KeyError, TypeError):
            return None
