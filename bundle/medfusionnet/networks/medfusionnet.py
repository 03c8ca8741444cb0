"""MedFusionNet: a DenseNet-121 classifier path refined, through a per-finding gate that starts at zero, by a parallel
transformer branch with cross-branch interaction and label-query fusion of image and tabular tokens
(``docs/architecture.md`` has the diagram and the equations)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from monai.networks.blocks import FeaturePyramidNetwork
from monai.networks.nets import DenseNet
from torch import nn

from ..data.tabular import NIH_FIELDS, NUM_TABULAR_FEATURES, field_slices, missing_tabular_vector
from .baselines import LateFusionHead
from .blocks import (
    ConvToTokens,
    PatchEmbed,
    TabularTokenizer,
    TokensToConv,
    TransformerBlock,
    grid_to_tokens,
    resize_grid,
    tokens_to_grid,
)
from .label_query_fusion import (
    ClassReweighting,
    LabelDecoderLayer,
    PerLabelHead,
    RelationalLayer,
    initial_gains,
)

BRANCHES = ("cnn", "transformer", "relational")
FUSIONS = ("attention", "concat")

# Sizes: ``base`` has DenseNet-121's CNN and a ViT-Ti-wide transformer; ``tiny`` is for tests and CPU smoke runs.
SIZES: Dict[str, dict] = {
    "tiny": dict(
        init_features=16,
        growth_rate=8,
        block_config=(2, 2, 2, 2),
        bn_size=2,
        embed_dim=32,
        depth=(1, 1, 1, 1),
        num_heads=2,
        fpn_channels=32,
        decoder_depth=1,
        pool_size=4,
    ),
    "base": dict(
        init_features=64,
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        bn_size=4,
        embed_dim=192,
        depth=(1, 1, 1, 1),
        num_heads=3,
        fpn_channels=64,
        decoder_depth=2,
        pool_size=7,
    ),
}


def nih_tabular_fields(num_tabular_features: int) -> List[Tuple[int, int, int]]:
    """Field slices ``(start, end, missing_index)`` of the encoded tabular vector when none are given: the NIH fields
    (`tabular.NIH_FIELDS`) for their encoding's length, else one field per feature without a missing flag."""
    if num_tabular_features != NUM_TABULAR_FEATURES:
        return [(i, i + 1, -1) for i in range(num_tabular_features)]
    return field_slices(NIH_FIELDS)


