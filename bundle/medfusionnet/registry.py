"""Networks selectable by name from the configs (``network_name``)."""

from __future__ import annotations

import inspect
import logging

from torch import nn

from .baselines import DenseNet121Tabular
from .network import MedFusionNet

logger = logging.getLogger(__name__)

NETWORKS: dict[str, type[nn.Module]] = {
    "medfusionnet": MedFusionNet,
    "densenet121": DenseNet121Tabular,
}


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
