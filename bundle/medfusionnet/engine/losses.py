"""Multilabel losses against label imbalance: class-weighted focal loss, asymmetric loss and their Pareto-balanced
combination. All take logits ``(B, K)`` and binary targets ``(B, K)`` and return a scalar."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.losses import DeepSupervisionLoss, FocalLoss
from torch import nn
from torch.nn import functional as F

from ..data.label_weights import inverse_frequency_weights
from ..files import write_json_atomic

LOSSES = ("bce", "focal", "asl", "focal_asl", "bce_focal")


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021; CTransCNN eqs. 17-18) for multilabel logits.

    ``L+ = (1 - p)^gamma_pos log(p)``, ``L- = p_m^gamma_neg log(1 - p_m)`` with ``p_m = max(p - clip, 0)``;
    the loss is minus their sum, weighted per class by ``weight`` and averaged over batch and classes. With both
    gammas 0 and ``clip`` 0 it equals binary cross-entropy.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        weight: torch.Tensor | None = None,
        eps: float = 1e-8,
    ):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = gamma_pos, gamma_neg, clip, eps
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp_min(0) if self.clip > 0 else p
        # log(p) and log(1 - p_m) computed stably from the logits where no shift applies
        log_p = F.logsigmoid(logits)
        log_not_pm = torch.log((1 - p_m).clamp_min(self.eps)) if self.clip > 0 else F.logsigmoid(-logits)
        loss = target * (1 - p).pow(self.gamma_pos) * log_p + (1 - target) * p_m.pow(self.gamma_neg) * log_not_pm
        loss = -loss
        if self.weight is not None:
            loss = loss * self.weight.to(loss.device)
        return loss.mean()


class ParetoCombinedLoss(nn.Module):
    """Two losses combined as ``a L1 + (1 - a) L2``, with ``a`` chosen each step as the Pareto-stationary
    (min-norm) combination of their normalised gradients: CTransCNN's balanced focal + ASL.

    This is MGDA (Sener and Koltun, 2018) with gradient normalisation; for two losses the min-norm point of two
    unit vectors is their midpoint, so ``a = |g2| / (|g1| + |g2|)`` and both losses move the logits with the same
    strength whatever their scales. Gradients are taken with respect to the logits (MGDA's cheap upper bound);
    ``alpha_`` holds the last weight, reused when no gradient is computed (evaluation).
    """

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second
        self.alpha_ = 0.5

    @staticmethod
    def balance(g1: torch.Tensor, g2: torch.Tensor) -> float:
        """Weight ``a`` of the first loss that equalises ``|a g1|`` and ``|(1 - a) g2|``."""
        n1, n2 = float(g1.norm()), float(g2.norm())
        return 0.5 if n1 + n2 == 0 else n2 / (n1 + n2)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        l1, l2 = self.first(logits, target), self.second(logits, target)
        if torch.is_grad_enabled() and logits.requires_grad:
            g1 = torch.autograd.grad(l1, logits, retain_graph=True)[0]
            g2 = torch.autograd.grad(l2, logits, retain_graph=True)[0]
            self.alpha_ = self.balance(g1, g2)
        return self.alpha_ * l1 + (1.0 - self.alpha_) * l2


class SumLoss(nn.Module):
    """The plain sum of several losses on the same logits and targets (CONVFCMAE's BCE + focal)."""

    def __init__(self, *losses: nn.Module):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(loss(logits, target) for loss in self.losses)


class BranchSupervisionLoss(nn.Module):
    """Deep supervision of MedFusionNet's branches (``deep_supervision=True``): for logits ``(B, 3, K)`` (the
    network's, its baseline path's and its fusion's) the loss is ``L(z) + aux_weight * (L(z_base) + L(z_fusion))``,
    through MONAI's `DeepSupervisionLoss`; logits ``(B, K)`` (other networks, evaluation) get ``L(z)``."""

    def __init__(self, loss: nn.Module, aux_weight: float):
        super().__init__()
        self.loss = loss
        self.deep = DeepSupervisionLoss(loss, weights=[1.0, aux_weight, aux_weight])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 3:
            return self.deep(list(logits.unbind(1)), target)
        return self.loss(logits, target)


def create_loss(
    name: str = "focal",
    label_counts: Sequence[float] | None = None,
    class_weight_power: float = 0.5,
    focal_gamma: float = 2.0,
    asl_gamma_neg: float = 4.0,
    asl_clip: float = 0.05,
    output_dir: str | None = None,
    aux_loss_weight: float = 0.0,
) -> nn.Module:
    """The training loss by name: ``bce``, ``focal`` (MONAI `FocalLoss`, sigmoid, per-class weights), ``asl``,
    ``focal_asl`` (their Pareto-balanced sum, CTransCNN's) or ``bce_focal`` (BCE plus focal, CONVFCMAE's).

    Class weights are `label_weights.inverse_frequency_weights` of the training split's ``label_counts`` at
    ``class_weight_power``; without counts, or with power 0, classes weigh the same. ``focal_gamma`` is the focal
    loss's focusing exponent (0 gives weighted BCE). With ``output_dir`` the weights are saved there as
    ``class_weights.json``. ``aux_loss_weight`` > 0 wraps the loss in `BranchSupervisionLoss`.
    """
    loss = _named_loss(name, label_counts, class_weight_power, focal_gamma, asl_gamma_neg, asl_clip, output_dir)
    return BranchSupervisionLoss(loss, aux_loss_weight) if aux_loss_weight > 0 else loss


def _named_loss(name, label_counts, class_weight_power, focal_gamma, asl_gamma_neg, asl_clip, output_dir):
    if name not in LOSSES:
        raise ValueError(f"loss='{name}' is not supported; use one of {LOSSES}")
    weight = None
    if label_counts is not None and class_weight_power:
        weight = inverse_frequency_weights(label_counts, class_weight_power)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        saved = {"power": class_weight_power, "weights": None if weight is None else weight.tolist()}
        write_json_atomic(os.path.join(output_dir, "class_weights.json"), saved)
    bce = nn.BCEWithLogitsLoss(pos_weight=None, weight=weight)
    if name == "bce":
        return bce
    focal = FocalLoss(gamma=focal_gamma, weight=weight, use_softmax=False, reduction="mean")
    asl = AsymmetricLoss(gamma_pos=0.0, gamma_neg=asl_gamma_neg, clip=asl_clip, weight=weight)
    if name == "focal":
        return focal
    if name == "asl":
        return asl
    if name == "bce_focal":
        return SumLoss(bce, focal)
    return ParetoCombinedLoss(focal, asl)
