"""MedFusionNet without the image: the tabular tokens, label queries with relational self-attention, class-aware
reweighting and per-label heads of the full network, for tabular-only data such as the cervical risk factors.

Shapes: B (batch), F (encoded tabular features), K (labels), D (token width).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from .blocks import TabularTokenizer, TransformerBlock
from .label_query_fusion import ClassReweighting, LabelDecoderLayer, PerLabelHead, initial_gains


class TabularMedFusionNet(nn.Module):
    """``forward(tabular (B, F)) -> logits (B, K)``: one token per field (eq. 15), self-attention among the field
    tokens, label queries that attend to each other and read the tokens (eqs. 16-17), then class-aware
    reweighting (eq. 18) and one linear classifier per label (eq. 19), as in `MedFusionNet`'s fusion.

    Args:
        fields: ``(start, end, missing_index)`` per field of the encoded vector (see `TabularTokenizer`).
        num_classes: K, the number of labels.
        dim: token width D.
        num_heads: attention heads (D must be divisible by it).
        depth: self-attention blocks over the field tokens.
        decoder_depth: label-query decoder layers.
        dropout_rate: dropout in attention and MLPs.
        label_counts: training positives per label, for the reweighting's starting gains (all ones when None).
        relational: label queries attend to each other before reading the tokens.
        reweighting: apply class-aware reweighting.
    """

    def __init__(
        self,
        fields: List[Tuple[int, int, int]],
        num_classes: int,
        dim: int = 32,
        num_heads: int = 4,
        depth: int = 1,
        decoder_depth: int = 1,
        dropout_rate: float = 0.1,
        label_counts: Optional[List[float]] = None,
        relational: bool = True,
        reweighting: bool = True,
    ):
        super().__init__()
        if not fields:
            raise ValueError("TabularMedFusionNet needs at least one tabular field")
        self.tokenizer = TabularTokenizer(fields, dim)
        self.encoder = nn.Sequential(*[TransformerBlock(dim, num_heads, 2.0, dropout_rate) for _ in range(depth)])
        self.memory_norm = nn.LayerNorm(dim)
        self.label_queries = nn.Parameter(torch.zeros(num_classes, dim))
        nn.init.trunc_normal_(self.label_queries, std=0.02)
        self.decoder = nn.ModuleList(
            [LabelDecoderLayer(dim, num_heads, relational, 2.0, dropout_rate) for _ in range(decoder_depth)]
        )
        self.label_norm = nn.LayerNorm(dim)
        self.reweighting = ClassReweighting(initial_gains(label_counts, num_classes)) if reweighting else None
        self.head = PerLabelHead(num_classes, dim)

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        memory = self.memory_norm(self.encoder(self.tokenizer(tabular)))  # (B, fields, D)
        labels = self.label_queries.unsqueeze(0).expand(tabular.shape[0], -1, -1)  # (B, K, D)
        for layer in self.decoder:
            labels = layer(labels, memory)
        labels = self.label_norm(labels)
        if self.reweighting is not None:
            labels = self.reweighting(labels)
        return self.head(labels)
