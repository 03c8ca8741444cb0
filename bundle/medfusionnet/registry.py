"""Networks selectable by name from the configs (``network_name``)."""

from __future__ import annotations

import inspect
import logging

from torch import nn

from .baselines import (
    ConvNeXtTinyTabular,
    DeiTSmallTabular,
    DenseNet121Tabular,
    EfficientNetB0Tabular,
    InceptionResNetV2Tabular,
    InceptionV3Tabular,
    ResNet50Tabular,
    TimmTabular,
)
from .network import MedFusionNet
from .related import ConvFCMAE, CTransCNN, ProbabilityEnsemble

logger = logging.getLogger(__name__)

NETWORKS: dict[str, type[nn.Module]] = {
    "medfusionnet": MedFusionNet,
    "densenet121": DenseNet121Tabular,
    # through timm, an optional dependency (pip install "medfusionnet[baselines]")
    "resnet50": ResNet50Tabular,
    "convnext_tiny": ConvNeXtTinyTabular,
    "deit_small": DeiTSmallTabular,
    "inception_resnet_v2": InceptionResNetV2Tabular,
    "efficientnet_b0": EfficientNetB0Tabular,
    "inception_v3": InceptionV3Tabular,
    "timm": TimmTabular,  # any timm model: --network_args#model_name <timm name>
    # the related systems (related.py)
    "convfcmae": ConvFCMAE,  # needs timm
    "ctranscnn": CTransCNN,
    "ensemble": ProbabilityEnsemble,  # the default members need timm
}
# the networks that need timm (the ensemble through its default members)
TIMM_NETWORKS = (
    "resnet50",
    "convnext_tiny",
    "deit_small",
    "inception_resnet_v2",
    "efficientnet_b0",
    "inception_v3",
    "timm",
    "convfcmae",
    "ensemble",
)


def create_network(name: str, **kwargs) -> nn.Module:
    """Build the network registered as ``name``.

    Keyword arguments the network does not take (the MedFusionNet ablation switches given to a baseline, say) are
    left out with an INFO log naming them, so one config serves every network.
    """
    if name not in NETWORKS:
        raise ValueError(f"network_name='{name}' is not known; choose one of {sorted(NETWORKS)}")
    cls = NETWORKS[name]
    accepted = inspect.signature(cls.__init__).parameters
    unused = sorted(k for k in kwargs if k not in accepted)
    if unused:
        logger.info("network '%s' does not use %s", name, ", ".join(unused))
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})