class HybridStage(nn.Module):
    """One aligned stage of the two image branches: CNN stage, C2T into the tokens, transformer stage, T2C back into
    the CNN map (each part optional, following the ablation switches).

    ``(x (B, C, H, W), tokens (B, N, D), grid) -> (x', tokens', normalised token map (B, D, h, w))``.
    """

    def __init__(
        self,
        cnn: Optional[nn.Module],
        transformer: Optional[nn.Module],
        norm: Optional[nn.Module],
        c2t: Optional[nn.Module],
        t2c: Optional[nn.Module],
    ):
        super().__init__()
        self.cnn = cnn
        self.transformer = transformer
        self.norm = norm
        self.c2t = c2t
        self.t2c = t2c
        self.grad_checkpointing = False

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, grid: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return self._checkpointed(x, tokens, grid)
        return self._forward(x, tokens, grid)

    @torch.jit.unused
    def _checkpointed(
        self, x: torch.Tensor, tokens: torch.Tensor, grid: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # keeps only the stage's inputs and recomputes its activations in the backward pass; the RNG state is
        # restored for the recomputation, so dropout and drop-path draw the same masks twice
        return torch.utils.checkpoint.checkpoint(self._forward, x, tokens, grid, use_reentrant=False)

    def _forward(
        self, x: torch.Tensor, tokens: torch.Tensor, grid: List[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cnn is not None:
            x = self.cnn(x)
        token_map = tokens
        if self.transformer is not None:
            if self.c2t is not None:
                tokens = tokens + self.c2t(x, grid)  # C2T
            tokens = self.transformer(tokens)
            if self.norm is not None:  # only stages whose tokens feed the pyramid have one
                token_map = tokens_to_grid(self.norm(tokens), grid)
            if self.t2c is not None:
                x = x + self.t2c(tokens, grid, [x.shape[-2], x.shape[-1]])  # T2C
        return x, tokens, token_map


def _stage_channels(init_features: int, growth_rate: int, block_config: Sequence[int]) -> List[int]:
    channels, out = init_features, []
    for i, layers in enumerate(block_config):
        channels += layers * growth_rate
        out.append(channels)
        if i < len(block_config) - 1:
            channels //= 2
    return out


class MedFusionNet(nn.Module):
    """Hybrid parallel network for multilabel chest X-ray classification with tabular patient data.

    ``forward(image (B, in_channels, H, W), tabular (B, num_tabular_features) or None) -> logits (B, num_classes)``;
    H and W are multiples of 32 (64 to 512 tested). ``tabular=None`` means every field is missing.

    With ``baseline_path`` (and the CNN branch) the logits are ``z_base + gate * z_fusion``: ``z_base`` is the
    DenseNet-121 baseline's classifier (`baselines.LateFusionHead` on the pooled last CNN map), ``z_fusion`` the
    label-query fusion's, and ``gate`` a learned per-finding scale that starts at 0, as does the T2C update of the CNN
    maps: the untrained network computes exactly what `baselines.DenseNet121Tabular` computes with the same weights.

    Args:
        num_classes: number of findings K.
        in_channels: image channels (1 for X-rays).
        num_tabular_features: length of the encoded tabular vector.
        network_size: ``"tiny"`` or ``"base"``; the other size arguments override its values when given.
        branches: any non-empty subset of ``cnn`` (DenseNet stages), ``transformer`` (self-attention stages) and
            ``relational`` (self-attention among the label embeddings). Without both image branches, the image
            tokens come from the stem's patch embedding alone.
        interaction: C2T/T2C exchange between aligned stages (needs both image branches).
        fpn: feature pyramids over the stages of each image branch; otherwise (the default) the label queries read
            the last stage of each branch only.
        fusion: ``attention`` (label queries attend to image and tabular tokens) or ``concat`` (pooled features
            concatenated, then an MLP makes the label embeddings).
        use_tabular: feed the tabular tokens to the fusion.
        class_reweighting: per-label gains on the fused label embeddings, initialised from ``label_counts``.
        baseline_path: keep the DenseNet-121 classifier path and add the fusion's logits through the zero-initialised
            gate (needs the CNN branch); False gives the fusion's logits alone.
        deep_supervision: in training mode, return ``(B, 3, K)``: the logits, the baseline path's and the fusion's,
            for `losses.BranchSupervisionLoss`; evaluation mode always returns ``(B, K)``.
        tabular_fields: ``(start, end, missing_index)`` per declared field of the encoding
            (`TabularEncoder.field_slices`), one tabular token each; None: the NIH fields for their encoding's length.
        label_counts: training positives per label, for the reweighting prior (None: gains start at 1).
        image_size: input size the position embeddings are learned for (others are interpolated).
        patch_size: patch size on the stem's stride-4 map: 8 gives stride-32 tokens (7 x 7 at 224 px, the grid of
            the last CNN stage); 4 gives stride-16 tokens at about 1.4 times the cost.
        embed_dim, depth, num_heads, fpn_channels: override the size's token width, transformer blocks per stage,
            attention heads and feature-pyramid width.
        mlp_ratio, dropout_rate, drop_path_rate: transformer regularisation.
    """

    def __init__(
        self,
        num_classes: int = 14,
        in_channels: int = 1,
        num_tabular_features: int = NUM_TABULAR_FEATURES,
        network_size: str = "base",
        branches: Sequence[str] = BRANCHES,
        interaction: bool = True,
        fpn: bool = False,
        fusion: str = "attention",
        use_tabular: bool = True,
        class_reweighting: bool = True,
        label_counts: Optional[Sequence[float]] = None,
        image_size: int = 224,
        patch_size: int = 8,
        embed_dim: Optional[int] = None,
        depth: Optional[Sequence[int]] = None,
        num_heads: Optional[int] = None,
        fpn_channels: Optional[int] = None,
        mlp_ratio: float = 4.0,
        dropout_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        baseline_path: bool = True,
        deep_supervision: bool = False,
        tabular_fields: Optional[Sequence[Sequence[int]]] = None,
    ):
        super().__init__()
        if network_size not in SIZES:
            raise ValueError(f"network_size='{network_size}' is not supported; use one of {sorted(SIZES)}")
        branches = tuple(branches)
        unknown = [b for b in branches if b not in BRANCHES]
        if not branches or unknown:
            raise ValueError(f"branches={list(branches)} must be a non-empty subset of {list(BRANCHES)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion='{fusion}' is not supported; use one of {FUSIONS}")
        cfg = dict(SIZES[network_size])
        cfg.update(
            {
                k: v
                for k, v in (
                    ("embed_dim", embed_dim),
                    ("depth", depth),
                    ("num_heads", num_heads),
                    ("fpn_channels", fpn_channels),
                )
                if v
            }
        )
        dim, heads, pool = cfg["embed_dim"], cfg["num_heads"], cfg["pool_size"]
        self.num_classes = num_classes
        self.num_tabular_features = num_tabular_features
        self.use_cnn = "cnn" in branches
        self.use_transformer = "transformer" in branches
        self.relational = "relational" in branches
        self.interaction = interaction and self.use_cnn and self.use_transformer
        self.use_fpn = fpn
        self.fusion = fusion
        self.use_tabular = use_tabular
        self.pool_size = pool
        self.deep_supervision = deep_supervision
        refine = baseline_path and self.use_cnn

        # stem and CNN branch: MONAI's DenseNet, cut into its stem and 4 stages at strides 4, 8, 16, 32 (eqs. 1-2)
        densenet = DenseNet(
            2,
            in_channels,
            num_classes,
            init_features=cfg["init_features"],
            growth_rate=cfg["growth_rate"],
            block_config=cfg["block_config"],
            bn_size=cfg["bn_size"],
        )
        f = densenet.features
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        channels = _stage_channels(cfg["init_features"], cfg["growth_rate"], cfg["block_config"])
        self.cnn_channels = channels
        cnn_stages = [
            nn.Sequential(f.denseblock1),
            nn.Sequential(f.transition1, f.denseblock2),
            nn.Sequential(f.transition2, f.denseblock3),
            nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=True)),
        ]

        # transformer branch: stem patch tokens, 4 stages of pre-norm blocks aligned with the CNN stages (eqs. 3-5),
        # and the C2T/T2C interaction between aligned stages except the first, as in CTransCNN (eqs. 6-14)
        needs_patches = self.use_transformer or not self.use_cnn
        self.patch_embed = (
            PatchEmbed(cfg["init_features"], dim, patch_size, max(image_size // (4 * patch_size), 1))
            if needs_patches
            else None
        )
        rates = torch.linspace(0, drop_path_rate, max(sum(cfg["depth"]), 1)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i, d in enumerate(cfg["depth"]):
            blocks = [TransformerBlock(dim, heads, mlp_ratio, dropout_rate, rates[start + j]) for j in range(d)]
            start += d
            interact = self.interaction and i > 0
            self.stages.append(
                HybridStage(
                    cnn=cnn_stages[i] if self.use_cnn else None,
                    transformer=nn.Sequential(*blocks) if self.use_transformer else None,
                    norm=nn.LayerNorm(dim) if self.use_transformer and (fpn or i == 3) else None,
                    c2t=ConvToTokens(channels[i], dim) if interact else None,
                    t2c=(
                        TokensToConv(dim, channels[i], layer_scale=0.0 if refine else None)
                        if interact and i < 3
                        else None
                    ),
                )
            )

        # feature pyramids, pooled to image tokens with a level embedding each
        self.fpn = None
        self.cnn_token_proj = nn.ModuleList()
        if self.use_cnn:
            if fpn:
                # levels at strides 8, 16 and 32 (as RetinaNet's P3-P5): the stride-4 level would cost more than the
                # rest of the pyramid together and adds little once pooled to a few tokens
                self.fpn = FeaturePyramidNetwork(2, channels[1:], cfg["fpn_channels"])
                self.cnn_token_proj.extend([nn.Linear(cfg["fpn_channels"], dim) for _ in channels[1:]])
            else:
                self.cnn_token_proj.append(nn.Linear(channels[-1], dim))
        self.patch_token_proj = nn.Linear(dim, dim) if not (self.use_cnn or self.use_transformer) else None
        num_levels = (
            len(self.cnn_token_proj)
            + ((len(self.stages) if fpn else 1) if self.use_transformer else 0)
            + (1 if self.patch_token_proj is not None else 0)
        )
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        nn.init.trunc_normal_(self.level_embed, std=0.02)

        # tabular tokens, one per field (eq. 15)
        fields = (
            [tuple(int(v) for v in f) for f in tabular_fields]
            if tabular_fields
            else nih_tabular_fields(num_tabular_features)
        )
        if max(end for _, end, _ in fields) > num_tabular_features:
            raise ValueError(f"tabular_fields {fields} reach past num_tabular_features={num_tabular_features}")
        self.tabular_tokens = TabularTokenizer(fields, dim) if use_tabular else None
        missing = torch.from_numpy(missing_tabular_vector(num_tabular_features, fields))
        self.register_buffer("missing_tabular", missing, persistent=False)
        num_groups = num_levels + (1 if use_tabular else 0)

        # fusion into one embedding per label (eqs. 16-17)
        self.memory_norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList()
        self.relational_layers = nn.ModuleList()
        self.label_queries = None
        self.concat_mlp = None
        if fusion == "attention":
            self.label_queries = nn.Parameter(torch.zeros(num_classes, dim))
            nn.init.trunc_normal_(self.label_queries, std=0.02)
            self.decoder.extend(
                [
                    LabelDecoderLayer(dim, heads, self.relational, mlp_ratio, dropout_rate)
                    for _ in range(cfg["decoder_depth"])
                ]
            )
        else:
            self.concat_mlp = nn.Sequential(
                nn.Linear(num_groups * dim, 2 * dim),
                nn.GELU(),
                nn.Dropout(dropout_rate),
                nn.Linear(2 * dim, num_classes * dim),
            )
            if self.relational:
                self.relational_layers.extend(
                    [RelationalLayer(dim, heads, mlp_ratio, dropout_rate) for _ in range(cfg["decoder_depth"])]
                )
        self.label_norm = nn.LayerNorm(dim)
        self.reweighting = (
            ClassReweighting(initial_gains(None if label_counts is None else list(label_counts), num_classes))
            if class_reweighting
            else None
        )
        self.head = PerLabelHead(num_classes, dim)
        self.embed_dim = dim

        # the baseline's classifier path on the last CNN map, and the gate through which the fusion refines it
        self.baseline = LateFusionHead(channels[-1], num_classes, num_tabular_features, use_tabular) if refine else None
        self.gate = nn.Parameter(torch.zeros(num_classes)) if refine else None

    @torch.jit.unused
    def parameter_kind(self, name: str) -> str:
        """``baseline`` (stem, CNN stages, baseline classifier), ``gate`` (the fusion gate and the T2C scales, which
        start at 0) or ``fusion`` (the rest) for the parameter ``name`` (`engine.training.parameter_groups`)."""
        if name == "gate" or name.endswith("t2c.scale"):
            return "gate"
        if name.startswith(("stem.", "baseline.")) or (name.startswith("stages.") and ".cnn." in name):
            return "baseline"
        return "fusion"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each hybrid stage's activations during the backward pass instead of storing them: less memory
        in training for about one more forward pass of compute (``scripts/benchmark.py --variants checkpoint``)."""
        for stage in self.stages:
            stage.grad_checkpointing = bool(enable)

    # ---- image branches -------------------------------------------------------------------------------------
    def _image_tokens(self, image: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Image tokens per level, each ``(B, n_level, D)``, and the last CNN map (empty without the CNN branch)."""
        x = self.stem(image)  # (B, C0, H/4, W/4)
        tokens = torch.zeros(0)
        grid: List[int] = [0, 0]
        if self.patch_embed is not None:
            tokens, grid = self.patch_embed(x)  # (B, N, D), N = (H/32)(W/32)
        cnn_maps: List[torch.Tensor] = []
        token_maps: List[torch.Tensor] = []
        for stage in self.stages:
            x, tokens, token_map = stage(x, tokens, grid)
            if self.use_cnn:
                cnn_maps.append(x)
            if self.use_transformer:
                token_maps.append(token_map)
        levels: List[torch.Tensor] = []
        # pooled down to at most pool_size x pool_size, never interpolated up: small inputs give fewer tokens
        last = [max(image.shape[-2] // 32, 1), max(image.shape[-1] // 32, 1)]
        pool = [min(self.pool_size, last[0]), min(self.pool_size, last[1])]
        if self.use_cnn:
            if self.fpn is not None:
                feats: Dict[str, torch.Tensor] = OrderedDict()
                for i, m in enumerate(cnn_maps[1:]):
                    feats[str(i)] = m
                pyramid = self.fpn(feats)
                for i, proj in enumerate(self.cnn_token_proj):
                    levels.append(proj(grid_to_tokens(resize_grid(pyramid[str(i)], pool))))
            else:
                for proj in self.cnn_token_proj:
                    levels.append(proj(grid_to_tokens(resize_grid(cnn_maps[-1], pool))))
        if self.use_transformer:
            selected = token_maps if self.use_fpn else token_maps[-1:]
            for i, m in enumerate(selected):
                # deeper stages pooled coarser: a multi-depth, multi-scale pyramid
                side = max(self.pool_size >> max(i - 1, 0), 1) if self.use_fpn else self.pool_size
                levels.append(grid_to_tokens(resize_grid(m, [min(side, pool[0]), min(side, pool[1])])))
        if self.patch_token_proj is not None:
            levels.append(self.patch_token_proj(grid_to_tokens(resize_grid(tokens_to_grid(tokens, grid), pool))))
        last_map = cnn_maps[-1] if self.use_cnn else torch.zeros(0)
        return [lvl + self.level_embed[i] for i, lvl in enumerate(levels)], last_map

    # ---- fusion and heads -----------------------------------------------------------------------------------
    def _fused_labels(self, groups: List[torch.Tensor], batch: int) -> torch.Tensor:
        """Fused label embeddings ``(B, K, D)`` from the memory groups (image levels, tabular tokens)."""
        queries = self.label_queries
        if queries is not None:
            memory = self.memory_norm(torch.cat(groups, dim=1))  # (B, M, D)
            labels = queries.unsqueeze(0).expand(batch, -1, -1)  # (B, K, D)
            for layer in self.decoder:
                labels = layer(labels, memory)
        else:
            pooled = torch.cat([self.memory_norm(g).mean(1) for g in groups], dim=1)  # (B, groups * D)
            labels = pooled.new_zeros(0)
            if self.concat_mlp is not None:
                labels = self.concat_mlp(pooled).view(batch, self.num_classes, self.embed_dim)
            for layer in self.relational_layers:
                labels = layer(labels)
        labels = self.label_norm(labels)
        if self.reweighting is not None:
            labels = self.reweighting(labels)
        return labels

    def branch_logits(
        self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """The baseline path's logits ``(B, K)`` (None without it) and the label-query fusion's ``(B, K)``."""
        groups, last_map = self._image_tokens(image)
        if tabular is None:
            tabular = self.missing_tabular.unsqueeze(0).expand(image.shape[0], -1)
        if self.tabular_tokens is not None:
            groups.append(self.tabular_tokens(tabular))  # (B, fields, D)
        fused = self.head(self._fused_labels(groups, image.shape[0]))  # eq. 19
        base: Optional[torch.Tensor] = None
        if self.baseline is not None:
            base = self.baseline(torch.flatten(F.adaptive_avg_pool2d(last_map, 1), 1), tabular)  # eq. 20
        return base, fused

    def forward(self, image: torch.Tensor, tabular: Optional[torch.Tensor] = None) -> torch.Tensor:
        base, fused = self.branch_logits(image, tabular)
        gate = self.gate
        if base is None or gate is None:
            return fused
        logits = base + gate * fused  # eq. 21
        if self.deep_supervision and self.training:
            return torch.stack([logits, base, fused], dim=1)
        return logits

    # ---- initialisation -------------------------------------------------------------------------------------
    def load_cnn_weights(self, path: str) -> List[str]:
        """Initialise the stem and CNN stages from a DenseNet state dict file (MONAI or torchvision key names,
        optionally under ``features.``; 3-channel first convolutions are summed to ``in_channels``).

        Returns the DenseNet keys that found no match (e.g. the classifier). Nothing is downloaded.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in state:
            state = state["state_dict"]
        own = _densenet_keys(self)
        matched: Dict[str, torch.Tensor] = {}
        unused = []
        for key, value in state.items():
            if key.endswith("num_batches_tracked"):
                continue
            name = _normalise_densenet_key(key)
            if name not in own:
                unused.append(key)
                continue
            target = own[name]
            if name.endswith("conv0.weight") and value.shape[1] != target.shape[1]:
                value = value.sum(1, keepdim=True).repeat(1, target.shape[1], 1, 1) / target.shape[1]
            if value.shape != target.shape:
                raise ValueError(f"{path}: '{key}' has shape {tuple(value.shape)}; expected {tuple(target.shape)}")
            matched[name] = value
        missing = sorted(set(own) - set(matched))
        if missing:
            raise ValueError(f"{path}: no weights for {missing[:5]} ({len(missing)} in all): not a matching DenseNet")
        with torch.no_grad():
            for name, value in matched.items():
                own[name].copy_(value)
        return unused


def _normalise_densenet_key(key: str) -> str:
    key = key[len("module.") :] if key.startswith("module.") else key
    key = key[len("features.") :] if key.startswith("features.") else key
    # torchvision names a dense layer's parts norm1/conv1/...; MONAI puts them under "layers."
    parts = key.split(".")
    if len(parts) == 4 and parts[0].startswith("denseblock") and parts[1].startswith("denselayer"):
        parts = parts[:2] + ["layers"] + parts[2:]
    return ".".join(parts)


def _densenet_keys(net: MedFusionNet) -> Dict[str, torch.Tensor]:
    """Parameters and buffers of the stem and CNN stages under DenseNet's own key names."""
    keys: Dict[str, torch.Tensor] = {}
    for name, t in net.stem.state_dict(keep_vars=True).items():
        index, rest = name.split(".", 1)
        keys[f"{['conv0', 'norm0', 'relu0', 'pool0'][int(index)]}.{rest}"] = t
    stage_names = [
        ["denseblock1"],
        ["transition1", "denseblock2"],
        ["transition2", "denseblock3"],
        ["transition3", "denseblock4", "norm5"],
    ]
    for stage, names in zip(net.stages, stage_names):
        if stage.cnn is None:
            return {}
        for name, t in stage.cnn.state_dict(keep_vars=True).items():
            index, rest = name.split(".", 1)
            if int(index) < len(names):
                keys[f"{names[int(index)]}.{rest}"] = t
    return {k: v for k, v in keys.items() if not k.endswith("num_batches_tracked")}
