import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score

from medfusionnet.evaluation.metrics import (
    MultiLabelAUC,
    MultiLabelAUPRC,
    MultiLabelThresholdMetric,
    roc_auc_per_class,
    summarize,
    threshold_metric_per_class,
)
from medfusionnet.evaluation.thresholds import choose_thresholds


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 5)) < 0.3).astype(np.float32)
    y[:, 4] = 0  # a class without positives: AUC undefined
    prob = np.clip(0.6 * y + rng.random((200, 5)) * 0.7, 0, 1).astype(np.float32)
    return prob, y


def test_auc_against_sklearn_and_nan_safe_mean(data):
    prob, y = data
    auc = roc_auc_per_class(prob, y)
    for c in range(4):
        assert auc[c] == pytest.approx(roc_auc_score(y[:, c], prob[:, c]))
    assert math.isnan(auc[4])
    metric = MultiLabelAUC()
    metric(torch.from_numpy(prob), torch.from_numpy(y))
    assert metric.aggregate() == pytest.approx(np.mean(auc[:4]))


def test_threshold_metrics_against_sklearn_and_by_hand(data):
    prob, y = data
    thresholds = np.array([0.3, 0.5, 0.6, 0.7, 0.5])
    pred = prob >= thresholds
    f1 = threshold_metric_per_class(prob, y, thresholds, "f1")
    acc = threshold_metric_per_class(prob, y, thresholds, "accuracy")
    gmean = threshold_metric_per_class(prob, y, thresholds, "gmean")
    for c in range(4):
        assert f1[c] == pytest.approx(f1_score(y[:, c], pred[:, c]))
        assert acc[c] == pytest.approx(accuracy_score(y[:, c], pred[:, c]))
        tp = np.sum(pred[:, c] & (y[:, c] == 1))
        tn = np.sum(~pred[:, c] & (y[:, c] == 0))
        sens, spec = tp / y[:, c].sum(), tn / (1 - y[:, c]).sum()
        assert gmean[c] == pytest.approx(math.sqrt(sens * spec))
    assert math.isnan(gmean[4])  # no positives: sensitivity undefined


def test_gmean_hand_example():
    # 2 positives (1 caught), 2 negatives (1 false alarm): sens = spec = 0.5
    y = np.array([[1], [1], [0], [0]])
    prob = np.array([[0.9], [0.1], [0.8], [0.2]])
    assert threshold_metric_per_class(prob, y, [0.5], "gmean")[0] == pytest.approx(0.5)
    assert threshold_metric_per_class(prob, y, [0.5], "f1")[0] == pytest.approx(0.5)


def test_chosen_thresholds_maximise_gmean(data):
    prob, y = data
    chosen = choose_thresholds(prob, y)
    for c in range(4):
        best = threshold_metric_per_class(prob, y, chosen, "gmean")[c]
        grid = np.unique(prob[:, c])
        brute = max(threshold_metric_per_class(prob[:, [c]], y[:, [c]], [t], "gmean")[0] for t in grid)
        assert best == pytest.approx(brute)
    assert chosen[4] == 0.5  # undefined class keeps the default


def test_cumulative_metrics_equal_whole_batch(data):
    prob, y = data
    auprc, f1 = MultiLabelAUPRC(), MultiLabelThresholdMetric("f1", thresholds=[0.5] * 5)
    for start in range(0, 200, 64):  # batches, then decollated items of the last one
        batch = slice(start, start + 64)
        for m in (auprc, f1):
            if start < 192:
                m(torch.from_numpy(prob[batch]), torch.from_numpy(y[batch]))
            else:
                m([torch.from_numpy(p) for p in prob[batch]], [torch.from_numpy(t) for t in y[batch]])
    expected_ap = np.mean([average_precision_score(y[:, c], prob[:, c]) for c in range(4)])
    assert auprc.aggregate() == pytest.approx(expected_ap)
    # class e has no positive but false alarms: F1 is 0 there, as in scikit-learn
    expected_f1 = np.mean([f1_score(y[:, c], prob[:, c] >= 0.5, zero_division=0) for c in range(5)])
    assert f1.aggregate() == pytest.approx(expected_f1)


def test_summarize_report(data):
    prob, y = data
    labels = ["a", "b", "c", "d", "e"]
    report = summarize(prob, y, labels, thresholds=[0.5] * 5)
    assert report["num_images"] == 200 and report["undefined_auc"] == ["e"]
    assert report["per_class"]["e"]["auc"] is None
    assert report["mean"]["auc"] == pytest.approx(np.mean(roc_auc_per_class(prob, y)[:4]))
    assert report["per_class"]["a"]["threshold"] == 0.5
    chosen = summarize(prob, y, labels)
    assert chosen["per_class"]["a"]["threshold"] == pytest.approx(choose_thresholds(prob, y)[0])
    with pytest.raises(ValueError, match="must both be"):
        summarize(prob[:, :3], y, labels)


def test_metrics_report_files_by_hand(tmp_path):
    import json

    from medfusionnet.evaluation.reports import metrics_report, write_metrics_report

    prob = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.7], [0.1, 0.4]])
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    # fixed thresholds: nothing fitted, nothing chosen; AUC a = 1, b = 1 (0.6 and 0.7 above 0.2 and 0.4)
    report, fitted = metrics_report(prob, y, ["a", "b"], thresholds=[0.5, 0.5], epoch=3)
    assert fitted is None and report["epoch"] == 3 and not report["thresholds_chosen_on_this_data"]
    assert report["per_class"]["a"]["auc"] == 1.0 and report["per_class"]["b"]["auc"] == 1.0
    # b at 0.5: predicted positive 0.6 and 0.7 (both right) -> sensitivity 1, specificity 1
    assert report["per_class"]["b"]["sensitivity"] == 1.0 and report["per_class"]["b"]["specificity"] == 1.0
    write_metrics_report(str(tmp_path / "eval"), report, fitted, ["w", "x", "y", "z"], prob, y)
    assert not (tmp_path / "eval" / "thresholds.json").exists()
    assert not (tmp_path / "eval" / "calibration.json").exists()
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("finding,auc,auprc") and rows[-1].startswith("mean,1.000000")
    predictions = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "Image Index,a,b" and predictions[2] == "x,0.800000,0.600000"
    # thresholds chosen on the data (validation): written, with a temperature scaling fitted on the same data
    chosen, fitted = metrics_report(prob, y, ["a", "b"])
    assert fitted is not None and chosen["calibration"]["fitted_on_this_data"]
    write_metrics_report(str(tmp_path / "val"), chosen, fitted)
    saved = json.loads((tmp_path / "val" / "thresholds.json").read_text())
    assert saved == {"a": chosen["per_class"]["a"]["threshold"], "b": chosen["per_class"]["b"]["threshold"]}
    assert (tmp_path / "val" / "calibration.json").is_file() and not (tmp_path / "val" / "predictions.csv").exists()
