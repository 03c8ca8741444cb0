import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from medfusionnet.constants import LABELS
from medfusionnet.data.image_reader import read_xray
from medfusionnet.data.unreadable import SkipUnreadable, UnreadableImageError, collate_skipping_unreadable, placeholder
from medfusionnet.engine.handlers import DecisionWriter, MeanAUC, MetricsReport
from medfusionnet.evaluation.calibration import TemperatureScaling, calibration_error, probabilities_to_logits
from medfusionnet.evaluation.decision import RiskTierRule, decision_document


def _decisions(*positive):
    return [label in positive for label in LABELS]


def test_risk_tier_rule():
    rule = RiskTierRule()
    assert rule(_decisions()) == "low"
    assert rule(_decisions("Nodule")) == "medium"
    assert rule(_decisions("Pneumothorax")) == "high"  # urgent on its own
    assert rule(_decisions("Nodule", "Mass")) == "high"  # several findings
    assert RiskTierRule(urgent=(), high_risk_count=3)(_decisions("Nodule", "Mass")) == "medium"
    assert "Pneumothorax" in rule.describe()
    with pytest.raises(ValueError, match="Tumour"):
        RiskTierRule(urgent=("Tumour",))
    with pytest.raises(ValueError, match="high_risk_count=0"):
        RiskTierRule(high_risk_count=0)


