"""Train and evaluate several networks and ablations on the same data, split, budget and seeds; rank them.

    python scripts/compare.py --models medfusionnet densenet121 cnn_only no_interaction --seeds 0 1 2 \\
        --output_dir runs/compare [--max_epochs 30] [any other train.yaml override, e.g. --dataset_dir /data/nih]

Each (model, seed) run is ``python -m monai.bundle run training`` then the evaluate workflow on the test split,
in ``<output_dir>/runs/<model>/seed<k>``, with the model's overrides (`MODELS`) added to the shared ones. An
ensemble (`ENSEMBLES`) is not trained itself: its members' runs are, then combined into its ``model.pt``, with
decision thresholds chosen on the validation split, and evaluated like the others. A run
whose ``run_info.json`` exists is not redone, so an interrupted comparison resumes. Outputs in ``<output_dir>``:
``results.csv`` (one row per run), ``per_class_auc.csv``, ``summary.md`` (mean and standard deviation over seeds
of mean AUC, macro F1, macro G-mean, accuracy, training time, parameters; the Friedman test over blocks = seeds x
findings of per-finding test AUC; Nemenyi critical difference; Wilcoxon-Holm pairs), ``stats.json``,
``ranks.png`` and ``per_class_auc.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medfusionnet
from medfusionnet.evaluation.comparison import plot_mean_ranks, rank_lines, rank_statistics
from medfusionnet.files import outputs_line

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("compare")

# The bundle's overrides that make each model; ablations switch off one part of MedFusionNet (docs/architecture.md)
MODELS: dict[str, list[str]] = {
    "medfusionnet": [],
    "densenet121": ["--network_name", "densenet121"],
    # through timm (pip install "medfusionnet[baselines]")
    "resnet50": ["--network_name", "resnet50"],
    "convnext_tiny": ["--network_name", "convnext_tiny"],
    "deit_small": ["--network_name", "deit_small"],
    "inception_resnet_v2": ["--network_name", "inception_resnet_v2"],
    "efficientnet_b0": ["--network_name", "efficientnet_b0"],
    "inception_v3": ["--network_name", "inception_v3"],
    # the related systems (medfusionnet.networks.related), each with its paper's loss
    "convfcmae": ["--network_name", "convfcmae", "--loss_name", "bce_focal"],
    "ctranscnn": ["--network_name", "ctranscnn", "--loss_name", "focal_asl"],
    "ensemble": ["--network_name", "ensemble"],  # built from its members' runs (ENSEMBLES), not trained itself
    "cnn_only": ["--branches", "['cnn']"],
    "transformer_only": ["--branches", "['transformer']"],
    "cnn_transformer": ["--branches", "['cnn','transformer']"],
    "no_interaction": ["--interaction", "False"],
    "with_fpn": ["--fpn", "True"],  # the feature pyramids of both branches feed the label queries
    "no_tabular": ["--use_tabular", "False"],
    "concat_fusion": ["--fusion", "concat"],
    "no_baseline_path": ["--baseline_path", "False"],  # the fusion's logits alone (the 0.3.0 design)
    # recipe variants (the same network, another training recipe)
    "aux_loss": ["--aux_loss_weight", "0.3"],  # deep supervision of the baseline path and the fusion
    "fast_gate": ["--gate_lr_scale", "30"],  # the zero-initialised gates at 30x the learning rate
    "aux_fast_gate": ["--aux_loss_weight", "0.3", "--gate_lr_scale", "30"],
    "warmup": ["--warmup_epochs", "2"],
    "fusion_lr_x3": ["--fusion_lr_scale", "3.0"],
    # the default recipe spelt out (class-weighted BCE, natural sampling), and the imbalance toolkit that was the
    # default up to 0.6.0 (class-weighted focal loss, balanced sampling annealed to natural)
    "medfusionnet_plain": ["--loss_name", "bce", "--sampling", "natural", "--curriculum_epochs", "0"],
    "medfusionnet_imbalance": ["--loss_name", "focal", "--sampling", "balanced"],
    "densenet121_imbalance": ["--network_name", "densenet121", "--loss_name", "focal", "--sampling", "balanced"],
    "densenet121_plain": [
        "--network_name",
        "densenet121",
        "--loss_name",
        "bce",
        "--sampling",
        "natural",
        "--curriculum_epochs",
        "0",
    ],
}
# ensembles: their members' runs (same seed) are trained first, then combined and evaluated
ENSEMBLES: dict[str, tuple[str, ...]] = {"ensemble": ("densenet121", "efficientnet_b0", "inception_v3")}
METRICS = ("auc", "f1", "gmean", "accuracy")
BLOCKS = "seeds x findings (test AUC per finding)"


def _bundle(args: list[str], log_path: Path) -> None:
    """Run ``python -m monai.bundle <args>`` from the bundle root, its output in ``log_path``; raise on failure."""
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(
            f"'monai.bundle {' '.join(args[:2])}' failed (exit {proc.returncode}); see " f"{log_path}:\n{tail}"
        )


def run_one(model: str, seed: int, run_dir: Path, shared: list[str]) -> dict:
    """Train and evaluate one model with one seed (or read the finished run); returns its ``run_info``."""
    info_path = run_dir / "run_info.json"
    overrides = [*shared, *MODELS[model], "--seed", str(seed)]
    evaluate = ["run", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']", *overrides]
    if info_path.is_file():
        logger.info("%s seed %d: finished earlier, reusing %s", model, seed, info_path)
        info = json.loads(info_path.read_text())
        if "auc_last" not in info and model not in ENSEMBLES:
            info["auc_last"] = evaluate_last_epoch(run_dir, evaluate)
            _write_info(info_path, info)
        return info
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides += ["--output_dir", str(run_dir)]
    evaluate += ["--output_dir", str(run_dir)]
    if model in ENSEMBLES:
        members = [run_one(m, seed, run_dir.parents[1] / m / f"seed{seed}", shared) for m in ENSEMBLES[model]]
        logger.info("%s seed %d: combining %s", model, seed, ", ".join(ENSEMBLES[model]))
        build_ensemble(run_dir, [run_dir.parents[1] / m / f"seed{seed}" for m in ENSEMBLES[model]])
        # decision thresholds chosen on validation, as training does for the other models
        _bundle(
            [*evaluate, "--eval_split", "val", "--eval_dir", str(run_dir / "val"), "--val_thresholds", "$None"],
            run_dir / "validate.log",
        )
        os.replace(run_dir / "val" / "thresholds.json", run_dir / "thresholds.json")
        train_s = sum(m["train_seconds"] for m in members)
    else:
        logger.info("%s seed %d: training", model, seed)
        start = time.perf_counter()
        _bundle(["run", "training", "--config_file", "configs/train.yaml", *overrides], run_dir / "train.log")
        train_s = time.perf_counter() - start
    logger.info("%s seed %d: evaluating (trained in %.0f s)", model, seed, train_s)
    _bundle(evaluate, run_dir / "evaluate.log")
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    network_args = json.loads((run_dir / "run_settings.json").read_text())["network_args"]
    net = medfusionnet.create_network(**network_args)
    info = {
        "model": model,
        "seed": seed,
        "train_seconds": train_s,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "num_test_images": report["num_images"],
        **{m: report["mean"][m] for m in METRICS},
        "per_class_auc": {k: v["auc"] for k, v in report["per_class"].items()},
    }
    if model not in ENSEMBLES:
        info["auc_last"] = evaluate_last_epoch(run_dir, evaluate[:-2])
    _write_info(info_path, info)  # written last: its presence means the run is complete
    return info


def _write_info(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def evaluate_last_epoch(run_dir: Path, evaluate: list[str]) -> float:
    """Test mean AUC of the last epoch's weights (``checkpoint_last.pt``), to set beside the best-validation
    epoch's ``model.pt``: the run's settings, encoder, thresholds and calibration are copied into
    ``<run_dir>/last`` with those weights as its ``model.pt``, and the evaluate workflow runs there."""
    last = run_dir / "last"
    metrics = last / "eval" / "metrics.json"
    if not metrics.is_file():
        last.mkdir(exist_ok=True)
        for name in ("run_settings.json", "tabular_encoder.json", "thresholds.json", "calibration.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, last / name)
        state = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)["network"]
        torch.save(state, last / "model.pt")
        _bundle([*evaluate, "--output_dir", str(last)], last / "evaluate.log")
    return json.loads(metrics.read_text())["mean"]["auc"]


def build_ensemble(run_dir: Path, member_dirs: list[Path]) -> None:
    """Write an ensemble's ``model.pt``, ``run_settings.json`` and tabular encoder into ``run_dir`` from its
    members' finished runs, so the bundle's evaluate and inference workflows load it like any trained model."""
    settings = [json.loads((d / "run_settings.json").read_text()) for d in member_dirs]
    sizes = {s["image_size"] for s in settings}
    if len(sizes) != 1:
        raise ValueError(f"the ensemble members were trained at different image sizes {sorted(sizes)}")
    encoders = {(d / "tabular_encoder.json").read_text() for d in member_dirs}
    if len(encoders) != 1:
        raise ValueError(f"the ensemble members' tabular encoders differ ({member_dirs}): not the same training split")
    first = settings[0]["network_args"]
    network_args = {
        **{
            k: first[k]
            for k in ("num_classes", "in_channels", "num_tabular_features", "use_tabular", "image_size")
            if k in first
        },
        "name": "ensemble",
        "members": [s["network_args"]["name"] for s in settings],
        "member_args": [{k: v for k, v in s["network_args"].items() if k != "name"} for s in settings],
    }
    net = medfusionnet.create_network(**network_args, member_checkpoints=[str(d / "model.pt") for d in member_dirs])
    torch.save(net.state_dict(), run_dir / "model.pt")
    (run_dir / "tabular_encoder.json").write_text(encoders.pop())
    (run_dir / "run_settings.json").write_text(json.dumps({**settings[0], "network_args": network_args}, indent=2))


def summarize(infos: list[dict], models: list[str], alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-run table, per-class AUC table and the rank statistics (blocks = seeds x findings)."""
    results = pd.DataFrame([{k: v for k, v in i.items() if k != "per_class_auc"} for i in infos])
    per_class = pd.DataFrame([{"model": i["model"], "seed": i["seed"], **i["per_class_auc"]} for i in infos])
    labels = [c for c in per_class.columns if c not in ("model", "seed")]
    long = per_class.melt(id_vars=["model", "seed"], value_vars=labels, var_name="finding", value_name="auc")
    table = long.pivot_table(index=["seed", "finding"], columns="model", values="auc", dropna=False)[models]
    stats = {"blocks": BLOCKS, **rank_statistics(table.to_numpy(dtype=float), models, alpha)}
    if len(models) >= 2:
        stats["paired_mean_auc"] = paired_by_seed(results, models)
    if "auc_last" in results:
        stats["best_vs_last"] = best_against_last(results)
    return results, per_class, stats


