"""Thin Ignite handlers: multilabel metric handlers, the metrics/threshold report, predictions and skip counts."""

from __future__ import annotations

import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import IgniteMetricHandler, from_engine

from ..constants import KEY_IMAGE, KEY_LABEL, KEY_NAME, KEY_PRED, KEY_RISK, LABELS
from ..distributed import gather_objects, is_main_process
from ..evaluation.calibration import TemperatureScaling
from ..evaluation.decision import RiskTierRule, decision_document
from ..evaluation.metrics import MultiLabelAUC, MultiLabelAUPRC, MultiLabelThresholdMetric
from ..evaluation.reports import metrics_report, write_decisions, write_metrics_report, write_predictions_csv

logger = logging.getLogger(__name__)

_default_output = from_engine([KEY_PRED, KEY_LABEL])


class _MultiLabelHandler(IgniteMetricHandler):
    """An `IgniteMetricHandler` whose metric's per-class values also land in ``engine.state.metrics`` as
    ``"<name>/<label>"`` (so TensorBoard and the stats log show them); NaN classes are left out."""

    def __init__(self, metric_fn, output_transform: Callable, labels: Sequence[str], per_class: bool):
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=False)
        self.labels = list(labels)
        self.per_class = per_class
        self._undefined_warned: list[str] | None = None

    def completed(self, engine: Engine, name: str) -> None:
        """Store the mean under ``name`` and, if ``per_class``, each class under ``name/label``; with ``per_class``
        the findings left out of the mean (undefined on this data) are named in the log: as a warning the first
        time, and at INFO while the same findings stay undefined epoch after epoch (a fixed split)."""
        super().completed(engine, name)
        if self.per_class:
            undefined = []
            for label, value in zip(self.labels, self.metric_fn.per_class_):
                if math.isfinite(value):
                    engine.state.metrics[f"{name}/{label}"] = float(value)
                else:
                    undefined.append(label)
            if undefined:
                repeated = undefined == self._undefined_warned
                self._undefined_warned = undefined
                logger.log(
                    logging.INFO if repeated else logging.WARNING,
                    "%s is the mean over %d of %d findings: %s left out (only one label value among these images)",
                    name,
                    len(self.labels) - len(undefined),
                    len(self.labels),
                    ", ".join(undefined),
                )


class MeanAUC(_MultiLabelHandler):
    """Mean ROC-AUC over findings (NaN-safe, `metrics.MultiLabelAUC`); per-class values with ``per_class``."""

    def __init__(self, output_transform: Callable = _default_output, labels=LABELS, per_class: bool = True):
        super().__init__(MultiLabelAUC(), output_transform, labels, per_class)


class MeanAUPRC(_MultiLabelHandler):
    """Mean area under the precision-recall curve over findings."""

    def __init__(self, output_transform: Callable = _default_output, labels=LABELS, per_class: bool = False):
        super().__init__(MultiLabelAUPRC(), output_transform, labels, per_class)


class MeanThresholdMetric(_MultiLabelHandler):
    """Mean F1, G-mean or accuracy over findings at fixed thresholds, or at thresholds chosen on the data (None)."""

    def __init__(
        self,
        metric: str = "f1",
        thresholds: Sequence[float] | None = None,
        output_transform: Callable = _default_output,
        labels=LABELS,
        per_class: bool = False,
    ):
        super().__init__(MultiLabelThresholdMetric(metric, thresholds), output_transform, labels, per_class)


class _OutputCollector(ABC):
    """Collects, per epoch, each item's file name, probabilities and (when present) label from a decollated
    evaluator; gathers across ranks and drops the duplicates a distributed sampler pads with."""

    def __init__(self, labels: Sequence[str] = LABELS):
        self.labels = list(labels)
        self._rows: list = []

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start, iteration end and epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, engine: Engine) -> None:
        self._rows = []

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            label = out.get(KEY_LABEL, item.get(KEY_LABEL))
            self._rows.append(
                (
                    str(item[KEY_NAME]),
                    out[KEY_PRED].detach().float().cpu().numpy().reshape(-1),
                    None if label is None else torch.as_tensor(label).float().cpu().numpy().reshape(-1),
                    item.get(KEY_RISK),
                )
            )

    def _gathered(self) -> list:
        rows, seen = [], set()
        for row in gather_objects(self._rows):
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
        return rows

    def _epoch_completed(self, engine: Engine) -> None:
        rows = self._gathered()
        if is_main_process() and rows:
            self.write(engine, rows)

    @abstractmethod
    def write(self, engine: Engine, rows: list) -> None:
        """Write the gathered rows (name, probabilities, label, tabular risk JSON or None)."""


