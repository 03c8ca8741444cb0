"""The report files of validation, evaluation and inference, as pure functions of probabilities and labels (the
Ignite handlers of `engine.handlers` collect the data and call them).

- `metrics_report` / `write_metrics_report`: ``metrics.json``, ``metrics.csv``, ``thresholds.json`` and
  ``calibration.json`` (when the thresholds are chosen on the data), ``predictions.csv``, ``roc.png``.
- `write_predictions_csv`: one probability column per finding.
- `write_decisions`: ``decisions.json`` and ``decisions.csv`` from `decision.decision_document`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from ..constants import LABELS
from ..files import write_json_atomic, write_text_atomic
from .calibration import TemperatureScaling, calibration_error, probabilities_to_logits
from .metrics import summarize


def metrics_report(
    y_prob: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str] = LABELS,
    thresholds: Sequence[float] | None = None,
    calibration: TemperatureScaling | None = None,
    epoch: int | None = None,
) -> tuple[dict, TemperatureScaling | None]:
    """The metric report of ``(N, C)`` probabilities against 0/1 labels (`metrics.summarize`) with its calibration
    block, and the temperature scaling fitted here.

    With ``thresholds`` None (validation) the thresholds are chosen on this data and a `TemperatureScaling` is
    fitted on it too (returned, else None); with fixed thresholds (evaluation) a given ``calibration`` is only
    measured; ``epoch`` is recorded when given. The block reports the expected calibration error before and after
    scaling, per finding and on average.
    """
    report = summarize(y_prob, y, labels, thresholds)
    if epoch is not None:
        report["epoch"] = int(epoch)
    report["thresholds_chosen_on_this_data"] = thresholds is None
    fitted = TemperatureScaling(labels).fit(probabilities_to_logits(y_prob), y) if thresholds is None else None
    scaler = fitted or calibration
    if scaler is not None:
        before = calibration_error(y_prob, y)
        after = calibration_error(scaler.transform(probabilities_to_logits(y_prob)), y)
        report["calibration"] = {
            "expected_calibration_error": float(before.mean()),
            "expected_calibration_error_calibrated": float(after.mean()),
            "fitted_on_this_data": fitted is not None,
            "per_class": {
                label: {"ece": float(b), "ece_calibrated": float(a), "temperature": t}
                for label, b, a, t in zip(labels, before, after, scaler.temperatures_)
            },
        }
    return report, fitted


def write_metrics_report(
    output_dir: str,
    report: dict,
    fitted: TemperatureScaling | None = None,
    names: Sequence[str] | None = None,
    y_prob: np.ndarray | None = None,
    y: np.ndarray | None = None,
    plot_roc: bool = False,
) -> None:
    """Write `metrics_report`'s results under ``output_dir``: ``metrics.json``, ``metrics.csv`` (one row per
    finding and the mean), ``thresholds.json`` when they were chosen on this data, ``calibration.json`` when a
    scaling was ``fitted``, ``predictions.csv`` when ``names`` (and ``y_prob``) are given, and ``roc.png`` with
    ``plot_roc`` (needs ``y_prob`` and ``y``)."""
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, "metrics.json"), report)
    columns = list(next(iter(report["per_class"].values())).keys())
    lines = [",".join(["finding", *columns])]
    for label, values in report["per_class"].items():
        lines.append(",".join([label, *("" if values[c] is None else f"{values[c]:.6f}" for c in columns)]))
    lines.append(",".join(["mean", *(f"{report['mean'].get(c, float('nan')):.6f}" for c in columns)]))
    write_text_atomic(os.path.join(output_dir, "metrics.csv"), "\n".join(lines) + "\n")
    labels = list(report["per_class"])
    if report["thresholds_chosen_on_this_data"]:
        chosen = {label: values["threshold"] for label, values in report["per_class"].items()}
        write_json_atomic(os.path.join(output_dir, "thresholds.json"), chosen)
    if fitted is not None:
        fitted.save(os.path.join(output_dir, "calibration.json"))
    if names is not None and y_prob is not None:
        write_predictions_csv(os.path.join(output_dir, "predictions.csv"), names, y_prob, labels)
    if plot_roc and y_prob is not None and y is not None:
        plot_roc_curves(os.path.join(output_dir, "roc.png"), y_prob, y, labels, report)


def write_predictions_csv(path: str, names: Sequence[str], probs: np.ndarray, labels: Sequence[str] = LABELS) -> None:
    """CSV with ``Image Index`` and one probability column per label, one row per name, in the order given."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["Image Index", *labels])
    for name, prob in zip(names, probs):
        writer.writerow([name, *(f"{p:.6f}" for p in prob)])
    write_text_atomic(path, text.getvalue())


def write_decisions(output_dir: str, document: dict, labels: Sequence[str] = LABELS) -> str:
    """Write ``decisions.json`` (the document itself) and ``decisions.csv`` (one row per image: status, tier,
    positive findings, reader's error, probabilities, decisions; with a risk model also the tabular risk level and
    the combined tier) under ``output_dir``; returns the CSV's path."""
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, "decisions.json"), document)
    path = os.path.join(output_dir, "decisions.csv")
    with_risk = "combined_rule" in document
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["Image Index", "status", "tier", *(["tabular_level", "combined_tier"] if with_risk else [])]
        writer.writerow(header + ["findings", "error", *labels, *(f"{label}_decision" for label in labels)])
        for item in document["images"]:
            if item["status"] == "ok":
                risk = [item["tabular_risk"].get("level", ""), item["combined_tier"]] if with_risk else []
                writer.writerow(
                    [
                        item["image"],
                        "ok",
                        item["tier"],
                        *risk,
                        "|".join(item["findings"]),
                        "",
                        *(f"{item['probabilities'][label]:.6f}" for label in labels),
                        *(int(item["decisions"][label]) for label in labels),
                    ]
                )
            else:
                blanks = [""] * (len(header) - 2)
                writer.writerow([item["image"], item["status"], *blanks, "", item["error"], *[""] * (2 * len(labels))])
    return path


def plot_roc_curves(path: str, y_prob: np.ndarray, y: np.ndarray, labels: Sequence[str], report: dict) -> None:
    """One ROC curve per finding with its AUC in the legend, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7, 7))
    for c, label in enumerate(labels):
        auc = report["per_class"][label]["auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(y[:, c] > 0.5, y_prob[:, c])
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, mean AUC {report['mean']['auc']:.3f}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
