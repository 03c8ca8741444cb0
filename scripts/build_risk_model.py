"""Build and evaluate the two-stage risk model (medfusionnet.risk) on a CSV of features and binary outcomes.

    python scripts/build_risk_model.py --csv risk_factors_cervical_cancer.csv --output_dir out [--with_screening]
    python scripts/build_risk_model.py --csv labels.csv --nih --output_dir out

Writes to ``--output_dir``: ``model.json`` (rules, loadable without pickle), ``patients.csv`` (risk level and
probability per outcome per row), ``report.md`` (thresholds, cross-validated metrics against reference models,
positive rate per risk level), ``tree_<outcome>.png``, ``roc_curves.png`` and, with ``--export_tabular``,
``tabular_features.csv``. ``--with_screening`` evaluates both settings, (a) risk factors only and (b) with the other
outcomes as features, and saves the model of setting (b). ``--config`` is a YAML file with optional ``bins:``
(see medfusionnet/risk_bins.yaml) and ``params:`` (TwoStageRiskModel arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import pandas as pd
import yaml
from sklearn.metrics import roc_curve
from sklearn.tree import plot_tree

from medfusionnet import risk  # noqa: E402
from medfusionnet.constants import LABELS  # noqa: E402
from medfusionnet.data import read_nih_csv  # noqa: E402

SETTINGS = {False: "(a) risk factors only", True: "(b) with screening results"}


def load_data(csv, nih=False, outcomes=None, features=None):
    """``(X, Y, ids)`` from a cervical-style CSV or, with ``nih``, an NIH Data_Entry CSV."""
    if nih:
        frame = read_nih_csv(csv)
        X, Y = risk.nih_tables(frame)
        X = X[features] if features else X
        Y = Y[outcomes] if outcomes else Y
        return X, Y, frame["name"].rename("name")
    if not outcomes:
        header = pd.read_csv(csv, nrows=0).columns.str.strip()
        outcomes = [c for c in risk.CERVICAL_OUTCOMES if c in header]
        if not outcomes:
            raise ValueError(f"{csv}: none of the default outcomes {list(risk.CERVICAL_OUTCOMES)}; pass --outcomes")
    X, Y = risk.read_risk_csv(csv, outcomes, features)
    return X, Y, pd.Series(range(2, len(X) + 2), name="csv_line")


def fmt(summary: pd.DataFrame, outcome: str, model: str, metric: str) -> str:
    """``mean ± std`` of one metric from `risk.summarize_scores`."""
    row = summary[(summary.outcome == outcome) & (summary.model == model)].iloc[0]
    return f"{row[metric + '_mean']:.3f} ± {row[metric + '_std']:.3f}"


def write_report(path, args, models, results, level_tables, bins, n_rows):
    """report.md: data, selected thresholds and tree rules, CV metrics per setting, positive rate per level."""
    lines = [f"# Two-stage risk model: {os.path.basename(args.csv)}", "",
             f"{n_rows} rows; {args.repeats} x repeated stratified 5-fold CV (seed {args.seed}); every step refitted "
             "inside each fold. Thresholded metrics call a row positive when its probability >= the training "
             "prevalence.", ""]
    for outcome, model in models.items():
        lines += [f"## {outcome}", "", f"Prevalence {model.prevalence_:.3f}; cut points low < "
                  f"{model.cut_points_['low']:.3f} <= medium < {model.cut_points_['high']:.3f} <= high.", "",
                  "Dropped columns: " + (", ".join(f"{c} ({r})" for c, r in model.preprocessor_.dropped_.items())
                                         or "none"), "", "| rank | stage-1 rule | score |", "|---|---|---|"]
        for rank, r in enumerate(model.stage1_[: model.top_n], 1):
            rule = risk.describe_rule(r["feature"], r["direction"], r["threshold"], bins)
            lines.append(f"| {rank} | {rule} | {r['score']:.3f} ({model.stage1_score}) |")
        lines += ["", "Stage-2 leaves (training data):", "", "| rule | n | positive rate | level |",
                  "|---|---|---|---|"]
        for leaf, conditions in risk.iter_leaves(model.nodes_):
            rule = " and ".join(risk.describe_rule(f, op, t, bins) for f, op, t in conditions) or "all patients"
            lines.append(f"| {rule} | {leaf['n']} | {leaf['rate']:.3f} | {leaf['level']} |")
        table = level_tables[outcome]
        lines += ["", "Positive rate per risk level (training data):", "", "| level | n | positives | rate |",
                  "|---|---|---|---|"]
        lines += [f"| {r.level} | {r.n} | {r.positives} | {'' if pd.isna(r.rate) else f'{r.rate:.3f}'} |"
                  for r in table.itertuples()]
        lines.append("")
    for with_screening, result in results.items():
        summary = risk.summarize_scores(result["scores"])
        lines += [f"## Cross-validation {SETTINGS[with_screening]}", "",
                  "| outcome | model | " + " | ".join(risk.CV_METRICS) + " |",
                  "|---|---|" + "---|" * len(risk.CV_METRICS)]
        for outcome, model in summary[["outcome", "model"]].itertuples(index=False):
            cells = " | ".join(fmt(summary, outcome, model, m) for m in risk.CV_METRICS)
            lines.append(f"| {outcome} | {model} | {cells} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_trees(models, output_dir):
    """One PNG per outcome with scikit-learn's `plot_tree` (a note when stage 1 selected nothing)."""
    for outcome, model in models.items():
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(14, 7))
        if model.tree_ is None:
            ax.text(0.5, 0.5, f"{outcome}: no feature splits the outcome", ha="center")
            ax.axis("off")
        else:
            plot_tree(model.tree_, feature_names=model.selected_features_, class_names=["neg", "pos"], filled=True,
                      impurity=False, proportion=True, ax=ax, fontsize=7)
        ax.set_title(f"{outcome}: stage-2 tree (class-balanced)")
        fig.savefig(os.path.join(output_dir, f"tree_{outcome.replace('/', '_')}.png"), dpi=100)
        plt.close(fig)


