"""Build and evaluate the two-stage risk model (medfusionnet.risk.two_stage) on a CSV of features and binary outcomes.

    python scripts/build_risk_model.py --csv risk_factors_cervical_cancer.csv --output_dir out [--with_screening]
    python scripts/build_risk_model.py --csv labels.csv --nih [--images_in train_val_list.txt] --output_dir out

Cross-validates the ``--models`` (default: all of them) in the same folds: both stage-2 kinds (``two_stage_tree``, the
paper's readable tree, and ``two_stage_forest``), the reference models ``tree``, ``logistic``, ``forest`` and
``boosting`` (decision tree, logistic regression, random forest, gradient boosting) and ``medfusionnet``, the
tabular-only MedFusionNet (medfusionnet.risk.network); then fits the ``--stage2`` kind (default: forest) on all rows.
Writes to ``--output_dir``:
``model.json`` (loadable without pickle), ``patients.csv`` (risk level and probability per outcome per row),
``report.md`` (selected thresholds, the readable tree's rules, cross-validated metrics, the models' rank comparison,
positive rate per risk level out of fold and on the training data), ``cv_results.csv`` (every fold's figures),
``rank_stats.json`` (per setting: Friedman test, Nemenyi critical difference and Wilcoxon-Holm pairs over the blocks
outcome x repeat x fold of the cross-validated AUC), ``ranks_<setting>.png`` (mean ranks), ``tree_<outcome>.png``
(the readable stage-2 tree), ``roc_curves.png`` and, with ``--export_tabular``, ``tabular_features.csv``.
``--with_screening`` evaluates both settings, (a) risk factors only and (b) with the other outcomes as features, and
saves the model of setting (b). ``--config`` is a YAML file with optional ``bins:`` (see
medfusionnet/risk/risk_bins.yaml), ``params:`` (TwoStageRiskModel arguments for the ``--stage2`` kind) and
``medfusionnet:`` (TabularMedFusionNetClassifier arguments). ``--factor_levels`` adds the paper's rule-based levels
(medfusionnet.risk.factor_levels: low with no risk factor, medium with one, high with several or a severe finding;
conditions from the config's ``factor_levels:`` key or the package default) to ``patients.csv`` and their positive
rates to ``report.md``.
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

from medfusionnet.constants import LABELS  # noqa: E402
from medfusionnet.data.nih import read_nih_csv, read_split_list  # noqa: E402
from medfusionnet.data.tabular import NIH_FIELDS  # noqa: E402
from medfusionnet.evaluation.comparison import plot_mean_ranks, rank_lines, rank_statistics  # noqa: E402
from medfusionnet.files import outputs_line  # noqa: E402
from medfusionnet.files import write_json_atomic  # noqa: E402
from medfusionnet.risk import two_stage  # noqa: E402
from medfusionnet.risk.factor_levels import FactorRiskRule  # noqa: E402
from medfusionnet.risk.network import TabularMedFusionNetClassifier  # noqa: E402

SETTINGS = {False: "(a) risk factors only", True: "(b) with screening results"}
MODELS = ("tree", "logistic", "forest", "boosting", "two_stage_tree", "two_stage_forest", "medfusionnet")
SETTING_KEYS = {False: "a", True: "b"}  # short names in cv_results.csv, rank_stats.json and file names
RANK_BLOCKS = "outcome x repeat x fold, cross-validated AUC"


def load_data(csv, nih=False, outcomes=None, features=None, images_in=None):
    """``(x, Y, ids, groups)`` from a cervical-style CSV or, with ``nih``, an NIH Data_Entry CSV (``groups``: the
    patient ids that keep a patient's images in one CV fold; None for one row per patient). ``images_in``: an NIH
    split list (``train_val_list.txt``) whose images alone are used."""
    if images_in and not nih:
        raise ValueError("--images_in selects NIH images by name: use it with --nih")
    if nih:
        frame = read_nih_csv(csv)
        if images_in:
            listed = read_split_list(images_in)
            frame = frame[frame["name"].isin(listed)].reset_index(drop=True)
            if frame.empty:
                raise ValueError(f"{images_in}: none of its image names is a row of {csv}")
            print(f"{len(frame)} rows of {csv} are listed in {images_in}")
        x, y_table = two_stage.nih_tables(frame)
        x = x[features] if features else x
        y_table = y_table[outcomes] if outcomes else y_table
        return x, y_table, frame["name"].rename("name"), frame["patient_id"].to_numpy()
    if not outcomes:
        header = pd.read_csv(csv, nrows=0).columns.str.strip()
        outcomes = [c for c in two_stage.CERVICAL_OUTCOMES if c in header]
        if not outcomes:
            raise ValueError(
                f"{csv}: none of the default outcomes {list(two_stage.CERVICAL_OUTCOMES)}; pass --outcomes"
            )
    x, y_table = two_stage.read_risk_csv(csv, outcomes, features)
    return x, y_table, pd.Series(range(2, len(x) + 2), name="csv_line"), None


def fmt(summary: pd.DataFrame, outcome: str, model: str, metric: str) -> str:
    """``mean ± std`` of one metric from `two_stage.summarize_scores`."""
    row = summary[(summary.outcome == outcome) & (summary.model == model)].iloc[0]
    return f"{row[metric + '_mean']:.3f} ± {row[metric + '_std']:.3f}"


def level_lines(title: str, table: pd.DataFrame) -> list[str]:
    """A Markdown table of patients, positives and positive rate per risk level."""
    lines = ["", title, "", "| level | n | positives | rate |", "|---|---|---|---|"]
    return lines + [
        f"| {r.level} | {r.n} | {r.positives} | {'' if pd.isna(r.rate) else f'{r.rate:.3f}'} |"
        for r in table.itertuples()
    ]


def cv_table(results: dict) -> pd.DataFrame:
    """Every fold's figures of every setting: ``setting, outcome, model, repeat, fold`` and `two_stage.CV_METRICS`."""
    return pd.concat(
        [r["scores"].assign(setting=SETTING_KEYS[with_screening]) for with_screening, r in results.items()],
        ignore_index=True,
    )[["setting", "outcome", "model", "repeat", "fold", *two_stage.CV_METRICS]]


def compare_models(cv: pd.DataFrame) -> dict:
    """Per setting, `rank_statistics` of the models over the blocks outcome x repeat x fold (AUC)."""
    out = {}
    for setting, part in cv.groupby("setting", sort=True):
        table = part.pivot_table(index=["outcome", "repeat", "fold"], columns="model", values="auc", dropna=False)
        models = list(dict.fromkeys(part["model"]))  # the order they were run in
        out[setting] = {"blocks": RANK_BLOCKS, **rank_statistics(table[models].to_numpy(dtype=float), models)}
    return out


def write_report(
    path, args, models, trees, results, level_tables, bins, n_rows, grouped=False, ranking=None, factors=None
):
    """report.md: data, thresholds and the readable tree's rules, CV metrics per setting, positive rate per level."""
    saved = f"two_stage_{args.stage2}"
    lines = [
        f"# Two-stage risk model: {os.path.basename(args.csv)}",
        "",
        f"{n_rows} rows; {args.repeats} x repeated stratified 5-fold CV (seed {args.seed}"
        + ("; grouped by patient" if grouped else "")
        + "); every step refitted "
        "inside each fold. Thresholded metrics call a row positive when its probability >= the training "
        f"prevalence. The saved model is `{saved}` ({SETTINGS[args.with_screening]}).",
        "",
    ]
    for outcome, model in models.items():
        lines += [
            f"## {outcome}",
            "",
            f"Prevalence {model.prevalence_:.3f}; cut points low < "
            f"{model.cut_points_['low']:.3f} <= medium < {model.cut_points_['high']:.3f} <= high.",
            "",
            "Dropped columns: " + (", ".join(f"{c} ({r})" for c, r in model.preprocessor_.dropped_.items()) or "none"),
            "",
            f"Stage 1 kept {len(model.selected_features_)} feature(s) (top_n {model.top_n_}"
            + (f", chosen by inner CV AUC {model.top_n_scores_}" if model.top_n_scores_ else "")
            + ").",
            "",
            "| rank | stage-1 rule | score |",
            "|---|---|---|",
        ]
        for rank, r in enumerate(model.stage1_[: len(model.selected_features_)], 1):
            rule = two_stage.describe_rule(r["feature"], r["direction"], r["threshold"], bins)
            lines.append(f"| {rank} | {rule} | {r['score']:.3f} ({model.stage1_score}) |")
        tree = trees[outcome]
        lines += [
            "",
            "Readable stage-2 tree (`two_stage_tree` on all rows; training data):",
            "",
            "| rule | n | positive rate | level |",
            "|---|---|---|---|",
        ]
        for leaf, conditions in two_stage.iter_leaves(tree.nodes_):
            rule = " and ".join(two_stage.describe_rule(f, op, t, bins) for f, op, t in conditions) or "all patients"
            lines.append(f"| {rule} | {leaf['n']} | {leaf['rate']:.3f} | {leaf['level']} |")
        for with_screening, result in results.items():
            if saved not in result["levels"][outcome]:  # the saved kind was not among --models
                continue
            lines += level_lines(
                f"Positive rate per risk level of `{saved}`, out of fold (first CV repeat), "
                f"{SETTINGS[with_screening]}:",
                result["levels"][outcome][saved],
            )
        lines += level_lines(f"Positive rate per risk level of `{saved}` on its training data:", level_tables[outcome])
        if factors is not None:
            lines += level_lines("Positive rate per rule-based risk level (`--factor_levels`):", factors[outcome])
        lines.append("")
    for with_screening, result in results.items():
        summary = two_stage.summarize_scores(result["scores"])
        lines += [
            f"## Cross-validation {SETTINGS[with_screening]}",
            "",
            "| outcome | model | " + " | ".join(two_stage.CV_METRICS) + " |",
            "|---|---|" + "---|" * len(two_stage.CV_METRICS),
        ]
        for outcome, model in summary[["outcome", "model"]].itertuples(index=False):
            cells = " | ".join(fmt(summary, outcome, model, m) for m in two_stage.CV_METRICS)
            lines.append(f"| {outcome} | {model} | {cells} |")
        lines.append("")
        stats = (ranking or {}).get(SETTING_KEYS[with_screening], {})
        if "friedman" in stats:
            mean_ranks = stats["friedman"]["mean_ranks"]
            lines += [
                "Mean rank (1 = best): "
                + ", ".join(f"{m} {r:.2f}" for m, r in sorted(mean_ranks.items(), key=lambda i: i[1])),
                "",
            ]
        if stats:
            lines += [*rank_lines(stats, stats["blocks"]), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_trees(models, output_dir):
    """One PNG per outcome with scikit-learn's `plot_tree` of the readable stage-2 tree (a note when stage 1
    selected nothing)."""
    for outcome, model in models.items():
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(14, 7))
        if model.tree_ is None:
            ax.text(0.5, 0.5, f"{outcome}: no feature splits the outcome", ha="center")
            ax.axis("off")
        else:
            plot_tree(
                model.tree_,
                feature_names=model.selected_features_,
                class_names=["neg", "pos"],
                filled=True,
                impurity=False,
                proportion=True,
                ax=ax,
                fontsize=7,
            )
        ax.set_title(f"{outcome}: stage-2 tree (class-balanced)")
        fig.savefig(os.path.join(output_dir, f"tree_{outcome.replace('/', '_')}.png"), dpi=100)
        plt.close(fig)


def plot_roc(results, output_dir):
    """Out-of-fold ROC curves of the first CV repeat: one row per setting, one panel per outcome."""
    outcomes = list(next(iter(results.values()))["roc"])
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(results), len(outcomes), figsize=(3.2 * len(outcomes), 3.2 * len(results)), squeeze=False
    )
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
    parser.add_argument("--config", help="YAML with optional 'bins:', 'params:', 'medfusionnet:' and 'factor_levels:'")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nih", action="store_true", help="read --csv as an NIH Data_Entry CSV")
    parser.add_argument(
        "--images_in", help="with --nih: use only the images of this split list (train_val_list.txt for --risk_model)"
    )
    parser.add_argument("--with_screening", action="store_true", help="also evaluate and save setting (b)")
    parser.add_argument("--export_tabular", action="store_true", help="write tabular_features.csv")
    parser.add_argument("--stage2", choices=two_stage.STAGE2_KINDS, default="forest", help="kind of the saved model")
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to cross-validate (default: all)"
    )
    parser.add_argument(
        "--factor_levels", action="store_true", help="also the paper's rule-based levels (risk-factor counts)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    config = {}
    if args.config:
        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
    bins = {**two_stage.load_bins(), **two_stage.validate_bins(config.get("bins") or {}, args.config or "config")}
    kinds = {"tree": {"random_state": args.seed}, "forest": {**two_stage.FOREST_PARAMS, "random_state": args.seed}}
    kinds[args.stage2].update(config.get("params") or {})
    outcomes = args.outcomes or (list(LABELS) if args.nih else None)
    x, y_table, ids, groups = load_data(args.csv, args.nih, outcomes, args.features, args.images_in)
    rule = levels = None
    if args.factor_levels:  # checked before the cross-validation, so a bad rule or a missing column fails at once
        rule = (
            FactorRiskRule.from_mapping(config["factor_levels"], f"{args.config}: factor_levels")
            if "factor_levels" in config
            else FactorRiskRule.load()
        )
        levels = rule.evaluate(x, args.csv)
    os.makedirs(args.output_dir, exist_ok=True)

    candidates = {f"two_stage_{kind}": two_stage.TwoStageRiskModel(**params) for kind, params in kinds.items()}
    candidates.update(two_stage.comparison_models(args.seed))
    candidates["medfusionnet"] = TabularMedFusionNetClassifier(
        **{"random_state": args.seed, **(config.get("medfusionnet") or {})}
    )
    candidates = {name: candidates[name] for name in dict.fromkeys(args.models)}
    results = {}
    for with_screening in sorted({False, args.with_screening}):
        results[with_screening] = two_stage.cross_validate(
            x, y_table, candidates, with_screening=with_screening, repeats=args.repeats, seed=args.seed, groups=groups
        )

    models, trees, level_tables, patients = {}, {}, {}, pd.DataFrame({ids.name: ids.to_numpy()})
    for outcome in y_table.columns:
        features = two_stage.outcome_features(x, y_table, outcome, args.with_screening)
        models[outcome] = two_stage.TwoStageRiskModel(**kinds[args.stage2]).fit(features, y_table[outcome])
        trees[outcome] = (
            models[outcome]
            if args.stage2 == "tree"
            else two_stage.TwoStageRiskModel(**kinds["tree"]).fit(features, y_table[outcome])
        )
        level_tables[outcome] = two_stage.level_rates(models[outcome], features, y_table[outcome])
        patients[f"{outcome}_level"] = models[outcome].predict_risk(features)
        patients[f"{outcome}_probability"] = models[outcome].predict_proba(features)[:, 1]
    factor_rates = None
    if rule is not None:
        patients["factor_level"] = levels["level"].to_numpy()
        patients["factor_rules"] = levels["fired"].to_numpy()
        patients["factor_unknown"] = levels["unknown"].to_numpy()
        factor_rates = {o: two_stage.rates_by_level(levels["level"], y_table[o]) for o in y_table.columns}
        print(f"rule-based risk levels: {rule.describe()}")
    fields = NIH_FIELDS if args.nih else None  # None: each CSV column is a numeric field of its own name
    two_stage.save_models(os.path.join(args.output_dir, "model.json"), models, args.with_screening, bins, fields)
    patients.to_csv(os.path.join(args.output_dir, "patients.csv"), index=False)
    cv = cv_table(results)
    cv.to_csv(os.path.join(args.output_dir, "cv_results.csv"), index=False)
    ranking = compare_models(cv)
    write_json_atomic(os.path.join(args.output_dir, "rank_stats.json"), ranking)
    for with_screening in results:
        setting = SETTING_KEYS[with_screening]
        if "friedman" in ranking[setting]:
            path = os.path.join(args.output_dir, f"ranks_{setting}.png")
            plot_mean_ranks(ranking[setting], path, SETTINGS[with_screening])
    write_report(
        os.path.join(args.output_dir, "report.md"),
        args,
        models,
        trees,
        results,
        level_tables,
        bins,
        len(x),
        grouped=groups is not None,
        ranking=ranking,
        factors=factor_rates,
    )
    plot_trees(trees, args.output_dir)
    plot_roc(results, args.output_dir)
    if args.export_tabular:
        # The stage-1 selection of the readable model (top_n by inner CV), raw values with gaps left empty.
        everything = pd.concat([x, y_table.astype(float)], axis=1)
        for tree in trees.values():
            for name, columns in tree.preprocessor_.indicators_.items():
                everything[name] = everything[columns[0]].isna().astype(float)
        selected = list(dict.fromkeys(f for m in trees.values() for f in m.selected_features_))
        tabular = everything[selected].copy()
        tabular.insert(0, ids.name, ids.to_numpy())
        tabular.to_csv(os.path.join(args.output_dir, "tabular_features.csv"), index=False)
    dropped = {c: r for m in models.values() for c, r in m.preprocessor_.dropped_.items()}
    if dropped:
        print(f"dropped {len(dropped)} column(s): " + ", ".join(f"{c} ({r})" for c, r in sorted(dropped.items())))
    for with_screening, result in results.items():
        summary = two_stage.summarize_scores(result["scores"])
        print(f"AUC {SETTINGS[with_screening]}")
        for outcome, model in summary[["outcome", "model"]].itertuples(index=False):
            print(f"  {outcome:<20} {model:<20} {fmt(summary, outcome, model, 'auc')}")
    print(outputs_line(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