class MetricsReport(_OutputCollector):
    """Writes the full metric report of an evaluator's epoch (`metrics.summarize`) under ``output_dir``.

    Files: ``metrics.json`` (per-class and mean AUC, AUPRC, F1, G-mean, accuracy, sensitivity, specificity and the
    thresholds used), ``metrics.csv`` (one row per finding), ``thresholds.json`` when the thresholds were chosen on
    this data, and optionally ``roc.png`` and ``predictions.csv``.

    Args:
        output_dir: folder for the files.
        thresholds: fixed per-class thresholds (evaluation), or None to choose them by maximum G-mean (validation).
        best_only: write only when the evaluator's key metric has just improved (validation during training).
        plot_roc: also draw the per-class ROC curves.
        save_predictions: also write the per-image probabilities.
        labels: finding names.
        data: where the images came from (`nih.PreparedData.provenance`, with the split evaluated), written into
            ``metrics.json`` as ``data``.
        calibration: a fitted `calibration.TemperatureScaling` whose effect on the expected calibration error is
            reported (evaluation); when thresholds are chosen on this data (validation), one is fitted here and
            written as ``calibration.json`` instead.
    """

    def __init__(
        self,
        output_dir: str,
        thresholds: Sequence[float] | None = None,
        best_only: bool = False,
        plot_roc: bool = False,
        save_predictions: bool = False,
        labels: Sequence[str] = LABELS,
        calibration: TemperatureScaling | None = None,
        data: dict | None = None,
    ):
        super().__init__(labels)
        self.data = data
        self.output_dir = output_dir
        self.thresholds = thresholds
        self.best_only = best_only
        self.plot_roc = plot_roc
        self.save_predictions = save_predictions
        self.calibration = calibration
        self._fallback_warned: list[str] | None = None  # warned once; later epochs with the same findings at INFO

    def write(self, engine: Engine, rows: list) -> None:
        """Summarise the rows and write the report files (`reports.metrics_report`, `reports.write_metrics_report`)."""
        if self.best_only and getattr(engine.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        if any(r[2] is None for r in rows):
            raise ValueError("MetricsReport needs a label for every image")
        y_prob = np.stack([r[1] for r in rows])
        y = np.stack([r[2] for r in rows])
        report, fitted = metrics_report(y_prob, y, self.labels, self.thresholds, self.calibration, engine.state.epoch)
        if self.data is not None:
            report["data"] = self.data
        if self.thresholds is None and report["undefined_auc"]:
            repeated = report["undefined_auc"] == self._fallback_warned
            self._fallback_warned = report["undefined_auc"]
            logger.log(
                logging.INFO if repeated else logging.WARNING,
                "decision threshold of %s left at 0.5: the images these thresholds are chosen on hold only one label "
                "value of it",
                ", ".join(report["undefined_auc"]),
            )
        names = [r[0] for r in rows] if self.save_predictions else None
        write_metrics_report(self.output_dir, report, fitted, names, y_prob, y, self.plot_roc)
        scored = f"{(self.data or {}).get('evaluated', 'evaluation')} split"
        if self.best_only:
            scored += f", best epoch so far ({report['epoch']})"
        logger.info(
            "%s: mean AUC %.4f over %d images (%s written to %s)",
            scored,
            report["mean"]["auc"],
            report["num_images"],
            "metrics.json",
            self.output_dir,
        )


class PredictionWriter(_OutputCollector):
    """Writes ``predictions.csv`` (``Image Index`` plus one probability column per finding) under ``output_dir``."""

    def __init__(self, output_dir: str, filename: str = "predictions.csv", labels: Sequence[str] = LABELS):
        super().__init__(labels)
        self.output_dir = output_dir
        self.filename = filename

    def write(self, engine: Engine, rows: list) -> None:
        """Write the rows, sorted by name."""
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, self.filename)
        rows = sorted(rows, key=lambda r: r[0])
        write_predictions_csv(path, [r[0] for r in rows], [r[1] for r in rows], self.labels)
        logger.info("wrote %d prediction(s) to %s", len(rows), path)


