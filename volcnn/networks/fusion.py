"""Image + clinical fusion over any registry network that splits into a convolutional trunk
(:func:`~volcnn.networks.families.split_trunk_head`), and the factory for all three modalities.

Two ways to join the branches (``fusion``):

* ``concat`` (late fusion): the trunk's globally pooled features ``(B, C')`` and the tabular embedding ``(B, H)``
  are concatenated and a linear layer gives the logits;
* ``film`` (feature-map conditioning, as DAFT / FiLM): the tabular embedding predicts a per-channel scale and shift
  of the trunk's last feature map, ``relu((1 + gamma) * f + beta)``, before pooling and the linear layer; the clinical
  data then decide *which image features matter*, not only how much the sum moves. The conditioning starts as the
  identity (zero-initialised), so training starts from the image model's behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from volcnn.io.features import FeatureSpec
from volcnn.networks.families import split_trunk_head
from volcnn.networks.introspect import detached_copy
from volcnn.networks.registry import create_network
from volcnn.networks.tabular import ClinicalClassifier, TabularBranch, broadcast_features

__all__ = ["FUSIONS", "MODALITIES", "FusionClassifier", "create_multimodal_network", "load_branch_weights"]

MODALITIES = ("image", "clinical", "fusion")
FUSIONS = ("concat", "film")


def _channels(trunk: nn.Module, in_channels: int, size: Sequence[int]) -> int:
    """Channels C' of ``trunk``'s output for a ``(1, in_channels, *size)`` input, from a shape-only run."""
    with torch.no_grad():
        out = detached_copy(trunk)(torch.empty(1, in_channels, *(int(s) for s in size), device="meta"))
    return int(out.shape[1])


class FusionClassifier(nn.Module):
    """A 3D image trunk and a clinical MLP joined by ``fusion``.

    Args:
        image_net: a registry classifier; only its trunk is kept (its own head is dropped).
        spec: the declared features.
        num_classes: K.
        stats: the normaliser's training statistics (None: set by ``load_state_dict``).
        fusion: ``concat`` or ``film``.
        hidden: width of the tabular embedding.
        in_channels, spatial_size: the image input, to size the trunk's output.

    Shapes:
        ``forward(image, features)``: ``image`` ``(B, C, D, H, W)``, ``features`` raw ``(B, F_raw)`` or ``(1, F_raw)``
        (NaN = missing) -> logits ``(B, K)``.
    """

    def __init__(
        self,
        image_net: nn.Module,
        spec: FeatureSpec | Mapping[str, Any],
        num_classes: int = 2,
        stats: Mapping[str, Any] | None = None,
        fusion: str = "concat",
        hidden: int = 32,
        in_channels: int = 1,
        spatial_size: Sequence[int] = (32, 32, 32),
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.trunk = split_trunk_head(image_net).trunk
        channels = _channels(self.trunk, in_channels, spatial_size)
        self.tabular = TabularBranch(spec, stats, hidden)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten())
        if fusion == "film":
            self.film = nn.Linear(hidden, 2 * channels)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
            self.head = nn.Linear(channels, num_classes)
        else:
            self.head = nn.Linear(channels + hidden, num_classes)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        emb = self.tabular(broadcast_features(features, image.shape[0]).to(image.device))
        fmap = self.trunk(image)
        if self.fusion == "film":
            gamma, beta = self.film(emb).to(fmap.dtype)[:, :, None, None, None].chunk(2, dim=1)
            return self.head(self.pool(torch.relu((1 + gamma) * fmap + beta)).float())
        return self.head(torch.cat([self.pool(fmap).float(), emb.float()], dim=1))


def create_multimodal_network(
    modality: str,
    network_def: str,
    *,
    features: FeatureSpec | Mapping[str, Any] | None = None,
    feature_stats: Mapping[str, Any] | None = None,
    fusion: str = "concat",
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_size: Sequence[int] | None = None,
    ensemble: int = 1,
    hidden: int = 32,
) -> nn.Module:
    """The network of one modality: ``image`` (the registry network ``network_def``), ``clinical``
    (:class:`~volcnn.networks.tabular.ClinicalClassifier`) or ``fusion`` (:class:`FusionClassifier`).

    Clinical and fusion networks take ``(image, features)``; the image network takes ``image`` only.

    Raises:
        ValueError: unknown modality or fusion, or a clinical / fusion network without declared features.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    size = tuple(int(s) for s in (spatial_size or (32, 32, 32)))
    if modality == "image":
        return create_network(
            network_def, in_channels=in_channels, num_classes=num_classes, spatial_size=size, ensemble=ensemble
        )
    if not features:
        raise ValueError(f"modality {modality!r} needs the datalist's declared 'features'; it declares none")
    if int(ensemble) > 1:
        from volcnn.networks.ensemble import EnsembleClassifier

        kw = {"features": features, "fusion": fusion, "in_channels": in_channels, "hidden": hidden}
        members = [
            create_multimodal_network(modality, network_def, num_classes=num_classes, spatial_size=size, **kw)
            for _ in range(int(ensemble))
        ]
        return EnsembleClassifier(members)
    if modality == "clinical":
        return ClinicalClassifier(features, num_classes, feature_stats, hidden)
    image_net = create_network(network_def, in_channels=in_channels, num_classes=num_classes, spatial_size=size)
    return FusionClassifier(image_net, features, num_classes, feature_stats, fusion, hidden, in_channels, size)


