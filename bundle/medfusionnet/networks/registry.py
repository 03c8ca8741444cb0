"""Networks selectable by name from the configs (``network_name``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

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
from .medfusionnet import MedFusionNet
from .related import ConvFCMAE, CTransCNN, ProbabilityEnsemble

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

    A keyword named after a registered network holds that network's own arguments (a dict, e.g.
    ``medfusionnet={"network_size": "tiny"}``): it is merged in when that network is built and left out for the others, so
    one config carries MedFusionNet's switches and still builds a baseline. Every other keyword must be an argument
    of the network.

    Raises:
        ValueError: for an unknown ``name``.
        TypeError: naming the network and the arguments it does not take, or a per-network group that is not a dict.
    """
    if name not in NETWORKS:
        raise ValueError(f"network_name='{name}' is not known; choose one of {sorted(NETWORKS)}")
    groups = {key: kwargs.pop(key) for key in list(kwargs) if key in NETWORKS}
    for key, group in groups.items():
        if group is not None and not isinstance(group, Mapping):
            raise TypeError(f"network argument '{key}' must be a dict of {key}'s own arguments, not {group!r}")
    kwargs.update(groups.get(name) or {})
    cls = NETWORKS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(f"network '{name}' does not take {unknown}; its arguments are {accepted}")
    return cls(**kwargs)