def plot_roc(results, output_dir):
    """Out-of-fold ROC curves of the first CV repeat: one row per setting, one panel per outcome."""
    outcomes = list(next(iter(results.values()))["roc"])
    plt = _pyplot()
    fig, axes = plt.subplots(len(results), len(outcomes), figsize=(3.2 * len(outcomes), 3.2 * len(results)),
                             squeeze=False)
    for row, (with_screening, result) in enumerate(results.items()):
        for col, outcome in enumerate(outcomes):
            ax = axes[row, col]
            for name, (y, prob) in result["roc"][outcome].items():
                fpr, tpr, _ = roc_curve(y, prob)
                ax.plot(fpr, tpr, label=name, lw=1)
            ax.plot([0, 1], [0, 1], "k:", lw=0.5)
            ax.set_title(f"{outcome} {SETTINGS[with_screening][:3]}", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "roc_curves.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True)
    parser.add_argument("--outcomes", nargs="+", help="default: the cervical outcomes, or the 14 findings with --nih")
    parser.add_argument("--features", nargs="+", help="default: every other column")
    parser.add_argument("--config", help="YAML with optional 'bins:' and 'params:'")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nih", action="store_true", help="read --csv as an NIH Data_Entry CSV")
    parser.add_argument("--with_screening", action="store_true", help="also evaluate and save setting (b)")
    parser.add_argument("--export_tabular", action="store_true", help="write tabular_features.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = {}
    if args.config:
        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
    bins = {**risk.load_bins(), **risk.validate_bins(config.get("bins") or {}, args.config or "config")}
    params = {"random_state": args.seed, **(config.get("params") or {})}
    X, Y, ids = load_data(args.csv, args.nih, args.outcomes or (list(LABELS) if args.nih else None), args.features)
    os.makedirs(args.output_dir, exist_ok=True)

    candidates = {risk.MODEL_NAME: risk.TwoStageRiskModel(**params), **risk.comparison_models(
        args.seed, params.get("max_depth", 3), params.get("min_samples_leaf", 20))}
    results = {}
    # The folds refit the preprocessing hundreds of times; its "dropping column" lines are kept for the final fit.
    risk.logger.setLevel(logging.WARNING)
    for with_screening in sorted({False, args.with_screening}):
        results[with_screening] = risk.cross_validate(X, Y, candidates, with_screening=with_screening,
                                                      repeats=args.repeats, seed=args.seed)
    risk.logger.setLevel(logging.NOTSET)

    models, level_tables, patients = {}, {}, pd.DataFrame({ids.name: ids.to_numpy()})
    for outcome in Y.columns:
        features = risk.outcome_features(X, Y, outcome, args.with_screening)
        models[outcome] = risk.TwoStageRiskModel(**params).fit(features, Y[outcome])
        level_tables[outcome] = risk.level_rates(models[outcome], features, Y[outcome])
        patients[f"{outcome}_level"] = models[outcome].predict_risk(features)
        patients[f"{outcome}_probability"] = models[outcome].predict_proba(features)[:, 1]
    risk.save_models(os.path.join(args.output_dir, "model.json"), models, args.with_screening, bins)
    patients.to_csv(os.path.join(args.output_dir, "patients.csv"), index=False)
    write_report(os.path.join(args.output_dir, "report.md"), args, models, results, level_tables, bins, len(X))
    plot_trees(models, args.output_dir)
    plot_roc(results, args.output_dir)
    if args.export_tabular:
        everything = pd.concat([X, Y.astype(float)], axis=1)
        selected = list(dict.fromkeys(f for m in models.values() for f in m.selected_features_))
        tabular = everything[selected].copy()
        tabular.insert(0, ids.name, ids.to_numpy())
        tabular.to_csv(os.path.join(args.output_dir, "tabular_features.csv"), index=False)
    for with_screening, result in results.items():
        summary = risk.summarize_scores(result["scores"])
        print(f"AUC {SETTINGS[with_screening]}")
        for outcome, model in summary[["outcome", "model"]].itertuples(index=False):
            print(f"  {outcome:<20} {model:<20} {fmt(summary, outcome, model, 'auc')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
