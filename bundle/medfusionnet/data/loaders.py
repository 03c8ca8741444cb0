"""The data loaders of the workflows: unreadable images dropped from batches, one shard per rank under torchrun."""

from __future__ import annotations

import functools

import torch
from monai.data import DataLoader, DistributedSampler

from ..distributed import is_distributed
from .unreadable import SkipUnreadable, collate_skipping_unreadable


def data_loader(
    dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    train: bool = False,
    sampler=None,
):
    """A MONAI `DataLoader` that drops unreadable images from batches (`unreadable.collate_skipping_unreadable`).

    For evaluation it is wrapped in `unreadable.SkipUnreadable`, which keeps the skipped images' reasons and leaves
    out batches left empty; for training (``train=True``) the last,
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
        collate_fn=functools.partial(collate_skipping_unreadable, train=train),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=int(num_workers) > 0,
    )
    return loader if train else SkipUnreadable(loader)