def _overconfident(n=3000, temperature=3.0, seed=0):
    """Labels drawn from sigmoid(z); the model reports logits temperature * z (overconfident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(LABELS))) * 1.5
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    return z * temperature, y


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece(tmp_path):
    logits, y = _overconfident()
    scaler = TemperatureScaling().fit(logits, y)
    np.testing.assert_allclose(scaler.temperatures_, 3.0, rtol=0.12)
    before = calibration_error(1 / (1 + np.exp(-logits)), y).mean()
    after = calibration_error(scaler.transform(logits), y).mean()
    assert after < before / 3
    scaler.save(str(tmp_path / "calibration.json"))
    loaded = TemperatureScaling.load(str(tmp_path / "calibration.json"))
    np.testing.assert_array_equal(loaded.transform(logits), scaler.transform(logits))
    # a finding with a single class keeps T = 1
    y[:, 0] = 0
    assert TemperatureScaling().fit(logits, y).temperatures_[0] == 1.0
    (tmp_path / "bad.json").write_text(json.dumps({"temperatures": {"Atelectasis": -1}}))
    with pytest.raises(ValueError, match="bad.json"):
        TemperatureScaling.load(str(tmp_path / "bad.json"))


def test_calibration_error_by_hand():
    probs = np.array([[0.2], [0.2], [0.8], [0.8]])
    y = np.array([[0], [1], [1], [1]])
    # bin 0.2: confidence 0.2, accuracy 0.5; bin 0.8: confidence 0.8, accuracy 1.0; each holds half the images
    assert calibration_error(probs, y)[0] == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(1 / (1 + np.exp(-probabilities_to_logits(p))), p)
    # equal to MONAI's CalibrationErrorMetric with the images as the spatial axis
    from monai.metrics import CalibrationErrorMetric

    rng = np.random.default_rng(0)
    probs = rng.random((300, len(LABELS)))
    y = (rng.random(probs.shape) < probs**2).astype(float)
    metric = CalibrationErrorMetric(num_bins=10, metric_reduction="none")
    metric(
        y_pred=torch.tensor(probs.T[None].copy(), dtype=torch.float32),
        y=torch.tensor(y.T[None].copy(), dtype=torch.float32),
    )
    np.testing.assert_allclose(calibration_error(probs, y), metric.aggregate().reshape(-1).numpy(), atol=1e-6)


def _engine(batch):
    def step(engine, _):
        engine.state.batch = batch
        return [{"pred": item["pred"]} for item in batch]  # Ignite stores it as engine.state.output

    return Engine(step)


def test_decision_writer_reports_tiers_and_unreadable_files(tmp_path):
    probs = np.full(len(LABELS), 0.1)
    urgent = probs.copy()
    urgent[LABELS.index("Pneumothorax")] = 0.9
    batch = [{"name": "b.png", "pred": torch.tensor(urgent)}, {"name": "a.png", "pred": torch.tensor(probs)}]
    broken = tmp_path / "c.png"
    broken.write_bytes(b"")
    # an unreadable file on the loader path: the reader's error, the dataset's placeholder, the collated mark
    with pytest.raises(UnreadableImageError) as error:
        read_xray(str(broken))
    marked = placeholder({"image": str(broken), "name": "c.png"}, dict, error.value)
    loader = SkipUnreadable([collate_skipping_unreadable([marked, {"image": torch.zeros(1, 4, 4)}])])
    scaler = TemperatureScaling()
    scaler.temperatures_ = [2.0] * len(LABELS)
    writer = DecisionWriter(str(tmp_path / "out"), thresholds=[0.5] * len(LABELS), calibration=scaler)
    engine = _engine(batch)
    writer.attach(engine)
    engine.run(loader, max_epochs=1, epoch_length=1)
    document = json.loads((tmp_path / "out" / "decisions.json").read_text())
    assert [item["image"] for item in document["images"]] == ["a.png", "b.png", "c.png"]  # sorted, unreadable last
    images = {item["image"]: item for item in document["images"]}
    assert images["a.png"]["tier"] == "low" and images["b.png"]["tier"] == "high"
    assert images["b.png"]["findings"] == ["Pneumothorax"]
    # reported probability sigmoid(logit(0.9) / 2) = 0.75; the threshold on that scale stays 0.5
    assert images["b.png"]["probabilities"]["Pneumothorax"] == pytest.approx(0.75, abs=1e-6)
    assert document["thresholds"]["Pneumothorax"] == pytest.approx(0.5)
    # the reason travels with the placeholder: the file is not decoded a second time
    assert images["c.png"] == {"image": "c.png", "status": "unreadable", "error": str(error.value)}
    assert "empty" in images["c.png"]["error"]
    lines = (tmp_path / "out" / "decisions.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[3].startswith("c.png,unreadable")


def test_decision_document_by_hand():
    probs = np.array([[0.2, 0.7], [0.6, 0.1]])
    rule = RiskTierRule(urgent=("B",), high_risk_count=2, labels=["A", "B"])
    skipped = [{"name": "z.png", "image": "/x/z.png", "error": "cannot read image '/x/z.png': truncated"}]
    document = decision_document(["n2.png", "n1.png"], probs, [0.5, 0.5], rule, None, skipped, ["A", "B"])
    first, second, bad = document["images"]
    assert first["image"] == "n1.png" and first["findings"] == ["A"] and first["tier"] == "medium"
    assert second["image"] == "n2.png" and second["findings"] == ["B"] and second["tier"] == "high"
    assert second["decisions"] == {"A": False, "B": True} and second["probabilities"] == {"A": 0.2, "B": 0.7}
    assert bad == {"image": "z.png", "status": "unreadable", "error": skipped[0]["error"]}
    assert document["calibrated"] is False and document["thresholds"] == {"A": 0.5, "B": 0.5}


def test_metrics_report_fits_and_reports_calibration(tmp_path):
    logits, y = _overconfident(n=400)
    probs = 1 / (1 + np.exp(-logits))
    batch = [
        {"name": f"{i}.png", "pred": torch.tensor(p), "label": torch.tensor(t)}
        for i, (p, t) in enumerate(zip(probs, y))
    ]

    def step(engine, _):
        engine.state.batch = batch
        return [{"pred": item["pred"], "label": item["label"]} for item in batch]

    engine = Engine(step)
    MetricsReport(str(tmp_path / "val")).attach(engine)
    engine.run([0], max_epochs=1)
    report = json.loads((tmp_path / "val" / "metrics.json").read_text())["calibration"]
    assert (
        report["fitted_on_this_data"]
        and report["expected_calibration_error_calibrated"] < report["expected_calibration_error"]
    )
    scaler = TemperatureScaling.load(str(tmp_path / "val" / "calibration.json"))
    engine = Engine(step)
    MetricsReport(str(tmp_path / "test"), thresholds=[0.5] * len(LABELS), calibration=scaler).attach(engine)
    engine.run([0], max_epochs=1)
    report = json.loads((tmp_path / "test" / "metrics.json").read_text())["calibration"]
    assert not report["fitted_on_this_data"] and set(report["per_class"]) == set(LABELS)
    assert not (tmp_path / "test" / "calibration.json").exists()


def test_undefined_findings_warn_once_then_log_each_epoch(tmp_path, caplog):
    rng = np.random.default_rng(0)
    y = (rng.random((40, len(LABELS))) < 0.3).astype(np.float32)
    y[:, LABELS.index("Hernia")] = 0  # no positive: AUC undefined, threshold falls back to 0.5
    batch = [
        {"name": f"{i}.png", "pred": torch.tensor(rng.random(len(LABELS))), "label": torch.tensor(t)}
        for i, t in enumerate(y)
    ]

    def step(engine, _):
        engine.state.batch = batch
        return [{"pred": item["pred"], "label": item["label"]} for item in batch]

    engine = Engine(step)
    MeanAUC().attach(engine, "val_mean_auc")
    MetricsReport(str(tmp_path / "val")).attach(engine)
    with caplog.at_level("INFO", logger="medfusionnet.engine.handlers"):
        engine.run([0], max_epochs=3)
    mean_lines = [r for r in caplog.records if "mean over 13 of 14 findings: Hernia left out" in r.getMessage()]
    fallback = [r for r in caplog.records if "threshold of Hernia left at 0.5" in r.getMessage()]
    assert [r.levelname for r in mean_lines] == ["WARNING", "INFO", "INFO"]
    assert [r.levelname for r in fallback] == ["WARNING", "INFO", "INFO"]
    assert "val_mean_auc/Hernia" not in engine.state.metrics and "val_mean_auc/Mass" in engine.state.metrics
