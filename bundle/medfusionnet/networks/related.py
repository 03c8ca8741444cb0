"""The related systems MedFusionNet is compared with, each with the bundle's interface
``forward(image (B, in_channels, H, W), tabular (B, F) or None) -> logits (B, num_classes)``:

- `ConvFCMAE`: ConvNeXtV2 with its first part frozen and a three-stage head (CONVFCMAE, Informatics 2025);
- `CTransCNN`: parallel CNN and transformer branches with label-embedding queries (CTransCNN, KBS 2023);
- `ProbabilityEnsemble`: DenseNet, EfficientNet and Inception members whose probabilities are combined.

Tabular data, which none of the papers uses, enters each the way it enters the other baselines (late fusion, or as
tokens where the network already attends to tokens), so every compared network sees the same inputs; switch it off
with ``use_tabular=False``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..data.tabular import NUM_TABULAR_FEATURES, missing_tabular_vector
from .baselines import TabularMLP, import_timm, load_timm_backbone_weights
from .blocks import (
    ConvToTokens,
    Mlp,
    PatchEmbed,
    TabularTokenizer,
    TokensToConv,
    TransformerBlock,
    grid_to_tokens,
    resize_grid,
)
from .label_query_fusion import PerLabelHead
from .medfusionnet import HybridStage, nih_tabular_fields

CONVFCMAE_FROZEN_FRACTION = 0.7708  # share of the backbone's layers the paper keeps fixed


# ---- CONVFCMAE ------------------------------------------------------------------------------------------------
class AttentivePooling(nn.Module):
    """Stage one of the CONVFCMAE head (section 3.4.1): a 1x1 convolution and a sigmoid give a spatial weight map,
    whose normalised weighted sum of the features is concatenated with global max and average pooling.

    ``(B, C, H, W) -> (B, 3, C)``: the attentive, max and average descriptors as three tokens.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.score = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.score(x)).flatten(2)  # (B, 1, HW), in (0, 1)
        feats = x.flatten(2)  # (B, C, HW)
        attentive = (feats * weights).sum(-1) / weights.sum(-1).clamp_min(1e-6)
        return torch.stack([attentive, feats.amax(-1), feats.mean(-1)], dim=1)


