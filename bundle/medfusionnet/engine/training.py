"""The network, optimiser groups, learning-rate schedule and mixed-precision type as training runs them."""

from __future__ import annotations

import functools
import math

import torch


def with_cnn_weights(network, path: str | None):
    """Initialise ``network``'s CNN branch from a DenseNet state dict file when ``path`` is given; returns it.

    Raises:
        ValueError: when the network has no CNN branch to initialise.
    """
    if path:
        if not hasattr(network, "load_cnn_weights"):
            raise ValueError(f"cnn_weights='{path}' given, but {type(network).__name__} has no DenseNet CNN branch")
        network.load_cnn_weights(path)
    return network


AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype(name: str) -> torch.dtype:
    """The autocast type named by the ``amp_dtype`` config key.

    Raises:
        ValueError: naming the key and the accepted values.
    """
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype='{name}' is not supported; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[name]


def training_network(
    network,
    device,
    cnn_weights: str | None = None,
    grad_checkpointing: bool = False,
    channels_last: bool = False,
    deep_supervision: bool = False,
):
    """The network as training runs it: CNN weights loaded (`with_cnn_weights`), gradient checkpointing switched on
    when asked, branch logits returned in training when ``deep_supervision`` (for the auxiliary losses), moved to
    ``device`` (in channels-last memory format when asked, which suits tensor cores on CUDA).

    Raises:
        ValueError: when gradient checkpointing or deep supervision is asked of a network that does not support it.
    """
    network = with_cnn_weights(network, cnn_weights)
    if grad_checkpointing:
        if not hasattr(network, "set_grad_checkpointing"):
            raise ValueError(f"grad_checkpointing=True, but {type(network).__name__} does not support it")
        network.set_grad_checkpointing(True)
    if deep_supervision:
        if getattr(network, "gate", None) is None:
            raise ValueError(
                f"aux_loss_weight > 0 needs a network with a baseline path and a fusion to supervise "
                f"(medfusionnet with baseline_path and the CNN branch), not {type(network).__name__}"
            )
        network.deep_supervision = True
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def parameter_groups(network, fusion_lr_scale: float = 1.0, gate_lr_scale: float = 1.0) -> list[dict]:
    """The optimiser's parameter groups, each with its ``lr_scale`` (`warmup_cosine_schedule` applies it):
    MedFusionNet's baseline path (stem, CNN stages, baseline classifier) at 1, its fusion layers at
    ``fusion_lr_scale`` and its zero-initialised gates (the fusion gate, the T2C scales) at ``gate_lr_scale``; one
    group at 1 for networks without that split. A multi-GPU wrapper is looked through."""
    net = getattr(network, "module", network)
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    kind = getattr(net, "parameter_kind", None)
    if kind is None:
        return [{"params": [p for _, p in params], "lr_scale": 1.0}]
    scales = {"baseline": 1.0, "fusion": fusion_lr_scale, "gate": gate_lr_scale}
    groups = {k: [p for n, p in params if kind(n) == k] for k in scales}
    return [{"params": groups[k], "lr_scale": scales[k]} for k in scales if groups[k]]


def warmup_cosine_schedule(optimizer, max_epochs: int, warmup_epochs: int = 0):
    """Per-epoch learning-rate schedule: linear warm-up over ``warmup_epochs`` (epoch e at (e + 1) / (w + 1) of the
    peak), then cosine decay to 0 at ``max_epochs`` (with no warm-up, `CosineAnnealingLR`'s schedule). A group
    with an ``lr_scale`` entry (`parameter_groups`) runs at that multiple of the optimiser's rate."""
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]

    def factor(epoch: int, scale: float) -> float:
        if epoch < warmup_epochs:
            return scale * (epoch + 1) / (warmup_epochs + 1)
        progress = (epoch - warmup_epochs) / max(max_epochs - warmup_epochs, 1)
        return scale * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [functools.partial(factor, scale=s) for s in scales])
