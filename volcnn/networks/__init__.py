"""3D classifiers by registry name (``create_network("densenet121", num_classes=2)``), each family with its facts:
trunk/head split for dense heat maps and Grad-CAM layers (:mod:`volcnn.networks.families`)."""

from __future__ import annotations

from volcnn.networks import monai_nets, seed_cnn, valid_cnn  # noqa: F401  (registers the networks)
from volcnn.networks.ensemble import EnsembleClassifier
from volcnn.networks.families import Family, TrunkHead, cam_layers, family_of, register_family, split_trunk_head
from volcnn.networks.fusion import FusionClassifier, create_multimodal_network, load_branch_weights
from volcnn.networks.introspect import in_channels, unwrap
from volcnn.networks.registry import create_network, list_networks, register_network
from volcnn.networks.seed_cnn import SeedCNN3d
from volcnn.networks.tabular import ClinicalClassifier, FeatureNormalizer
from volcnn.networks.valid_cnn import ValidCNN3d

__all__ = [
    "ClinicalClassifier",
    "EnsembleClassifier",
    "FeatureNormalizer",
    "FusionClassifier",
    "Family",
    "SeedCNN3d",
    "TrunkHead",
    "ValidCNN3d",
    "cam_layers",
    "create_multimodal_network",
    "create_network",
    "family_of",
    "in_channels",
    "list_networks",
    "load_branch_weights",
    "register_family",
    "register_network",
    "split_trunk_head",
    "unwrap",
]
