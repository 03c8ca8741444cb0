"""Networks selectable by name from the configs (``network_name``)."""

from __future__ import annotations

from torch import nn

from .baselines import DenseNet121Tabular

NETWORKS: dict[str, type[nn.Module]] = {
    "densenet121": DenseNet121Tabular,
}


def create_network(name: str, **kwargs) -> nn.Module:
    """Build the network registered as ``name`` with its keyword arguments (``num_classes``, ``in_channels``, ...)."""
    if name not in NETWORKS:
        raise ValueError(f"network_name='{name}' is not known; choose one of {sorted(NETWORKS)}")
    return NETWORKS[name](**kwargs)
