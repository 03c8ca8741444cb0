"""Building blocks of MedFusionNet. Equation numbers refer to ``docs/architecture.md``.

Shapes use B (batch), C (channels), H x W (a feature map), N (tokens), D (embedding width), K (labels).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn


def resize_grid(x: torch.Tensor, size: List[int]) -> torch.Tensor:
    """Resample a map ``(B, C, H, W)`` to ``size``: average pooling when shrinking, bilinear when growing."""
    if x.shape[-2] == size[0] and x.shape[-1] == size[1]:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def tokens_to_grid(tokens: torch.Tensor, grid: List[int]) -> torch.Tensor:
    """``(B, N, D)`` tokens of an ``H x W`` grid (N = H W) to a map ``(B, D, H, W)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A map ``(B, D, H, W)`` to tokens ``(B, H W, D)``."""
    return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Two-layer perceptron with GELU: ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout_rate: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block (eq. 4): ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``; ``(B, N, D)`` in and out.

    Uses `torch.nn.MultiheadAttention`, which takes PyTorch's fused scaled-dot-product attention kernels.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout_rate: float = 0.0, drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout_rate)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, y, y, need_weights=False)[0])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Patch tokens from the stem's map plus learned position embeddings (eq. 3).

    ``(B, C, H, W) -> (B, N, D)`` with N = (H / patch_size)(W / patch_size); the position embeddings, learned for a
    ``grid_size`` square grid, are resized bicubically for other grids, so any input size works.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, grid_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid_size, grid_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        x = self.proj(x)  # (B, D, h, w)
        grid = [x.shape[-2], x.shape[-1]]
        pos = self.pos_embed
        if pos.shape[-2] != grid[0] or pos.shape[-1] != grid[1]:
            pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return grid_to_tokens(x + pos), grid


class ConvToTokens(nn.Module):
    """C2T, CNN to transformer (eqs. 6-9): a CNN map ``(B, C, H, W)`` to token updates ``(B, N, D)`` on the token
    grid: average pooling to the grid, a 1x1 conv with norm and activation plus a linear 1x1 shortcut, LayerNorm and
    GELU.

    The 1x1 convolutions run on whichever of the CNN map and the token grid is smaller (the paper convolves, then
    pools): for the linear shortcut the two orders are identical, and this keeps the cost of large maps low.
    """

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.GELU())
        self.shortcut = nn.Conv2d(in_channels, dim, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, grid: List[int]) -> torch.Tensor:
        if x.shape[-2] * x.shape[-1] > grid[0] * grid[1]:
            x = resize_grid(x, grid)
        x = resize_grid(self.conv(x) + self.shortcut(x), grid)  # (B, D, h, w), eqs. 6-8
        return F.gelu(self.norm(grid_to_tokens(x)))  # eq. 9


class TokensToConv(nn.Module):
    """T2C, transformer to CNN (eqs. 10-14): tokens ``(B, N, D)`` to an update ``(B, C, H, W)`` of a CNN map.

    Tokens back to their grid, a 1x1 conv with BN and ReLU (eq. 12), a residual branch of a 1x1 conv + ReLU and a
    1x1 conv + sigmoid (eq. 13) closed by a 1x1 conv (eq. 14), then bilinear upsampling (B) to the CNN map. The paper
    upsamples before the residual branch; here the branch runs on the small token grid and the sum is upsampled once
    (bilinear upsampling is linear, so only the branch's nonlinearities see the coarser grid), which makes T2C about
    (H W / N) times cheaper. The branch runs at ``C / reduction`` channels.

    ``layer_scale``: when given, a learned per-channel scale with this initial value multiplies the update
    (LayerScale); 0 makes T2C start as a no-op, so the CNN branch starts as the plain CNN (eq. 14a).
    """

    def __init__(self, dim: int, out_channels: int, reduction: int = 4, layer_scale: Optional[float] = None):
        super().__init__()
        hidden = max(out_channels // reduction, 8)
        self.scale = (
            nn.Parameter(torch.full((out_channels, 1, 1), float(layer_scale))) if layer_scale is not None else None
        )
        self.proj = nn.Sequential(
            nn.Conv2d(dim, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
        self.conv_r = nn.Sequential(nn.Conv2d(out_channels, hidden, 1), nn.ReLU(inplace=True))
        self.conv_s = nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.Sigmoid())
        self.conv_out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, tokens: torch.Tensor, grid: List[int], size: List[int]) -> torch.Tensor:
        x = self.proj(tokens_to_grid(tokens, grid))  # (B, C, h, w), eq. 12
        x = self.conv_out(self.conv_s(self.conv_r(x))) + x  # eqs. 13-14 on the token grid
        if self.scale is not None:
            x = x * self.scale  # eq. 14a
        return resize_grid(x, size)  # B(.), to the CNN map's (H, W)


class TabularTokenizer(nn.Module):
    """One token per tabular field (eq. 15): ``(B, F) -> (B, num_fields, D)``.

    A field is a slice of the encoded vector (age: value and missing flag; sex: one-hot and flag; ...). Its token is
    a linear projection of the slice, or the field's learned "missing" embedding when its missing flag is set, plus a
    learned field-type embedding. The projections of all fields are one ``(fields, width, D)`` weight (slices
    narrower than the widest are zero-padded), so the tokens come from one batched product however many fields
    there are.

    Args:
        fields: ``(start, end, missing_index)`` per field; ``missing_index`` is -1 for a field without a flag.
        dim: token width D.
    """

    def __init__(self, fields: List[Tuple[int, int, int]], dim: int):
        super().__init__()
        self.fields = [tuple(int(v) for v in f) for f in fields]
        width = max(end - start for start, end, _ in self.fields)
        index = torch.zeros(len(fields), width, dtype=torch.long)
        mask = torch.zeros(len(fields), width)
        for i, (start, end, _) in enumerate(self.fields):
            index[i, : end - start] = torch.arange(start, end)
            index[i, end - start :] = start
            mask[i, : end - start] = 1.0
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("flag_index", torch.tensor([max(f, 0) for _, _, f in self.fields]), persistent=False)
        self.register_buffer("has_flag", torch.tensor([f >= 0 for _, _, f in self.fields]), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(fields), width, dim))
        self.bias = nn.Parameter(torch.empty(len(fields), dim))
        for i, (start, end, _) in enumerate(self.fields):  # nn.Linear's default initialisation, per field
            bound = 1.0 / math.sqrt(end - start)
            nn.init.uniform_(self.weight[i], -bound, bound)
            nn.init.uniform_(self.bias[i], -bound, bound)
        with torch.no_grad():
            self.weight.mul_(self.mask.unsqueeze(-1))
        self.missing = nn.Parameter(torch.zeros(len(fields), dim))
        self.field_embed = nn.Parameter(torch.zeros(len(fields), dim))
        nn.init.trunc_normal_(self.missing, std=0.02)
        nn.init.trunc_normal_(self.field_embed, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints of 0.8.0 and earlier hold one nn.Linear per field (proj.<i>.weight (D, w), proj.<i>.bias)
        legacy = f"{prefix}proj.0.weight"
        if legacy in state_dict and f"{prefix}weight" not in state_dict:
            weight = torch.zeros(len(self.fields), self.weight.shape[1], self.weight.shape[2])
            for i, (start, end, _) in enumerate(self.fields):
                weight[i, : end - start] = state_dict.pop(f"{prefix}proj.{i}.weight").t()
            state_dict[f"{prefix}weight"] = weight
            state_dict[f"{prefix}bias"] = torch.stack(
                [state_dict.pop(f"{prefix}proj.{i}.bias") for i in range(len(self.fields))]
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        values = tabular[:, self.index] * self.mask  # (B, fields, width)
        tokens = torch.einsum("bfw,fwd->bfd", values, self.weight) + self.bias
        is_missing = (tabular[:, self.flag_index] > 0.5) & self.has_flag  # (B, fields)
        tokens = torch.where(is_missing.unsqueeze(-1), self.missing.unsqueeze(0).expand_as(tokens), tokens)
        return tokens + self.field_embed
