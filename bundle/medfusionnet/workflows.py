"""Small helpers the workflow configs call: data loaders, devices and rank checks."""

from __future__ import annotations

import functools
import math

import torch
from monai.data import DataLoader, DistributedSampler

from .constants import KEY_IMAGE
from .files import write_json_atomic
from .transforms import collate_skipping_unreadable


def is_distributed() -> bool:
    """Whether a torch.distributed process group is running (a ``torchrun`` launch)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def finish_distributed() -> None:
    """End a ``torchrun`` process group cleanly: wait until every rank is done, then destroy the group.

    Without the barrier a rank that finishes first tears down its Gloo connections while a peer's worker threads
    still use them, and the process can abort at exit ("terminate called without an active exception").
    """
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: the process that writes checkpoints, reports and logs."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def data_loader(
    dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    train: bool = False,
    sampler=None,
) -> DataLoader:
    """A MONAI `DataLoader` that drops unreadable images from batches (`collate_skipping_unreadable`).

    For evaluation, batches left empty are skipped (`SkipEmptyBatches`); for training (``train=True``) the last,
    incomplete batch of an epoch is dropped, and a full batch of unreadable images raises an error naming the files,
    since the trainer needs a fixed number of iterations per epoch. In a distributed run
    each rank reads its own shard through a `DistributedSampler` (which also does the shuffling). A given
    ``sampler`` (e.g. `samplers.BalancedMultilabelSampler`, which shards by rank itself) replaces both.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers={num_workers} must be 0 or more")
    if sampler is not None:
        shuffle = False
    elif is_distributed():
        # evaluation shards may be uneven, so no image is counted twice; training needs equal shards for DDP
        sampler = DistributedSampler(dataset, even_divisible=train, shuffle=shuffle, seed=seed)
        shuffle = False
    # training drops an epoch's last, incomplete batch (when there is a full one): a small remainder made of
    # unreadable images would otherwise stop the run, and batch norm cannot train on a single image
    drop_last = train and (len(sampler) if sampler is not None else len(dataset)) >= int(batch_size)
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=int(num_workers),
        collate_fn=functools.partial(collate_skipping_unreadable, allow_empty=not train),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=int(num_workers) > 0,
    )
    return loader if train else SkipEmptyBatches(loader)


class SkipEmptyBatches:
    """Iterates a data loader but leaves out batches left empty because all their images were unreadable.

    It has no length, so Ignite counts the iterations of the first epoch (evaluation runs a fixed set of files, so
    every run sees the same count). Other attributes (``dataset``, ``sampler``) are those of the loader.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            if len(batch[KEY_IMAGE]):
                yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


RUN_SETTINGS_FILE = "run_settings.json"


def save_run_settings(output_dir: str, **settings) -> None:
    """Write the settings that evaluation and inference must reuse (image size, network name) to
    ``<output_dir>/run_settings.json``; only the main process writes."""
    import os

    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, RUN_SETTINGS_FILE), settings)


def saved_setting(output_dir: str, key: str, default=None):
    """A setting saved by `save_run_settings` in ``output_dir``, or ``default`` when there is none.

    Raises:
        FileNotFoundError: when nothing was saved and no default is given.
    """
    import json
    import os

    path = os.path.join(output_dir, RUN_SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            settings = json.load(f)
        if key in settings:
            return settings[key]
    if default is None:
        raise FileNotFoundError(f"no '{key}' in {path}: train first, or pass --{key} explicitly")
    return default


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


def check_checkpoint(path: str, network) -> None:
    """Refuse a checkpoint that does not fit ``network``, naming the mismatch (before the engine loads it).

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
        ValueError: naming ``path`` and the first differing parameters (shape mismatch, e.g. another label set, or
            names missing on either side, e.g. another architecture).
    """
    import os

    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found; train first or pass --ckpt_path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled whole model (refused unrun), a text file, a truncated download
        raise ValueError(f"checkpoint {path} cannot be read as a state dict: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    own = network.module.state_dict() if hasattr(network, "module") else network.state_dict()
    shapes = [
        f"'{k}' is {tuple(v.shape)} in the checkpoint but {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(
            f"{len(shapes)} parameter(s) differ in shape, e.g. {'; '.join(shapes[:3])} (another label "
            "set or network size?)"
        )
    if missing or unexpected:
        problems.append(
            f"{len(missing)} parameter(s) of this network are absent from the checkpoint (e.g. "
            f"{missing[:3]}) and {len(unexpected)} are unknown here (e.g. {unexpected[:3]}) (another "
            "architecture or ablation?)"
        )
    if problems:
        raise ValueError(f"checkpoint {path} does not fit the configured network: " + "; ".join(problems))
