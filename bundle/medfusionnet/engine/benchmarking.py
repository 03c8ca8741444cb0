"""Measurements behind ``scripts/benchmark.py``: training variants, FLOP counts, matmul peak, peak memory and the
throughput of the data pipeline.

A *variant* is a ``+``-joined set of options applied to a network for training and inference:
``fp32`` (nothing), ``bf16`` / ``fp16`` (autocast mixed precision), ``channels_last`` (NHWC memory format),
``checkpoint`` (gradient checkpointing of MedFusionNet's hybrid stages) and ``compile`` (``torch.compile``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..constants import NUM_CLASSES
from ..data.tabular import NUM_TABULAR_FEATURES

logger = logging.getLogger(__name__)

VARIANT_OPTIONS = ("fp32", "bf16", "fp16", "channels_last", "checkpoint", "compile")


@dataclass(frozen=True)
class Variant:
    """Training options parsed from a variant name such as ``bf16+channels_last``."""

    name: str
    dtype: torch.dtype | None = None
    channels_last: bool = False
    checkpoint: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        """Parse ``name``; raises ValueError naming an unknown option or two precisions."""
        options = [o for o in name.split("+") if o]
        unknown = [o for o in options if o not in VARIANT_OPTIONS]
        if not options or unknown:
            raise ValueError(f"variant '{name}': unknown option(s) {unknown}; use '+'-joined {VARIANT_OPTIONS}")
        precisions = [o for o in options if o in ("fp32", "bf16", "fp16")]
        if len(precisions) > 1:
            raise ValueError(f"variant '{name}' names {len(precisions)} precisions; give at most one")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precisions[0] if precisions else "fp32")
        return cls(name, dtype, "channels_last" in options, "checkpoint" in options, "compile" in options)

    def autocast(self, device: torch.device):
        """The autocast context of this variant on ``device`` (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def apply(self, net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """A copy of ``net`` on ``device`` with this variant's memory format, checkpointing and compilation.

        Raises:
            ValueError: for ``checkpoint`` on a network without ``set_grad_checkpointing``.
        """
        net = copy.deepcopy(net).to(device)
        if self.checkpoint:
            if not hasattr(net, "set_grad_checkpointing"):
                raise ValueError(f"variant '{self.name}': {type(net).__name__} has no gradient checkpointing")
            net.set_grad_checkpointing(True)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.compile:
            net = torch.compile(net)
        return net


def example_batch(batch_size: int, image_size: int, device: torch.device, channels_last: bool = False, seed: int = 0):
    """A random ``(image, tabular, target)`` batch of the network's input shapes (about 20% positive labels)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 1, image_size, image_size, generator=generator)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    tabular = torch.zeros(batch_size, NUM_TABULAR_FEATURES)
    target = (torch.rand(batch_size, NUM_CLASSES, generator=generator) > 0.8).float()
    return image.to(device), tabular.to(device), target.to(device)


def forward_flops(net: torch.nn.Module, image_size: int) -> float:
    """Floating-point operations of one forward pass on one image (PyTorch's FLOP counter; 2 per multiply-add)."""
    net = copy.deepcopy(net).cpu().eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 1, image_size, image_size), torch.zeros(1, NUM_TABULAR_FEATURES))
    return float(counter.get_total_flops())


def training_flops(net: torch.nn.Module, image_size: int) -> float:
    """Floating-point operations of one training step per image, estimated as three forward passes (the backward
    pass computes gradients for both inputs and weights, about twice the forward's work), the usual basis of
    model-FLOP utilisation."""
    return 3 * forward_flops(net, image_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """The best FLOP/s of an ``n x n`` matrix product on ``device`` in ``dtype``, after one warm-up: a measured
    ceiling to compare a network's achieved FLOP/s with."""
    a = torch.rand(n, n, device=device).to(dtype)
    b = torch.rand(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def train_step(net, optimizer, variant: Variant, batch, device: torch.device, scaler=None) -> None:
    """One optimiser step on ``batch`` (BCE loss) under the variant's autocast, waiting for the device."""
    image, tabular, target = batch
    net.train()
    with variant.autocast(device):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tabular).float(), target)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    _sync(device)


def infer_step(net, variant: Variant, batch, device: torch.device) -> None:
    """One inference pass over ``batch`` under the variant's autocast, waiting for the device."""
    image, tabular, _ = batch
    net.eval()
    with torch.inference_mode(), variant.autocast(device):
        net(image, tabular)
    _sync(device)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


def _rss_peak_growth(run) -> float:
    """MiB by which the resident set size peaks above its current value while ``run()`` executes.

    Uses Linux's per-process high-water mark (``VmHWM``), reset first through ``/proc/self/clear_refs``;
    ``ru_maxrss`` would not do, since it keeps the parent's figure across ``exec``.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    run()
    return _status_mib("VmHWM") - before


def _cpu_memory_probe(net: torch.nn.Module, variant_name: str, image_size: int, batch_size: int, steps: int) -> float:
    device = torch.device("cpu")
    variant = Variant.parse(variant_name)
    net = variant.apply(net, device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = example_batch(batch_size, image_size, device, variant.channels_last)

    def run():
        for _ in range(steps):
            train_step(net, optimizer, variant, batch, device)

    return _rss_peak_growth(run)


def peak_training_memory_mib(
    net: torch.nn.Module, variant: Variant, image_size: int, batch_size: int, device: torch.device, steps: int = 3
) -> float | None:
    """Peak memory of training steps, in MiB.

    On CUDA: the allocator's peak (weights, gradients, optimiser state, activations). On CPU: the growth of the
    resident set size from before the first of ``steps`` steps to its peak (Linux only), measured in a fresh
    process so that memory freed by other networks cannot be reused unseen (the weights are already resident, so
    this is gradients, optimiser state, activations and workspace).
    """
    if device.type == "cuda":
        net = variant.apply(net, device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        batch = example_batch(batch_size, image_size, device, variant.channels_last)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            train_step(net, optimizer, variant, batch, device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        logger.warning("peak CPU memory is measured on Linux only; not reported here")
        return None
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_memory_probe, (net.cpu(), variant.name, image_size, batch_size, steps))


def pipeline_images_per_second(
    records: list[dict],
    image_size: int,
    workers: int = 2,
    batch_size: int = 8,
    cache: str | None = None,
    cache_dir: str | None = None,
    passes: int = 1,
) -> list[float]:
    """Images per second through the training preprocessing (load, tabular encoding, resize, augmentation) and a
    data loader, for each of ``passes`` passes over ``records`` (with ``cache='disk'`` the first pass fills the
    cache and later ones read it)."""
    from ..data.loaders import data_loader
    from ..data.tabular import TabularEncoder
    from ..data.transforms import XrayDataset, xray_transforms

    encoder = TabularEncoder().fit(records)
    dataset = XrayDataset(
        records, xray_transforms(encoder, image_size, train=True, with_label=False), cache=cache, cache_dir=cache_dir
    )
    rates = []
    for _ in range(passes):
        loader = data_loader(dataset, batch_size, num_workers=workers)
        start = time.perf_counter()
        count = sum(len(batch["image"]) for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return rates


def data_pipeline_report(records: list[dict], image_size: int, workers: int = 2) -> dict:
    """Throughput of the data pipeline from ``records``' files: plain decoding every pass, then a disk cache of the
    decoded, resized images (MONAI ``PersistentDataset``) being filled and then read."""
    plain = pipeline_images_per_second(records, image_size, workers)[0]
    with tempfile.TemporaryDirectory() as cache_dir:
        fill, cached = pipeline_images_per_second(
            records, image_size, workers, cache="disk", cache_dir=cache_dir, passes=2
        )
    return {
        "images": len(records),
        "workers": workers,
        "decode_img_s": plain,
        "cache_fill_img_s": fill,
        "cache_read_img_s": cached,
    }
