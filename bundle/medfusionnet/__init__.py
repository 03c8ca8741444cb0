"""MedFusionNet: a MONAI bundle for multilabel chest X-ray diagnosis that fuses the image with patient data."""

from .constants import LABELS, NUM_CLASSES
from .network import MedFusionNet
from .registry import NETWORKS, create_network
from .tabular import NUM_TABULAR_FEATURES, TabularEncoder

__version__ = "0.5.0"

__all__ = [
    "LABELS",
    "MedFusionNet",
    "NETWORKS",
    "NUM_CLASSES",
    "NUM_TABULAR_FEATURES",
    "TabularEncoder",
    "create_network",
]
