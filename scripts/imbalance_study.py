"""Measure the imbalance toolkit: plain BCE with natural sampling against the full toolkit, over several seeds.

    python scripts/imbalance_study.py --dataset_dir ../shared/data/nih --labels_csv ../shared/data/nih/labels.csv \
        --images_dir ../shared/data/nih/images_256 --output_dir runs/imbalance [--seeds 0 1 2] [--max_epochs 6]

Each run trains with ``configs/train.yaml`` and is evaluated on the test split with ``configs/evaluate.yaml`` (at
the thresholds chosen on validation). Finished runs are not redone. Prints a Markdown table of mean AUC, macro F1,
macro G-mean and the recall of the five rarest training findings (mean and standard deviation over seeds) and
writes it with the per-run figures to ``<output_dir>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from medfusionnet.files import outputs_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = {
    "baseline": [
        "--loss_name",
        "bce",
        "--class_weight_power",
        "0",
        "--sampling",
        "natural",
        "--class_reweighting",
        "False",
    ],
    "toolkit": [
        "--loss_name",
        "focal",
        "--class_weight_power",
        "0.5",
        "--sampling",
        "balanced",
        "--class_reweighting",
        "True",
    ],
}


def run_bundle(args: list[str], log_path: str) -> None:
    """``python -m monai.bundle <args>`` from the repository root, output to ``log_path``; raises on failure."""
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise RuntimeError(f"monai.bundle {' '.join(args[:2])} failed; see {log_path}")


def train_and_evaluate(name: str, seed: int, common: list[str], out: str) -> dict:
    """One run (skipped when its evaluation exists); returns the test metrics report."""
    report_path = os.path.join(out, "eval", "metrics.json")
    if not os.path.isfile(report_path):
        os.makedirs(out, exist_ok=True)
        run_bundle(
            [
                "run",
                "training",
                "--config_file",
                "configs/train.yaml",
                *common,
                *SETTINGS[name],
                "--seed",
                str(seed),
                "--output_dir",
                out,
            ],
            os.path.join(out, "train.log"),
        )
        run_bundle(
            [
                "run",
                "--config_file",
                "['configs/train.yaml','configs/evaluate.yaml']",
                *common,
                "--seed",
                str(seed),
                "--output_dir",
                out,
            ],
            os.path.join(out, "evaluate.log"),
        )
    with open(report_path) as f:
        return json.load(f)


def summarize(reports: dict[str, list[dict]], rare: list[str]) -> dict:
    """Mean and standard deviation over seeds of each figure, per setting."""
    summary = {}
    for name, runs in reports.items():
        figures = {
            "mean AUC": [r["mean"]["auc"] for r in runs],
            "macro F1": [r["mean"]["f1"] for r in runs],
            "macro G-mean": [r["mean"]["gmean"] for r in runs],
            "rare recall": [
                np.nanmean(
                    [
                        np.nan if r["per_class"][c]["sensitivity"] is None else r["per_class"][c]["sensitivity"]
                        for c in rare
                    ]
                )
                for r in runs
            ],
        }
        for c in rare:
            figures[f"recall {c}"] = [r["per_class"][c]["sensitivity"] for r in runs]
        summary[name] = {
            k: {
                "mean": float(np.nanmean(np.array(v, dtype=float))),
                "std": float(np.nanstd(np.array(v, dtype=float))),
                "runs": v,
            }
            for k, v in figures.items()
        }
    return summary


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--labels_csv")
    parser.add_argument("--images_dir")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_epochs", type=int, default=6)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--network_size", default="base")
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args(argv)
    common = [
        "--dataset_dir",
        os.path.abspath(args.dataset_dir),
        "--image_size",
        str(args.image_size),
        "--max_epochs",
        str(args.max_epochs),
        "--network_size",
        args.network_size,
        "--num_workers",
        str(args.num_workers),
    ]
    for flag in ("labels_csv", "images_dir"):
        if getattr(args, flag):
            common += [f"--{flag}", os.path.abspath(getattr(args, flag))]
    output_dir = os.path.abspath(args.output_dir)
    reports = {name: [] for name in SETTINGS}
    for seed in args.seeds:
        for name in SETTINGS:
            reports[name].append(train_and_evaluate(name, seed, common, os.path.join(output_dir, f"{name}_{seed}")))
    with open(os.path.join(output_dir, f"baseline_{args.seeds[0]}", "label_counts.json")) as f:
        positives = json.load(f)["positives"]
    rare = sorted(positives, key=positives.get)[:5]
    summary = summarize(reports, rare)
    keys = ["mean AUC", "macro F1", "macro G-mean", "rare recall"] + [f"recall {c}" for c in rare]
    print(f"| setting | {' | '.join(keys)} |")
    print("|---" * (len(keys) + 1) + "|")
    for name, figures in summary.items():
        cells = [f"{figures[k]['mean']:.3f} ± {figures[k]['std']:.3f}" for k in keys]
        print(f"| {name} | {' | '.join(cells)} |")
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(
            {"seeds": args.seeds, "rare_findings": rare, "settings": SETTINGS, "common": common, "summary": summary},
            f,
            indent=2,
        )
    print(outputs_line(output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