class DecisionWriter(_OutputCollector):
    """Decision support for inference: ``decisions.csv`` and ``decisions.json`` under ``output_dir``
    (`decision.decision_document`, `reports.write_decisions`).

    Per image: the probability of each finding (temperature-scaled when ``calibration`` is given), the decision at
    its threshold, the positive findings and the risk tier of ``rule``. The images the data loader skipped as
    unreadable (`data.unreadable.SkipUnreadable`) are listed with status ``unreadable`` and the reader's error, so
    a bad file is reported without stopping the batch.

    Args:
        output_dir: folder for the files.
        thresholds: per-finding thresholds (None: 0.5 for every finding).
        calibration: a fitted `calibration.TemperatureScaling`, or None.
        rule: the `decision.RiskTierRule` (default: pneumothorax or two findings -> high).
        labels: finding names.
        risk: the `risk.assessment.PatientRiskAssessor` whose assessments the transforms stored (`AssessRiskd`), or
            None: each image then also gets the patient's tabular risk and the combined tier.
        trained_on: the provenance of the model's training data (``run_settings.json``'s ``data``), written into
            ``decisions.json``; a model trained on the synthetic demo set is named in a warning.
    """

    def __init__(
        self,
        output_dir: str,
        thresholds: Sequence[float] | None = None,
        calibration: TemperatureScaling | None = None,
        rule: RiskTierRule | None = None,
        labels: Sequence[str] = LABELS,
        trained_on: dict | None = None,
        risk=None,
    ):
        super().__init__(labels)
        self.risk = risk
        self.trained_on = dict(trained_on or {})
        if self.trained_on.get("synthetic"):
            logger.warning(
                "this model was trained on the SYNTHETIC demo set, not on X-rays: its findings on real images mean "
                "nothing (train with --dataset_dir for a real model)"
            )
        self.output_dir = output_dir
        self.thresholds = list(thresholds) if thresholds is not None else [0.5] * len(labels)
        self.calibration = calibration
        self.rule = rule or RiskTierRule(labels=labels)

    def _epoch_completed(self, engine: Engine) -> None:
        rows = self._gathered()
        skipped = gather_objects(list(getattr(engine.state.dataloader, "skipped", [])))
        if is_main_process():  # also when every image was unreadable: the report says so
            self.write(engine, rows, skipped)

    def write(self, engine: Engine, rows: list, skipped: Sequence[dict] = ()) -> None:
        """Write both files, images sorted by name, the unreadable ones last."""
        probs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, len(self.labels)))
        risks = {r[0]: json.loads(r[3]) for r in rows if r[3] is not None} if self.risk is not None else None
        document = decision_document(
            [r[0] for r in rows], probs, self.thresholds, self.rule, self.calibration, skipped, self.labels, risks
        )
        if self.risk is not None:
            document["risk_model"] = self.risk.describe()
        document["model_trained_on"] = self.trained_on
        path = write_decisions(self.output_dir, document, self.labels)
        logger.info(
            "wrote decisions for %d image(s) (%d unreadable) to %s", len(document["images"]), len(skipped), path
        )


class DecisionReportWriter:
    """Writes ``decisions.html`` beside ``decisions.json`` (`report.html`) at the end of an inference run.

    Reads the run's ``decisions.json`` (so it must come after `DecisionWriter` in the handler list) and gives each
    of the first ``max_pages`` readable images, most urgent tier first, its page: the X-ray, the Grad-CAM region of
    each positive finding (`serving.to_xray_frame`, kept where the map reaches ``cam_threshold``), the
    probabilities against the thresholds, the tier, the tabular inputs and the tabular risk. Every image is listed
    on the index page. ``max_pages`` 0 writes the index only.

    Args:
        output_dir: the folder of ``decisions.json``.
        network: the evaluated network (Grad-CAM of its CNN branch).
        transform: the inference preprocessing (`transforms.xray_transforms`), applied again to the paged images.
        data: the run's records (``image`` path, ``name`` and the tabular fields), as the dataset holds them.
        max_pages: the most images given a page.
        cam_threshold: the fraction of a map's maximum that bounds a finding's region.
    """

    def __init__(
        self,
        output_dir: str,
        network: torch.nn.Module,
        transform: Callable,
        data: Sequence[dict],
        max_pages: int = 20,
        cam_threshold: float = 0.5,
    ):
        if int(max_pages) < 0:
            raise ValueError(f"report max_pages must be 0 or more, got {max_pages}")
        if not 0.0 < float(cam_threshold) <= 1.0:
            raise ValueError(f"report cam_threshold must be in (0, 1], got {cam_threshold}")
        self.output_dir = output_dir
        self.network = network
        self.transform = transform
        self.records = {str(r[KEY_NAME]): r for r in data}
        self.max_pages = int(max_pages)
        self.cam_threshold = float(cam_threshold)

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch end."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        if is_main_process():
            self.write()

    def write(self) -> str:
        """Write the pages and the index; returns the index's path."""
        from ..constants import KEY_TABULAR
        from ..data.image_reader import read_xray
        from ..report import html
        from ..serving import gradcam_maps, inputs_used, with_document_keys

        with open(os.path.join(self.output_dir, "decisions.json")) as f:
            document = json.load(f)
        urgency = {"high": 0, "medium": 1, "low": 2}
        readable = [i for i in document["images"] if i["status"] == "ok" and i["image"] in self.records]
        readable.sort(key=lambda i: (urgency.get(i.get("combined_tier", i["tier"]), 3), i["image"]))
        device = next(self.network.parameters()).device
        was_training = self.network.training
        self.network.eval()
        pages = {}
        try:
            for item in readable[: self.max_pages]:
                record = self.records[item["image"]]
                xray = read_xray(record[KEY_IMAGE])
                prepared = self.transform(dict(record))
                image = torch.as_tensor(prepared[KEY_IMAGE])[None].to(device)
                tabular = torch.as_tensor(prepared[KEY_TABULAR])[None].to(device)
                maps = gradcam_maps(self.network, image, tabular, item["findings"], xray.array.shape)
                fields = inputs_used(xray.header, record)
                result = with_document_keys(item, document)
                pages[item["image"]] = html.write_study_page(
                    os.path.join(self.output_dir, "report"), result, xray.array, maps, fields, self.cam_threshold
                )
        finally:
            self.network.train(was_training)
        path = html.write_index(self.output_dir, document, pages)
        logger.info("wrote %s (%d image page(s))", path, len(pages))
        return path