def load_branch_weights(
    network: nn.Module,
    image: object = None,
    clinical: object = None,
    *,
    network_def: str = "",
    spatial_size: Sequence[int] | None = None,
    num_classes: int = 2,
    in_channels: int = 1,
) -> nn.Module:
    """Start a fusion network's branches from single-modality runs: the image trunk from an image model's weights
    (``image``: its ``model.pt``, a ``network_def`` state dict), the clinical branch from a clinical model's
    (``clinical``). With both, a ``concat`` network's head starts as the two models' heads side by side, so the
    fusion's first logits are the sum of theirs (a product of experts, for a network whose image head is pooled);
    otherwise the head stays freshly initialised. None or "none" skips a branch.

    Trained jointly from scratch on a few hundred patients, a fusion network leans on the branch that learns fastest
    (here the clinical one) and leaves the image trunk under-trained ("modality competition"); starting both branches
    from their own runs gives it each modality's features from the first step (see the README's multimodal figures).

    Raises:
        ValueError: ``network`` is not a :class:`FusionClassifier`, or weights that do not fit the branch (naming
            the file).
    """
    given = (("image", image), ("clinical", clinical))
    paths = {k: str(v) for k, v in given if v is not None and str(v).lower() not in ("", "none", "null")}
    if not paths:
        return network
    if not isinstance(network, FusionClassifier):
        raise ValueError(f"branch weights are for a fusion network, got {type(network).__name__}")
    device = next(network.parameters()).device
    image_head: nn.Linear | None = None
    if "image" in paths:
        size = tuple(int(s) for s in (spatial_size or (32, 32, 32)))
        image_net = create_network(network_def, in_channels=in_channels, num_classes=num_classes, spatial_size=size)
        try:
            image_net.load_state_dict(torch.load(paths["image"], map_location="cpu", weights_only=True))
        except RuntimeError as e:
            raise ValueError(f"{paths['image']}: not {network_def} weights for patches {list(size)} ({e})") from e
        split = split_trunk_head(image_net)
        network.trunk.load_state_dict(split.trunk.state_dict())
        image_head = split.linear if split.pooled else None
    clinical_head: nn.Linear | None = None
    if "clinical" in paths:
        state = torch.load(paths["clinical"], map_location="cpu", weights_only=True)
        branch = {k[len("tabular.") :]: v for k, v in state.items() if k.startswith("tabular.")}
        try:
            network.tabular.load_state_dict(branch)
        except RuntimeError as e:
            raise ValueError(f"{paths['clinical']}: not a clinical model of these features ({e})") from e
        if {"head.weight", "head.bias"} <= set(state):
            clinical_head = nn.Linear(state["head.weight"].shape[1], state["head.weight"].shape[0])
            clinical_head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    if network.fusion == "concat" and image_head is not None and clinical_head is not None:
        # the two models' heads side by side: the fusion starts as the sum of their logits (a product of experts)
        with torch.no_grad():
            network.head.weight.copy_(torch.cat([image_head.weight, clinical_head.weight], dim=1))
            network.head.bias.copy_(image_head.bias + clinical_head.bias)
    network.to(device)
    return network
