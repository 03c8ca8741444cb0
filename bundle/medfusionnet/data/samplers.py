"""Balanced multilabel mini-batch sampling with a repeat cap, for one process or one rank of many.

Each image gets a weight from the rarest finding it shows: ``(1 / frequency of that finding) ** power``; images
without findings use the "No Finding" frequency times ``no_finding_factor`` (selective undersampling of the
dominant normal class). ``power`` 1 is fully balanced, 0 the natural distribution (uniform over images), which is
what the curriculum (`handlers.CurriculumHandler`) anneals between.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..distributed import is_distributed

logger = logging.getLogger(__name__)


def balanced_sample_weights(labels: np.ndarray, power: float = 1.0, no_finding_factor: float = 0.5) -> np.ndarray:
    """Per-image sampling weights ``(N,)`` from a multi-hot matrix ``(N, K)``, summing to 1 (see module docstring)."""
    labels = np.asarray(labels) > 0.5
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0)
    freq = np.maximum(labels.sum(0), 1) / n  # (K,)
    normal = ~labels.any(1)
    inv = np.where(labels, 1.0 / freq[None, :], 0.0).max(1)  # rarest finding of each image
    inv[normal] = n / max(int(normal.sum()), 1) * no_finding_factor
    weights = inv ** float(power)
    return weights / weights.sum()


def capped_draw(weights: np.ndarray, size: int, max_repeats: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices drawn with probability ``weights``, none more than ``max_repeats`` times.

    Draws without replacement from ``max_repeats`` weighted copies of every index; needs
    ``size <= max_repeats * (number of indices with a positive weight)``.
    """
    candidates = np.flatnonzero(weights > 0)
    if size > max_repeats * len(candidates):
        raise ValueError(f"cannot draw {size} samples from {len(candidates)} images with max_repeats={max_repeats}")
    pool = np.repeat(candidates, max_repeats)
    p = np.repeat(weights[candidates], max_repeats)
    return rng.choice(pool, size=size, replace=False, p=p / p.sum())


class BalancedMultilabelSampler(Sampler[int]):
    """Weighted sampling of ``num_samples`` image indices per epoch with a cap on repeats.

    In a distributed run (``num_replicas`` > 1) the images are first split into disjoint per-rank shards (a
    permutation shared by all ranks for the epoch), then each rank draws from its own shard, so ranks never see the
    same image in an epoch and every rank draws the same number of samples.

    Args:
        labels: multi-hot matrix ``(N, K)`` of the training images.
        power: balance exponent, 1 balanced to 0 natural; `set_power` changes it (curriculum).
        max_repeats: most times one image may be drawn per epoch (moderated oversampling).
        no_finding_factor: extra factor on the weight of images without findings.
        num_samples: draws per epoch over all ranks (default: the number of images).
        num_replicas, rank: distributed shard; by default taken from `torch.distributed` when it is running.
        seed: base seed; each epoch (`set_epoch`) draws differently.
    """

    def __init__(
        self,
        labels,
        power: float = 1.0,
        max_repeats: int = 3,
        no_finding_factor: float = 0.5,
        num_samples: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        distributed = is_distributed()
        self.num_replicas = num_replicas or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank={self.rank} must lie in [0, num_replicas={self.num_replicas})")
        if max_repeats < 1:
            raise ValueError(f"max_repeats={max_repeats} must be at least 1")
        self.labels = np.asarray(labels, dtype=np.float32)
        self.power = float(power)
        self.max_repeats = int(max_repeats)
        self.no_finding_factor = float(no_finding_factor)
        total = int(num_samples or len(self.labels))
        # per rank, rounded down (as drop_last) so every rank draws the same number from its shard
        self.num_samples = max(total // self.num_replicas, 1)
        if self.num_samples > self.max_repeats * (len(self.labels) // self.num_replicas):
            raise ValueError(
                f"num_samples={total} exceeds max_repeats={max_repeats} draws of each of the "
                f"{len(self.labels)} images"
            )
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different sample in each epoch (called by MONAI's trainer for distributed samplers too)."""
        self.epoch = int(epoch)

    def set_power(self, power: float) -> None:
        """Set the balance exponent (1 balanced, 0 natural)."""
        self.power = float(power)

    def shard(self) -> np.ndarray:
        """This rank's image indices for the current epoch."""
        order = np.random.default_rng((self.seed, self.epoch, 0)).permutation(len(self.labels))
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self.shard()
        weights = balanced_sample_weights(self.labels[indices], self.power, self.no_finding_factor)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank + 1))
        return iter(indices[capped_draw(weights, self.num_samples, self.max_repeats, rng)].tolist())

    def __len__(self) -> int:
        return self.num_samples


def training_sampler(
    records, sampling: str = "balanced", max_repeats: int = 3, no_finding_factor: float = 0.5, seed: int = 0
) -> BalancedMultilabelSampler | None:
    """The training sampler for ``sampling``: ``balanced`` (`BalancedMultilabelSampler`) or ``natural`` (None: the
    loader shuffles, or shards with a `DistributedSampler` under torchrun)."""
    if sampling == "natural":
        return None
    if sampling != "balanced":
        raise ValueError(f"sampling='{sampling}' is not supported; use balanced or natural")
    labels = np.stack([np.asarray(r["label"]) for r in records]) if records else np.zeros((0, 0))
    return BalancedMultilabelSampler(labels, max_repeats=max_repeats, no_finding_factor=no_finding_factor, seed=seed)
