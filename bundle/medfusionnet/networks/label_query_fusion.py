"""MedFusionNet's label-query fusion (eqs. 16-19 of ``docs/architecture.md``): one learned query per finding reads
the image and tabular tokens (`LabelDecoderLayer`), the findings attend to each other (`RelationalLayer` for the
``concat`` fusion), class-aware gains scale each finding's embedding (`ClassReweighting`) and one linear classifier
per finding gives its logit (`PerLabelHead`).

Shapes: B (batch), K (labels), M (memory tokens), D (embedding width).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data.label_weights import inverse_frequency_weights
from .blocks import Mlp, TransformerBlock


class LabelDecoderLayer(nn.Module):
    """Label queries attend to the fused tokens (eq. 17), after attending to each other when ``relational`` (eq. 16).

    Pre-norm layer on queries ``(B, K, D)`` and memory ``(B, M, D)``; returns ``(B, K, D)``.
    """

    def __init__(
        self, dim: int, num_heads: int, relational: bool = True, mlp_ratio: float = 4.0, dropout_rate: float = 0.0
    ):
        super().__init__()
        self.relational = relational
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout_rate)
        if not relational:
            del self.self_attn, self.norm_self
            self.self_attn = None
            self.norm_self = None

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None and self.norm_self is not None:
            y = self.norm_self(queries)
            queries = queries + self.self_attn(y, y, y, need_weights=False)[0]
        y = self.norm_q(queries)
        queries = queries + self.cross_attn(y, memory, memory, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class RelationalLayer(nn.Module):
    """Self-attention among label embeddings ``(B, K, D)`` (eq. 16), for the ``concat`` fusion."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout_rate: float = 0.0):
        super().__init__()
        self.block = TransformerBlock(dim, num_heads, mlp_ratio, dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ClassReweighting(nn.Module):
    """Class-aware reweighting (eq. 18): a positive gain per label multiplies its embedding ``(B, K, D)``.

    The gains are ``softplus`` of a parameter initialised so that they start at ``prior`` (by default from inverse
    label frequency, `initial_gains`), keeping rare findings' embeddings salient early in training.
    """

    def __init__(self, prior: torch.Tensor):
        super().__init__()
        prior = prior.float().clamp_min(1e-3)
        self.logit = nn.Parameter(prior + torch.log(-torch.expm1(-prior)))  # inverse softplus

    def gains(self) -> torch.Tensor:
        """The current per-label gains ``(K,)``."""
        return F.softplus(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gains().unsqueeze(0).unsqueeze(-1)


def initial_gains(label_counts: Optional[List[float]], num_classes: int, max_gain: float = 3.0) -> torch.Tensor:
    """`ClassReweighting`'s starting gains: `label_weights.inverse_frequency_weights` of the training positives
    (power 0.5, clipped to ``[1 / max_gain, max_gain]``); all ones without counts."""
    if label_counts is None:
        return torch.ones(num_classes)
    if len(label_counts) != num_classes:
        raise ValueError(f"label_counts has {len(label_counts)} values; expected num_classes={num_classes}")
    return inverse_frequency_weights(label_counts, power=0.5, max_gain=max_gain)


class PerLabelHead(nn.Module):
    """One linear classifier per label (eq. 19): ``(B, K, D) -> (B, K)`` logits, no activation."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight.unsqueeze(0)).sum(-1) + self.bias
