"""Compare networks' size, speed and memory in one process, and measure the data pipeline.

    python scripts/benchmark.py [--networks medfusionnet:base medfusionnet:tiny densenet121]
                                [--variants fp32 bf16 bf16+channels_last checkpoint compile] [--image_size 224]
                                [--batch_size 8] [--rounds 4] [--device cpu|cuda] [--no_memory]
                                [--data_dir ../shared/data/nih/images_full --data_limit 64 --data_workers 2]
                                [--output bench.json]

For every network and variant (see `medfusionnet.engine.benchmarking.Variant`): parameters, GMACs per image, training
images/s (forward, backward and AdamW step), inference latency per batch and images/s, peak training memory, and
achieved training FLOP/s as a fraction of a matrix product's FLOP/s measured on the same device in the same
precision. Timings interleave all rows round by round (the first round is a warm-up, which also absorbs
``torch.compile``'s compilation; the median of the other rounds is reported), so ratios to the reference network
(the last in ``--networks``, DenseNet-121 by default, in the same variant) and to the first variant of the same
network are measured under the same load.
With ``--data_dir``, the data pipeline's images/s from those files (decoding every time, then through a disk
cache being filled and read) is measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import medfusionnet
from medfusionnet.data.nih import folder_records
from medfusionnet.engine.benchmarking import (
    Variant,
    data_pipeline_report,
    example_batch,
    forward_flops,
    infer_step,
    matmul_peak_flops,
    peak_training_memory_mib,
    train_step,
    training_flops,
)


def build(spec: str, num_classes: int = 14) -> torch.nn.Module:
    """A network from ``name`` or ``name:size`` (e.g. ``medfusionnet:tiny``)."""
    name, _, size = spec.partition(":")
    return medfusionnet.create_network(name, num_classes=num_classes, **({"network_size": size} if size else {}))


def gmacs_per_image(net: torch.nn.Module, image_size: int) -> float:
    """Multiply-accumulates of one forward pass on one image, in billions (PyTorch's FLOP counter / 2)."""
    return forward_flops(net, image_size) / 2e9


def _rows(args, device):
    """The (network, variant) rows, skipping variants a network does not support."""
    torch.manual_seed(0)
    nets = {spec: build(spec) for spec in args.networks}
    rows = []
    for spec, net in nets.items():
        for name in args.variants:
            variant = Variant.parse(name)
            try:
                model = variant.apply(net, device)
            except ValueError as e:
                print(f"skipped {spec} / {name}: {e}")
                continue
            rows.append({"network": spec, "variant": name, "model": model, "base": net, "var": variant})
    return rows


def _time_rows(rows, args, device) -> None:
    for row in rows:
        row["batch"] = example_batch(args.batch_size, args.image_size, device, row["var"].channels_last)
        row["optimizer"] = torch.optim.AdamW(row["model"].parameters(), lr=1e-4)
        use_scaler = row["var"].dtype == torch.float16 and device.type == "cuda"
        row["scaler"] = torch.amp.GradScaler("cuda") if use_scaler else None
        row["train_s"], row["infer_s"] = [], []
    for r in range(args.rounds + 1):
        for row in rows:
            start = time.perf_counter()
            train_step(row["model"], row["optimizer"], row["var"], row["batch"], device, row["scaler"])
            train_s = time.perf_counter() - start
            start = time.perf_counter()
            infer_step(row["model"], row["var"], row["batch"], device)
            if r:  # round 0 warms up (and compiles)
                row["train_s"].append(train_s)
                row["infer_s"].append(time.perf_counter() - start)
    for row in rows:  # the median round: one slow round (another process, a page fault storm) does not count
        row["train_s"], row["infer_s"] = statistics.median(row["train_s"]), statistics.median(row["infer_s"])


def run(args) -> dict:
    """Measure every row and the data pipeline; returns the JSON-ready results."""
    device = torch.device(args.device)
    rows = _rows(args, device)
    if not rows:
        raise SystemExit("no network / variant combination to measure")
    peaks = {}
    for row in rows:
        dtype = row["var"].dtype or torch.float32
        if dtype not in peaks:
            peaks[dtype] = matmul_peak_flops(device, dtype, n=args.matmul_size)
    flops = {spec: training_flops(build(spec), args.image_size) for spec in args.networks}
    _time_rows(rows, args, device)
    results = []
    for row in rows:
        spec, net = row["network"], row["base"]
        train_img_s = args.batch_size / row["train_s"]
        res = {
            "network": spec,
            "variant": row["variant"],
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "gmacs": gmacs_per_image(net, args.image_size),
            "train_img_s": train_img_s,
            "infer_ms_per_batch": 1000 * row["infer_s"],
            "infer_img_s": args.batch_size / row["infer_s"],
            "train_tflop_s": flops[spec] * train_img_s / 1e12,
        }
        res["matmul_fraction"] = res["train_tflop_s"] * 1e12 / peaks[row["var"].dtype or torch.float32]
        if args.memory:
            res["peak_memory_mib"] = peak_training_memory_mib(net, row["var"], args.image_size, args.batch_size, device)
        results.append(res)
    reference = args.networks[-1]
    for res in results:
        ref = next((r for r in results if r["network"] == reference and r["variant"] == res["variant"]), None)
        first = next(r for r in results if r["network"] == res["network"])
        if ref:
            res["train_ratio_to_reference"] = res["train_img_s"] / ref["train_img_s"]
            res["infer_ratio_to_reference"] = res["infer_img_s"] / ref["infer_img_s"]
            res["gmacs_ratio_to_reference"] = res["gmacs"] / ref["gmacs"]
        res["train_ratio_to_first_variant"] = res["train_img_s"] / first["train_img_s"]
        if args.memory and first.get("peak_memory_mib") and res.get("peak_memory_mib") is not None:
            res["memory_ratio_to_first_variant"] = res["peak_memory_mib"] / first["peak_memory_mib"]
    report = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "reference": reference,
        "matmul_peak_tflop_s": {str(k).replace("torch.", ""): v / 1e12 for k, v in peaks.items()},
        "results": results,
    }
    if args.data_dir:
        records = folder_records(args.data_dir)[: args.data_limit]
        if not records:
            raise SystemExit(f"no images found under --data_dir {args.data_dir}")
        report["data_pipeline"] = data_pipeline_report(records, args.image_size, args.data_workers)
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def print_report(report: dict) -> None:
    """The results as a fixed-width table."""
    print(
        f"{report['device']} ({report['device_name']}), torch {report['torch']}, {report['threads']} threads, "
        f"image {report['image_size']} px, batch {report['batch_size']}, {report['rounds']} rounds; "
        f"matmul peak TFLOP/s {', '.join(f'{k} {v:.3f}' for k, v in report['matmul_peak_tflop_s'].items())}; "
        f"x ref: ratio to {report['reference']} in the same variant; x var: ratio to the network's first variant"
    )
    header = (
        f"{'network':<20}{'variant':<22}{'params M':>9}{'GMACs':>8}{'train img/s':>12}{'x ref':>7}{'x var':>7}"
        f"{'infer ms/b':>11}{'infer img/s':>12}{'x ref':>7}{'peak MiB':>10}{'x var':>7}{'TFLOP/s':>9}"
        f"{'of peak':>8}"
    )
    print(header)
    for res in report["results"]:
        mem = res.get("peak_memory_mib")
        print(
            f"{res['network']:<20}{res['variant']:<22}{res['params_m']:>9.2f}{res['gmacs']:>8.3f}"
            f"{res['train_img_s']:>12.2f}{res.get('train_ratio_to_reference', float('nan')):>7.2f}"
            f"{res['train_ratio_to_first_variant']:>7.2f}{res['infer_ms_per_batch']:>11.1f}"
            f"{res['infer_img_s']:>12.2f}{res.get('infer_ratio_to_reference', float('nan')):>7.2f}"
            f"{mem if mem is not None else float('nan'):>10.0f}"
            f"{res.get('memory_ratio_to_first_variant', float('nan')):>7.2f}"
            f"{res['train_tflop_s']:>9.4f}{res['matmul_fraction']:>8.1%}"
        )
    for res in report["results"]:
        if "train_ratio_to_reference" in res and res["network"] != report["reference"]:
            print(
                f"{res['network']} ({res['variant']}) against {report['reference']}: training "
                f"{res['train_ratio_to_reference']:.2f}x its images/s, inference latency "
                f"{1 / res['infer_ratio_to_reference']:.2f}x, GMACs {res['gmacs_ratio_to_reference']:.2f}x"
            )
    data = report.get("data_pipeline")
    if data:
        print(
            f"data pipeline, {data['images']} images, {data['workers']} workers: decoding "
            f"{data['decode_img_s']:.1f} img/s; disk cache fill {data['cache_fill_img_s']:.1f} img/s, "
            f"read {data['cache_read_img_s']:.1f} img/s"
        )


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["medfusionnet:base", "medfusionnet:tiny", "densenet121"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fp32"],
        help="'+'-joined options: fp32, bf16, fp16, channels_last, checkpoint, compile",
    )
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per row, after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--matmul_size",
        type=int,
        default=None,
        help="side of the matrices of the peak measurement (default 2048 on CPU, 8192 on CUDA)",
    )
    parser.add_argument("--no_memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    parser.add_argument("--data_dir", help="a folder of images for the data-pipeline measurement")
    parser.add_argument("--data_limit", type=int, default=64, help="images of --data_dir to use")
    parser.add_argument("--data_workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in args.variants:
        Variant.parse(name)  # fail before any measurement on a misspelt variant
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device.startswith("cuda") else 2048
    report = run(args)
    print_report(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
