"""3D classifiers by registry name: ``create_network("densenet121", num_classes=2)``."""

from __future__ import annotations

from volcnn.networks import monai_nets, seed_cnn, valid_cnn  # noqa: F401  (registers the networks)
from volcnn.networks.registry import create_network, list_networks, register_network
from volcnn.networks.seed_cnn import SeedCNN3d
from volcnn.networks.valid_cnn import ValidCNN3d

__all__ = ["create_network", "list_networks", "register_network", "SeedCNN3d", "ValidCNN3d"]
