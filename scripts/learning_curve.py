"""Test mean AUC against the training budget, from several `scripts/compare.py` outputs that differ only in
``--max_epochs``.

    python scripts/learning_curve.py --runs 5=runs/curve_e05 10=runs/curve_e10 20=runs/curve_e20 \\
        30=runs/curve_e30 --output docs/learning_curve

Writes ``<output>.csv`` (one row per budget, model and seed: the test mean AUC with the best-validation epoch's
weights and with the last epoch's) and ``<output>.png`` (mean over seeds, one line per model and rule).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def read_curve(runs: dict[int, Path]) -> pd.DataFrame:
    """Rows ``epochs, model, seed, auc, auc_last`` from each budget's ``results.csv``.

    Raises:
        FileNotFoundError: naming the budget whose comparison has no ``results.csv``.
    """
    frames = []
    for epochs, folder in sorted(runs.items()):
        path = Path(folder) / "results.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{epochs} epochs: {path} does not exist; run scripts/compare.py there first")
        frame = pd.read_csv(path)
        columns = ["model", "seed", "auc"] + (["auc_last"] if "auc_last" in frame else [])
        frames.append(frame[columns].assign(epochs=epochs))
    return pd.concat(frames, ignore_index=True)[["epochs", "model", "seed", "auc", "auc_last"]]


def plot_curve(curve: pd.DataFrame, path: Path) -> None:
    """Mean test AUC over seeds against epochs: solid for the best-validation epoch, dashed for the last."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    means = curve.groupby(["model", "epochs"])[["auc", "auc_last"]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (model, rows) in enumerate(means.groupby("model", sort=False)):
        color = f"C{i}"
        ax.plot(rows["epochs"], rows["auc"], "o-", color=color, label=f"{model} (best-validation epoch)")
        ax.plot(rows["epochs"], rows["auc_last"], "s--", color=color, label=f"{model} (last epoch)")
    seeds = ", ".join(str(int(s)) for s in sorted(curve["seed"].unique()))
    ax.set(xlabel="training epochs", ylabel="test mean AUC", title=f"Learning curve (seed {seeds})")
    ax.set_xticks(sorted(curve["epochs"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_runs(items: list[str]) -> dict[int, Path]:
    """``EPOCHS=FOLDER`` items as a mapping; an item of another form is an error that quotes it."""
    runs = {}
    for item in items:
        epochs, sep, folder = item.partition("=")
        if not sep or not epochs.strip().isdigit() or not folder:
            raise ValueError(f"--runs item '{item}' is not EPOCHS=FOLDER (e.g. 5=runs/curve_e05)")
        runs[int(epochs)] = Path(folder)
    return runs


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="EPOCHS=FOLDER of each scripts/compare.py output")
    parser.add_argument("--output", required=True, help="path without extension for the .csv and .png")
    args = parser.parse_args(argv)
    curve = read_curve(parse_runs(args.runs))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    curve.to_csv(output.with_suffix(".csv"), index=False, float_format="%.4f")
    plot_curve(curve, output.with_suffix(".png"))
    table = curve.groupby(["epochs", "model"])[["auc", "auc_last"]].agg(["mean", "std", "count"])
    print(table.round(4).to_string())
    print(f"wrote {output.with_suffix('.csv')} and {output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
