"""MedFusionNet: a MONAI bundle for multilabel chest X-ray diagnosis that fuses the image with patient data.

The package is layered as MONAI is: `networks`, `data`, `engine`, `evaluation`, `explain` and `risk`, with the
shared `constants`, `files` (atomic writers) and `distributed` (rank helpers). The names most used are importable
from here.
"""

from .cli_errors import install as _install_cli_errors
from .constants import LABELS, NUM_CLASSES
from .data.image_reader import read_xray
from .data.nih import prepare_datasets
from .data.samplers import BalancedMultilabelSampler
from .data.tabular import NUM_TABULAR_FEATURES, TabularEncoder
from .data.transforms import XrayDataset, xray_transforms
from .data.unreadable import UnreadableImageError
from .engine.losses import create_loss
from .evaluation.calibration import TemperatureScaling
from .evaluation.decision import RiskTierRule
from .evaluation.thresholds import choose_thresholds, load_thresholds
from .networks.baselines import DenseNet121Tabular
from .networks.medfusionnet import MedFusionNet
from .networks.registry import NETWORKS, create_network
from .risk.two_stage import TwoStageRiskModel

__version__ = "0.10.0"

_install_cli_errors()  # a failed ``python -m monai.bundle`` run ends with the bundle's own message

__all__ = [
    "BalancedMultilabelSampler",
    "DenseNet121Tabular",
    "LABELS",
    "MedFusionNet",
    "NETWORKS",
    "NUM_CLASSES",
    "NUM_TABULAR_FEATURES",
    "RiskTierRule",
    "TabularEncoder",
    "TemperatureScaling",
    "TwoStageRiskModel",
    "UnreadableImageError",
    "XrayDataset",
    "choose_thresholds",
    "create_loss",
    "create_network",
    "load_thresholds",
    "prepare_datasets",
    "read_xray",
    "xray_transforms",
]
