"""Check the TorchScript export (``ckpt_export``) and, where present, the ONNX export against the eager model on
real images: parity and speed.

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file metadata.json --config_file configs/inference.yaml
    python scripts/export_onnx.py --model_dir models   # optional: models/model.onnx
    python scripts/export_check.py --model_dir models --input_dir ../shared/data/nih/images_full \\
        --tabular_csv ../shared/data/nih/labels.csv [--batch_size 16] [--output export_check.json]

Runs both models on the same preprocessed batches (the inference transforms and the run's tabular encoder), with
and without the tabular input, and reports the largest absolute logit difference, the metadata and configs embedded
in the ``.ts`` file, and the latency per batch and images/s of each model, measured interleaved in one process.
The ONNX file (``--model_onnx``, default ``<model_dir>/model.onnx`` when it exists) is run with onnxruntime on the
same batches, with the tabular input. Exits with 1 when a difference reaches ``--tolerance`` (1e-4) or embedded
metadata is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

from medfusionnet.constants import KEY_IMAGE, KEY_TABULAR
from medfusionnet.data.nih import folder_records
from medfusionnet.data.transforms import XrayDataset, xray_transforms
from medfusionnet.data.unreadable import collate_skipping_unreadable
from medfusionnet.engine.export import ONNX_EMBEDDED, OnnxModel
from medfusionnet.explain.workflow import load_trained

EMBEDDED = ("metadata.json", "inference.json")


def load_scripted(path: str):
    """``(module, {name: text})``: the TorchScript model and the files `ckpt_export` embedded in it."""
    extra = dict.fromkeys(EMBEDDED, "")
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return module.eval(), extra


def batches(encoder, image_size: int, input_dir: str, tabular_csv: str | None, batch_size: int, limit: int):
    """Preprocessed ``(image, tabular)`` batches of at most ``limit`` readable images under ``input_dir``."""
    records = folder_records(input_dir, tabular_csv)[:limit]
    dataset = XrayDataset(records, xray_transforms(encoder, image_size, with_label=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_unreadable)
    return [
        (b[KEY_IMAGE].as_tensor() if hasattr(b[KEY_IMAGE], "as_tensor") else b[KEY_IMAGE], b[KEY_TABULAR])
        for b in loader
        if len(b[KEY_IMAGE])
    ]


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="a training run's output_dir (model.pt, run_settings)")
    parser.add_argument("--model_ts", help="the exported file (default: <model_dir>/model.ts)")
    parser.add_argument("--model_onnx", help="the ONNX export (default: <model_dir>/model.onnx when present)")
    parser.add_argument("--input_dir", required=True, help="folder of PNG/DICOM/NIfTI images")
    parser.add_argument("--tabular_csv")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=64, help="images used at most")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches per model")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--output", help="JSON file for the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    ts_path = args.model_ts or os.path.join(args.model_dir, "model.ts")
    if not os.path.isfile(ts_path):
        print(f"{ts_path} not found; export it first with python -m monai.bundle ckpt_export (see --help)")
        return 1
    eager, encoder, image_size, _ = load_trained(args.model_dir)
    scripted, extra = load_scripted(ts_path)
    data = batches(encoder, image_size, args.input_dir, args.tabular_csv, args.batch_size, args.limit)
    if not data:
        print(f"no readable image under {args.input_dir}")
        return 1
    max_diff = {"with_tabular": 0.0, "without_tabular": 0.0}
    with torch.no_grad():
        for image, tabular in data:
            diff = (scripted(image, tabular) - eager(image, tabular)).abs().max().item()
            max_diff["with_tabular"] = max(max_diff["with_tabular"], diff)
            diff = (scripted(image) - eager(image)).abs().max().item()
            max_diff["without_tabular"] = max(max_diff["without_tabular"], diff)
        models = {"eager": eager, "torchscript": scripted}
        onnx_path = args.model_onnx or os.path.join(args.model_dir, "model.onnx")
        if args.model_onnx or os.path.isfile(onnx_path):
            models["onnx"] = OnnxModel(onnx_path)
            max_diff["onnx_with_tabular"] = max(
                (models["onnx"](image, tabular) - eager(image, tabular)).abs().max().item() for image, tabular in data
            )
        times = {name: [] for name in models}
        for model in models.values():  # warm-up (TorchScript optimises on its first calls)
            model(*data[0])
        for _ in range(args.repeats):  # interleaved so that load changes hit every model alike
            for name, model in models.items():
                for image, tabular in data:
                    start = time.perf_counter()
                    model(image, tabular)
                    times[name].append((time.perf_counter() - start, len(image)))
    speed = {}
    for name, runs in times.items():
        full = [t for t, n in runs if n == args.batch_size] or [t for t, _ in runs]
        speed[name] = {
            "latency_ms_per_batch": 1000 * statistics.median(full),
            "images_per_s": sum(n for _, n in runs) / sum(t for t, _ in runs),
        }
    metadata = json.loads(extra["metadata.json"]) if extra["metadata.json"] else {}
    result = {
        "model_ts": ts_path,
        "images": sum(len(i) for i, _ in data),
        "batch_size": args.batch_size,
        "image_size": image_size,
        "max_abs_logit_difference": max_diff,
        "tolerance": args.tolerance,
        "embedded": {name: bool(text) for name, text in extra.items()},
        "onnx_embedded": sorted(models["onnx"].embedded) if "onnx" in models else None,
        "metadata_version": metadata.get("version"),
        "speed": speed,
        "torchscript_speedup": (speed["eager"]["latency_ms_per_batch"] / speed["torchscript"]["latency_ms_per_batch"]),
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {os.path.abspath(args.output)}")
    onnx_ok = "onnx" not in models or set(ONNX_EMBEDDED) <= set(models["onnx"].embedded)
    ok = max(max_diff.values()) < args.tolerance and all(result["embedded"].values()) and onnx_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
