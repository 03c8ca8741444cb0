"""Compare networks' size and speed in one process: parameters, GMACs per image, training and inference images/s.

    python scripts/benchmark.py [--networks medfusionnet:base medfusionnet:tiny densenet121] [--image_size 224]
                                [--batch_size 8] [--rounds 4] [--device cpu] [--output bench.json]

Timings interleave the networks round by round (the first round is a warm-up), so a ratio to the reference
network (the last in ``--networks``, DenseNet-121 by default) is measured under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import medfusionnet


def build(spec: str, num_classes: int = 14) -> torch.nn.Module:
    """A network from ``name`` or ``name:size`` (e.g. ``medfusionnet:tiny``)."""
    name, _, size = spec.partition(":")
    return medfusionnet.create_network(name, num_classes=num_classes, **({"size": size} if size else {}))


def gmacs_per_image(net: torch.nn.Module, image_size: int) -> float:
    """Multiply-accumulates of one forward pass on one image, in billions (PyTorch's FLOP counter / 2)."""
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.rand(1, 1, image_size, image_size), torch.zeros(1, medfusionnet.NUM_TABULAR_FEATURES))
    return counter.get_total_flops() / 2e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["medfusionnet:base", "medfusionnet:tiny", "densenet121"])
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per network, after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {spec: build(spec) for spec in args.networks}
    results = {
        spec: {"params_m": sum(p.numel() for p in net.parameters()) / 1e6,
               "gmacs": gmacs_per_image(net, args.image_size), "train_s": 0.0, "infer_s": 0.0}
        for spec, net in nets.items()
    }
    image = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=device)
    tabular = torch.zeros(args.batch_size, medfusionnet.NUM_TABULAR_FEATURES, device=device)
    target = (torch.rand(args.batch_size, 14, device=device) > 0.8).float()
    optimizers = {}
    for spec, net in nets.items():
        net.to(device)
        optimizers[spec] = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for r in range(args.rounds + 1):
        for spec, net in nets.items():
            net.train()
            _sync(device)
            start = time.perf_counter()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(image, tabular), target)
            optimizers[spec].zero_grad()
            loss.backward()
            optimizers[spec].step()
            _sync(device)
            train_s = time.perf_counter() - start
            net.eval()
            start = time.perf_counter()
            with torch.inference_mode():
                net(image, tabular)
            _sync(device)
            if r:
                results[spec]["train_s"] += train_s
                results[spec]["infer_s"] += time.perf_counter() - start
    reference = args.networks[-1]
    images = args.batch_size * args.rounds
    for spec in nets:
        res = results[spec]
        res["train_img_s"] = images / res.pop("train_s")
        res["infer_img_s"] = images / res.pop("infer_s")
    for spec in nets:
        res, ref = results[spec], results[reference]
        res["train_ratio"] = res["train_img_s"] / ref["train_img_s"]
        res["infer_ratio"] = res["infer_img_s"] / ref["infer_img_s"]
        res["gmacs_ratio"] = res["gmacs"] / ref["gmacs"]
    print(f"device {device}, image {args.image_size} px, batch {args.batch_size}, {args.rounds} rounds; "
          f"ratios to {reference}")
    print(f"{'network':<20}{'params M':>10}{'GMACs':>8}{'train img/s':>13}{'ratio':>7}{'infer img/s':>13}"
          f"{'ratio':>7}{'GMACs x':>9}")
    for spec, res in results.items():
        print(f"{spec:<20}{res['params_m']:>10.2f}{res['gmacs']:>8.3f}{res['train_img_s']:>13.2f}"
              f"{res['train_ratio']:>7.2f}{res['infer_img_s']:>13.2f}{res['infer_ratio']:>7.2f}"
              f"{res['gmacs_ratio']:>9.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": str(device), "image_size": args.image_size, "batch_size": args.batch_size,
                       "rounds": args.rounds, "reference": reference, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