class BatchNormMlp(nn.Module):
    """Stage three of the CONVFCMAE head (section 3.4.3): ``Linear, ReLU, BatchNorm, Dropout, Linear``.

    A training batch of one image normalises with the running statistics instead of failing (BatchNorm cannot
    estimate a variance from one sample; the last batch of an epoch can be that small).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, dropout_rate: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        if self.training and x.shape[0] == 1:
            x = F.batch_norm(
                x,
                self.norm.running_mean,
                self.norm.running_var,
                self.norm.weight,
                self.norm.bias,
                False,
                0.0,
                self.norm.eps,
            )
        else:
            x = self.norm(x)
        return self.fc2(self.drop(x))


class ConvFCMAE(nn.Module):
    """CONVFCMAE (Informatics 2025, ``seeds/002``): a ConvNeXtV2 backbone (timm) with its first
    ``frozen_fraction`` of layers fixed, and a three-stage head:

    1. attentive global pooling (eqs. 1-5): sigmoid 1x1-conv weights pool the last feature map, concatenated with
       global max and average pooling (``3C`` values);
    2. multi-head self-attention with a residual connection (eqs. 6-10). The paper applies it to the pooled vector
       as one token, where the softmax over a single key is 1 and attention reduces to a linear map; here the three
       pooled descriptors are the tokens, so attention weighs them per image, and the result is flattened to ``3C``;
    3. a two-layer MLP with ReLU, BatchNorm and dropout (eqs. 14-18) giving the logits. With ``use_tabular`` the
       tabular embedding (`baselines.TabularMLP`) is appended to the MLP's input.

    Train it with ``loss_name: bce_focal`` (BCE + focal, as the paper). ``frozen_fraction`` counts the backbone's
    parameter tensors in order from the stem; None means the paper's 77.08 % when ``pretrained_path`` gives
    weights, and nothing frozen otherwise (fixing randomly initialised layers would only cripple the network). The
    paper's warm-up (three epochs training the head alone) is not part of the network and is not reproduced.
    ``image_size`` is taken as every registered network takes it and not used (the head pools globally).
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        tabular_embed_dim: int = 32,
        model_name: str = "convnextv2_tiny",
        pretrained_path: Optional[str] = None,
        frozen_fraction: Optional[float] = None,
        num_heads: int = 4,
        hidden_dim: int = 512,
        dropout_rate: float = 0.25,
        image_size: Optional[int] = None,
    ):
        super().__init__()
        timm = import_timm(model_name)
        self.backbone = timm.create_model(
            model_name, pretrained=False, in_chans=in_channels, num_classes=0, global_pool=""
        )
        # the feature map before timm's head (pooling, norm, classifier) feeds the three-stage head that replaces it
        self.backbone.head = nn.Identity()
        if pretrained_path:
            load_timm_backbone_weights(self.backbone, pretrained_path)
        if frozen_fraction is None:
            frozen_fraction = CONVFCMAE_FROZEN_FRACTION if pretrained_path else 0.0
        if not 0.0 <= float(frozen_fraction) < 1.0:
            raise ValueError(f"frozen_fraction={frozen_fraction} must be in [0, 1)")
        self.num_frozen = self.freeze_first(float(frozen_fraction))
        channels = self.backbone.num_features
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the backbone's {channels} channels")
        self.pool = AttentivePooling(channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.use_tabular = use_tabular
        self.tabular = TabularMLP(num_tabular_features, tabular_embed_dim)
        self.mlp = BatchNormMlp(
            3 * channels + (tabular_embed_dim if use_tabular else 0), hidden_dim, num_classes, dropout_rate
        )

    def freeze_first(self, fraction: float) -> int:
        """Fix the first ``fraction`` of the backbone's parameter tensors (stem first); returns how many."""
        params = list(self.backbone.parameters())
        count = int(round(fraction * len(params)))
        for p in params[:count]:
            p.requires_grad_(False)
        return count

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = self.pool(self.backbone.forward_features(image))  # (B, 3, C)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        x = tokens.flatten(1)  # (B, 3C)
        if self.use_tabular:
            x = torch.cat([x, self.tabular(tabular, x.shape[0])], dim=1)
        return self.mlp(x)


# ---- CTransCNN ------------------------------------------------------------------------------------------------
class MultiBranchResidual(nn.Module):
    """MBR block (CTransCNN section 3.2, Fig. 5b): a ResNet bottleneck whose 3x3 convolution is itself a residual
    block, giving an inner and an outer residual branch. ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True)
        )
        self.inner = nn.Sequential(
            nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(mid_channels),
        )
        self.inner_shortcut = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.up = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
            if stride > 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        y = F.relu(self.inner(y) + self.inner_shortcut(y))  # inner residual branch
        return F.relu(self.up(y) + self.shortcut(x))  # outer residual branch


class MultilabelSemanticSimilarity(nn.Module):
    """MSS block (CTransCNN eqs. 3-4): multi-head attention among the label embeddings ``(B, K, D)`` with weights
    ``softmax(sigmoid(Q K^T / sqrt(d_k)))``, heads concatenated and fused by ``W_O``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        q, key, v = self.qkv(x).view(b, k, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = torch.sigmoid(q @ key.transpose(-2, -1) / math.sqrt(d // self.num_heads))
        heads = torch.softmax(scores, dim=-1) @ v  # (B, h, K, d / h)
        return self.out(heads.transpose(1, 2).reshape(b, k, d))


class MMAEFLayer(nn.Module):
    """One MMAEF layer (CTransCNN eqs. 1-5): label self-attention, cross-attention to the image (and tabular)
    tokens, the MSS block and a feed-forward network, each pre-normalised with a residual connection.

    Queries ``(B, K, D)``, memory ``(B, M, D)`` -> ``(B, K, D)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout_rate: float = 0.0):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_mss = nn.LayerNorm(dim)
        self.mss = MultilabelSemanticSimilarity(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout_rate)

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.norm_self(queries)
        queries = queries + self.self_attn(y, y, y, need_weights=False)[0]  # eq. 1
        y = self.norm_cross(queries)
        queries = queries + self.cross_attn(y, memory, memory, need_weights=False)[0]  # eq. 2
        queries = queries + self.mss(self.norm_mss(queries))  # eqs. 3-4
        return queries + self.mlp(self.norm_mlp(queries))  # eq. 5


CTRANSCNN_SIZES: Dict[str, dict] = {
    "tiny": dict(
        stem_channels=16,
        widths=(8, 16, 32, 64),
        blocks=(1, 1, 1, 1),
        embed_dim=32,
        depth=(1, 1, 1, 1),
        num_heads=2,
        decoder_depth=1,
    ),
    # two MBR blocks per stage at half ResNet-50's widths; a 12-layer transformer branch as in the paper, ViT-S wide
    "base": dict(
        stem_channels=64,
        widths=(32, 64, 128, 256),
        blocks=(2, 2, 2, 2),
        embed_dim=384,
        depth=(3, 3, 3, 3),
        num_heads=6,
        decoder_depth=2,
    ),
}


class CTransCNN(nn.Module):
    """CTransCNN (Knowledge-Based Systems 2023, ``seeds/003``), as we read it, built from MedFusionNet's blocks where
    they are the same thing.

    - stem: 7x7 convolution and 3x3 max pooling (stride 4);
    - CNN branch: four stages of MBR blocks (`MultiBranchResidual`, bottleneck expansion 4) at strides 4-32;
    - transformer branch: patch tokens of the stem's map (`blocks.PatchEmbed`) through four stages of self-attention
      blocks, exchanging information with the aligned CNN stage through C2T and T2C in every stage but the first
      (eqs. 6-14; `blocks.ConvToTokens`, `blocks.TokensToConv`, `medfusionnet.HybridStage`);
    - MMAEF (eqs. 1-5, `MMAEFLayer`): learned label embeddings query the transformer tokens and the pooled last CNN
      map (the convolutional keys and values of section 3.1), with the tabular tokens appended when
      ``use_tabular``; a per-label linear head turns the label embeddings into the transformer branch's scores;
    - the CNN branch's scores come from global average pooling and a linear layer;
    - logits are the weighted sum ``branch_weight * transformer + (1 - branch_weight) * CNN`` (the paper's best
      weighting is 0.9; it does not say which branch takes it, and here the label-query branch does).

    Train it with ``loss_name: focal_asl`` (focal + asymmetric loss, Pareto-balanced, as the paper).
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        network_size: str = "base",
        image_size: int = 224,
        patch_size: int = 8,
        branch_weight: float = 0.9,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        if network_size not in CTRANSCNN_SIZES:
            raise ValueError(f"network_size='{network_size}' is not supported; use one of {sorted(CTRANSCNN_SIZES)}")
        if not 0.0 <= branch_weight <= 1.0:
            raise ValueError(f"branch_weight={branch_weight} must be in [0, 1]")
        cfg = CTRANSCNN_SIZES[network_size]
        dim, heads, stem = cfg["embed_dim"], cfg["num_heads"], cfg["stem_channels"]
        self.branch_weight = float(branch_weight)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        self.patch_embed = PatchEmbed(stem, dim, patch_size, max(image_size // (4 * patch_size), 1))
        rates = torch.linspace(0, drop_path_rate, max(sum(cfg["depth"]), 1)).tolist()
        self.stages = nn.ModuleList()
        channels, start = stem, 0
        for i, (width, n_blocks, depth) in enumerate(zip(cfg["widths"], cfg["blocks"], cfg["depth"])):
            out = 4 * width
            cnn = nn.Sequential(
                *[
                    MultiBranchResidual(channels if j == 0 else out, width, out, 2 if (j == 0 and i > 0) else 1)
                    for j in range(n_blocks)
                ]
            )
            channels = out
            blocks = [TransformerBlock(dim, heads, mlp_ratio, dropout_rate, rates[start + j]) for j in range(depth)]
            start += depth
            self.stages.append(
                HybridStage(
                    cnn=cnn,
                    transformer=nn.Sequential(*blocks),
                    norm=nn.LayerNorm(dim) if i == 3 else None,
                    c2t=ConvToTokens(out, dim) if i > 0 else None,
                    t2c=TokensToConv(dim, out) if 0 < i < 3 else None,
                )
            )
        self.cnn_head = nn.Linear(channels, num_classes)
        self.cnn_tokens = nn.Linear(channels, dim)
        self.tabular_tokens = TabularTokenizer(nih_tabular_fields(num_tabular_features), dim) if use_tabular else None
        missing = torch.from_numpy(missing_tabular_vector(num_tabular_features))
        self.register_buffer("missing_tabular", missing, persistent=False)
        self.label_embed = nn.Parameter(torch.zeros(num_classes, dim))
        nn.init.trunc_normal_(self.label_embed, std=0.02)
        self.memory_norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(
            [MMAEFLayer(dim, heads, mlp_ratio, dropout_rate) for _ in range(cfg["decoder_depth"])]
        )
        self.label_norm = nn.LayerNorm(dim)
        self.head = PerLabelHead(num_classes, dim)

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.stem(image)
        tokens, grid = self.patch_embed(x)
        token_map = tokens
        for stage in self.stages:
            x, tokens, token_map = stage(x, tokens, grid)
        cnn_scores = self.cnn_head(x.mean((-2, -1)))
        memory = [grid_to_tokens(token_map), self.cnn_tokens(grid_to_tokens(resize_grid(x, grid)))]
        if self.tabular_tokens is not None:
            if tabular is None:
                tabular = self.missing_tabular.unsqueeze(0).expand(image.shape[0], -1)
            memory.append(self.tabular_tokens(tabular))
        memory_tokens = self.memory_norm(torch.cat(memory, dim=1))
        labels = self.label_embed.unsqueeze(0).expand(image.shape[0], -1, -1)
        for layer in self.decoder:
            labels = layer(labels, memory_tokens)
        transformer_scores = self.head(self.label_norm(labels))
        return self.branch_weight * transformer_scores + (1.0 - self.branch_weight) * cnn_scores


# ---- ensemble -------------------------------------------------------------------------------------------------
ENSEMBLE_MEMBERS = ("densenet121", "efficientnet_b0", "inception_v3")
COMBINES = ("mean", "vote")


class ProbabilityEnsemble(nn.Module):
    """The ensemble of ``seeds/004``: DenseNet-121, EfficientNet-B0 and Inception-v3 members (any registered
    networks), each with the bundle's interface, whose outputs are combined per finding.

    ``combine="mean"`` ("combine then predict") averages the members' probabilities; ``"vote"`` ("predict then
    combine") takes the share of members whose probability reaches ``threshold``, a score with ``members + 1``
    levels. The result is returned as logits (``log(p / (1 - p))``, p clipped to ``[eps, 1 - eps]``), so the
    bundle's sigmoid post-processing recovers it.

    The paper trains the members separately: ``member_checkpoints`` (one ``model.pt`` per member, e.g. from
    ``monai.bundle run training --network_name efficientnet_b0``) loads them, which is how ``scripts/compare.py``
    builds it. Trained as one network instead, the members learn jointly from the loss of the averaged
    probabilities (voting has no gradient, so training always uses the mean).
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        use_tabular: bool = True,
        members: Sequence[str] = ENSEMBLE_MEMBERS,
        member_args: Optional[Sequence[dict]] = None,
        member_checkpoints: Optional[Sequence[str]] = None,
        combine: str = "mean",
        threshold: float = 0.5,
        image_size: int = 224,
        eps: float = 1e-6,
    ):
        super().__init__()
        from .registry import create_network

        if combine not in COMBINES:
            raise ValueError(f"combine='{combine}' is not supported; use one of {COMBINES}")
        if not members:
            raise ValueError("members must name at least one network")
        member_args = list(member_args) if member_args is not None else [{} for _ in members]
        if len(member_args) != len(members):
            raise ValueError(f"member_args has {len(member_args)} entries for {len(members)} members")
        shared = dict(
            num_classes=num_classes,
            in_channels=in_channels,
            num_tabular_features=num_tabular_features,
            use_tabular=use_tabular,
            image_size=image_size,
        )
        self.members = nn.ModuleList(
            [create_network(name, **{**shared, **dict(args)}) for name, args in zip(members, member_args)]
        )
        self.member_names = list(members)
        self.combine, self.threshold, self.eps = combine, float(threshold), float(eps)
        if member_checkpoints is not None:
            self.load_members(member_checkpoints)

    def load_members(self, paths: Sequence[str]) -> None:
        """Load one state dict file per member (``weights_only``), refusing a file that does not fit by name."""
        from ..engine.checkpoints import check_checkpoint

        if len(paths) != len(self.members):
            raise ValueError(f"member_checkpoints has {len(paths)} files for {len(self.members)} members")
        for name, member, path in zip(self.member_names, self.members, paths):
            try:
                check_checkpoint(str(path), member)
            except ValueError as e:
                raise ValueError(f"ensemble member '{name}': {e}") from e
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state.get("model"), dict):
                state = state["model"]
            member.load_state_dict(state)

    def member_probabilities(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each member's probabilities, stacked: ``(members, B, K)``."""
        return torch.stack([torch.sigmoid(m(image, tabular).float()) for m in self.members])

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        probs = self.member_probabilities(image, tabular)
        if self.combine == "vote" and not self.training:
            combined = (probs >= self.threshold).float().mean(0)
        else:
            combined = probs.mean(0)
        return torch.logit(combined, eps=self.eps)