class SinglePassLog:
    """Drops the evaluator's "Got new best metric" line: one evaluation pass has no best epoch to report."""

    def attach(self, engine: Engine) -> None:
        """Filter ``engine``'s logger."""
        engine.logger.addFilter(lambda record: not record.getMessage().startswith("Got new best metric"))


class UnreadableImageReport:
    """Logs, per epoch, how many images of the data loader were unreadable and skipped.

    Counts the images that reached the engine against the length of the loader's sampler; the files themselves
    are named in the warnings of `transforms.XrayDataset`.
    """

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start, iteration start and epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.seen = 0

    def _count(self, engine: Engine) -> None:
        self.seen += int(engine.state.batch[KEY_IMAGE].shape[0])

    def _report(self, engine: Engine) -> None:
        loader = engine.state.dataloader  # set by every Ignite run, as DecisionWriter reads it
        expected = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
        if getattr(loader, "drop_last", False):  # the incomplete last batch never reaches the engine
            expected -= expected % loader.batch_size
        skipped = expected - self.seen
        engine.state.skipped_images = skipped
        if skipped > 0:
            when = f"in epoch {engine.state.epoch}" if hasattr(engine, "optimizer") else "by this run"
            logger.warning("%d of %d image(s) were unreadable and skipped %s", skipped, expected, when)


class LossProgressBar:
    """Ignite's tqdm progress bar showing the training loss; disabled where output is not a terminal (CI logs)."""

    def __init__(self, persist: bool = False):
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist, disable=None)

    def attach(self, engine: Engine) -> None:
        """Attach the bar to ``engine``, showing ``loss`` from its output."""
        self.bar.attach(engine, output_transform=from_engine(["loss"], first=True))


class CurriculumHandler:
    """Anneals a balanced sampler from balanced to natural sampling, and advances its epoch.

    At the start of epoch ``e`` the sampler's exponent is ``start + (end - start) * min((e - 1) / epochs, 1)``:
    ``start`` (1, balanced) in the first epoch, ``end`` (0, natural) from epoch ``epochs + 1`` on. ``epochs`` 0
    keeps ``start`` throughout. The exponent is logged and kept in ``engine.state.curriculum_power``.
    """

    def __init__(self, sampler, epochs: int, start_power: float = 1.0, end_power: float = 0.0):
        if epochs < 0:
            raise ValueError(f"curriculum epochs={epochs} must be 0 or more")
        self.sampler = sampler
        self.epochs = int(epochs)
        self.start_power = float(start_power)
        self.end_power = float(end_power)

    def power_at(self, epoch: int) -> float:
        """The exponent used in (1-based) ``epoch``."""
        if self.epochs == 0:
            return self.start_power
        t = min(max(epoch - 1, 0) / self.epochs, 1.0)
        return self.start_power + (self.end_power - self.start_power) * t

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)

    def _epoch_started(self, engine: Engine) -> None:
        power = self.power_at(engine.state.epoch)
        self.sampler.set_power(power)
        self.sampler.set_epoch(engine.state.epoch)
        engine.state.curriculum_power = power
        logger.info(
            "epoch %d: sampling balance %.2f (1 = rare findings oversampled, 0 = natural frequencies)",
            engine.state.epoch,
            power,
        )
