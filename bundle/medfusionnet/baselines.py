"""Baseline networks with the bundle's interface: ``forward(image, tabular=None) -> logits (B, num_classes)``."""

from __future__ import annotations

from typing import Optional

import torch
from monai.networks.nets import DenseNet121
from torch import nn

from .tabular import NUM_TABULAR_FEATURES, missing_tabular_vector


class TabularMLP(nn.Module):
    """Embeds the encoded tabular vector ``(B, F)`` into ``(B, embed_dim)``.

    ``None`` stands for "all fields missing" and is embedded as `tabular.missing_tabular_vector`, so one-input tools
    (``verify_net_in_out``, ``ckpt_export``) can call the network and the result equals passing that vector.
    """

    def __init__(self, num_tabular_features: int = NUM_TABULAR_FEATURES, embed_dim: int = 32):
        super().__init__()
        self.num_tabular_features = num_tabular_features
        self.mlp = nn.Sequential(nn.Linear(num_tabular_features, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        missing = torch.from_numpy(missing_tabular_vector(num_tabular_features))
        self.register_buffer("missing_input", missing, persistent=False)

    def forward(self, tabular: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        if tabular is None:
            tabular = self.missing_input.unsqueeze(0).expand(batch_size, -1)
        return self.mlp(tabular)


class DenseNet121Tabular(nn.Module):
    """MONAI's DenseNet-121 on a 1-channel X-ray, with the tabular embedding concatenated before the classifier.

    Shapes: image ``(B, in_channels, H, W)`` (H, W >= 32), tabular ``(B, num_tabular_features)`` or None;
    returns logits ``(B, num_classes)`` without activation.
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        tabular_embed_dim: int = 32,
        dropout_rate: float = 0.2,
    ):
        super().__init__()
        backbone = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
        self.features = backbone.features
        num_features = backbone.class_layers.out.in_features
        self.use_tabular = use_tabular
        self.tabular = TabularMLP(num_tabular_features, tabular_embed_dim)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_rate)
        self.head = nn.Linear(num_features + (tabular_embed_dim if use_tabular else 0), num_classes)

    def forward_features(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled image features, with the tabular embedding appended when ``use_tabular``: ``(B, D)``."""
        x = torch.relu(self.features(image))
        x = torch.flatten(self.pool(x), 1)  # (B, 1024)
        if self.use_tabular:
            x = torch.cat([x, self.tabular(tabular, x.shape[0])], dim=1)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from `forward_features`' output."""
        return self.head(self.dropout(features))

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, tabular))