def _signed_rank_p(diff: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    return float(wilcoxon(diff).pvalue) if len(diff) and np.any(diff != 0) else 1.0


def paired_by_seed(results: pd.DataFrame, models: list[str]) -> list[dict]:
    """Each model's test mean AUC minus the first model's, paired by seed: mean, sd, seeds ahead, Wilcoxon p."""
    wide = results.pivot_table(index="seed", columns="model", values="auc")
    out = []
    for m in models[1:]:
        diff = (wide[m] - wide[models[0]]).dropna().to_numpy()
        out.append(
            {
                "model": m,
                "seeds": len(diff),
                "mean": float(diff.mean()) if len(diff) else float("nan"),
                "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
                "ahead": int((diff > 0).sum()),
                "p": _signed_rank_p(diff),
            }
        )
    return out


def best_against_last(results: pd.DataFrame) -> dict:
    """Test mean AUC of the best-validation epoch against the last epoch, paired by run (model and seed)."""
    runs = results.dropna(subset=["auc_last"])
    diff = (runs["auc_last"] - runs["auc"]).to_numpy()
    per_model = runs.groupby("model")[["auc", "auc_last"]].mean()
    return {
        "runs": len(runs),
        "best": float(runs["auc"].mean()),
        "last": float(runs["auc_last"].mean()),
        "mean": float(diff.mean()),
        "sd": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
        "p": _signed_rank_p(diff),
        "per_model": {m: [float(r["auc"]), float(r["auc_last"])] for m, r in per_model.iterrows()},
    }


def write_report(
    output_dir: Path, results: pd.DataFrame, per_class: pd.DataFrame, stats: dict, models: list[str]
) -> None:
    """``results.csv``, ``per_class_auc.csv``, ``stats.json``, ``summary.md`` and the two figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results.to_csv(output_dir / "results.csv", index=False)
    per_class.to_csv(output_dir / "per_class_auc.csv", index=False)
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    columns = [*METRICS, "train_seconds", "params_m"]
    grouped = results.groupby("model")[columns]
    mean, std = grouped.mean().reindex(models), grouped.std(ddof=0).reindex(models)
    seeds = results.groupby("model")["seed"].count().reindex(models)
    lines = [
        "| model | seeds | mean AUC | macro F1 | macro G-mean | accuracy | train s | params M | mean rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ranks = stats.get("friedman", {}).get("mean_ranks", {})
    for m in models:
        cells = [f"{mean.loc[m, c]:.4f} ± {std.loc[m, c]:.4f}" for c in METRICS]
        rank = f"{ranks[m]:.2f}" if m in ranks else ""
        lines.append(
            f"| {m} | {seeds[m]} | {' | '.join(cells)} | {mean.loc[m, 'train_seconds']:.0f} | "
            f"{mean.loc[m, 'params_m']:.2f} | {rank} |"
        )
    if "wilcoxon_holm" in stats:
        lines += ["", *rank_lines(stats, stats["blocks"])]
    if stats.get("paired_mean_auc"):
        lines += [
            "",
            f"Mean test AUC against {models[0]}, paired by seed:",
            "",
            "| model | seeds | difference (mean ± sd) | seeds ahead | Wilcoxon p (seeds) |",
            "|---|---|---|---|---|",
        ]
        for d in stats["paired_mean_auc"]:
            lines.append(
                f"| {d['model']} | {d['seeds']} | {d['mean']:+.4f} ± {d['sd']:.4f} | {d['ahead']} | " f"{d['p']:.3g} |"
            )
    if stats.get("best_vs_last"):
        b = stats["best_vs_last"]
        lines += [
            "",
            f"Model selection: the best-validation epoch against the last epoch, test mean AUC over "
            f"{b['runs']} runs: best {b['best']:.4f}, last {b['last']:.4f}, last - best {b['mean']:+.4f} "
            f"± {b['sd']:.4f} (Wilcoxon p = {b['p']:.3g}).",
            "",
            "| model | best epoch | last epoch |",
            "|---|---|---|",
        ]
        for m, (best, last) in b["per_model"].items():
            lines.append(f"| {m} | {best:.4f} | {last:.4f} |")
    (output_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    if ranks:
        plot_mean_ranks(stats, str(output_dir / "ranks.png"))
    labels = [c for c in per_class.columns if c not in ("model", "seed")]
    means = per_class.groupby("model")[labels].mean().reindex(models)
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.7), 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar(np.arange(len(labels)) + i * width, means.loc[m].to_numpy(dtype=float), width, label=m)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=45, ha="right")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")  # chance
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(output_dir / "per_class_auc.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        epilog="Arguments not listed here are passed to every training and evaluation.",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["medfusionnet", "densenet121", "cnn_only", "no_interaction"],
        help=f"any of {', '.join(MODELS)}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the post-hoc tests")
    args, shared = parser.parse_known_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if len(set(args.models)) != len(args.models):
        parser.error("--models lists a model twice")
    reserved = [a for a in shared if a in ("--seed", "--output_dir")]
    if reserved:
        parser.error(f"{reserved} are set per run by compare.py")
    # the runs start in the bundle root: paths given relative to the caller's folder are made absolute
    shared = [os.path.abspath(a) if not a.startswith("-") and os.path.exists(a) else a for a in shared]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    infos = [run_one(m, s, output_dir / "runs" / m / f"seed{s}", shared) for m in args.models for s in args.seeds]
    results, per_class, stats = summarize(infos, args.models, args.alpha)
    write_report(output_dir, results, per_class, stats, args.models)
    print(outputs_line(output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
