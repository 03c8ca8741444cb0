"""One X-ray at a time from a trained model folder: the decisions of inference plus the region of each positive
finding in the X-ray's own pixel grid. Used by the MONAI Label app, `scripts/to_pacs.py` and the HTML report.

A finding's region is its Grad-CAM map (CNN branch, `explain.saliency.gradcam`, scaled to [0, 1] per map), taken
back to the X-ray's frame (the centred padding undone, then bilinear resizing to the file's size) and kept where it
reaches ``cam_threshold`` (0.5 by default: at least half the map's maximum). In the label map a pixel inside
several regions carries the finding whose map is strongest there; label value ``i + 1`` is ``LABELS[i]``, 0 none.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .constants import KEY_CLINICAL, KEY_RISK, KEY_TABULAR, LABELS, RAW_TABULAR_KEYS
from .data.image_reader import read_xray

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """The answer for one X-ray: ``result`` is its entry of ``decisions.json`` (probabilities, decisions, tier,
    tabular risk) with the document's ``rule``, ``thresholds`` and ``calibrated``; ``xray`` the decoded image
    (float32 ``(H, W)`` in [0, 1]); ``fields`` the tabular inputs used (after the DICOM header and the request)."""

    name: str
    result: dict
    probabilities: np.ndarray
    xray: np.ndarray
    fields: dict
    image: torch.Tensor = field(repr=False)
    tabular: torch.Tensor = field(repr=False)


class XrayPredictor:
    """A training run's output folder (or a packaged bundle's ``models/``) ready to answer one X-ray at a time."""

    def __init__(self, model_dir: str, device: str | torch.device = "cpu"):
        from .data.transforms import xray_transforms
        from .engine.run_settings import saved_setting
        from .evaluation.calibration import TemperatureScaling
        from .evaluation.decision import RiskTierRule
        from .explain.workflow import load_trained
        from .risk.assessment import PatientRiskAssessor

        self.model_dir = model_dir
        self.device = torch.device(device)
        self.network, encoder, self.image_size, thresholds = load_trained(model_dir, self.device)
        self.thresholds = np.asarray(thresholds, dtype=float)
        self.trained_on = saved_setting(model_dir, "data", default={})
        self.risk = PatientRiskAssessor.load_if_present(os.path.join(model_dir, "risk_model.json"))
        self.transform = xray_transforms(encoder, self.image_size, with_label=False, risk=self.risk)
        self.rule = RiskTierRule()
        self.calibration = TemperatureScaling.load_if_present(os.path.join(model_dir, "calibration.json"))
        if self.trained_on.get("synthetic"):
            logger.warning(
                "%s was trained on the SYNTHETIC demo set, not on X-rays: its findings mean nothing", model_dir
            )

    def predict(self, path: str, fields: dict | None = None, name: str | None = None) -> Prediction:
        """The decisions for the X-ray at ``path``; ``fields`` (``age``, ``sex``, ``view``, ``follow_up``,
        ``clinical``) override its DICOM header.

        Raises:
            data.unreadable.UnreadableImageError: the file is not a readable 2-D X-ray (named in the message).
            ValueError: ``clinical`` is not an object of ``column: value``.
        """
        from .evaluation.decision import decision_document

        fields = {k: v for k, v in (fields or {}).items() if k in (*RAW_TABULAR_KEYS, KEY_CLINICAL) and v is not None}
        if not isinstance(fields.get(KEY_CLINICAL, {}), dict):
            raise ValueError(f"'clinical' must be an object of column: value, got {fields[KEY_CLINICAL]!r}")
        name = name or os.path.basename(path)
        xray = read_xray(path)
        item = self.transform({**fields, "image": path, "name": name})
        image = torch.as_tensor(item["image"])[None].to(self.device)
        tabular = torch.as_tensor(item[KEY_TABULAR])[None].to(self.device)
        with torch.no_grad():
            probs = torch.sigmoid(self.network(image, tabular))[0].float().cpu().numpy().astype(np.float64)
        risks = {name: json.loads(item[KEY_RISK])} if self.risk is not None else None
        document = decision_document(
            [name], probs[None], self.thresholds, self.rule, self.calibration, labels=LABELS, risks=risks
        )
        result = with_document_keys(document["images"][0], document)
        return Prediction(name, result, probs, xray.array, inputs_used(xray.header, fields), image, tabular)

    def finding_maps(self, prediction: Prediction, findings: list[str] | None = None) -> dict[str, np.ndarray]:
        """``{finding: Grad-CAM map in [0, 1] on the X-ray's pixel grid}`` for ``findings`` (default: the positive
        ones)."""
        findings = prediction.result["findings"] if findings is None else findings
        return gradcam_maps(self.network, prediction.image, prediction.tabular, findings, prediction.xray.shape)

    def describe(self) -> dict:
        """The model's name, the bundle version and the training data, as the DICOM report records them."""
        from . import __version__

        return {"name": "MedFusionNet", "version": __version__, "trained_on": self.trained_on}


DOCUMENT_KEYS = ("rule", "thresholds", "calibrated", "combined_rule")  # decisions.json's run-level keys


def with_document_keys(item: dict, document: dict) -> dict:
    """One image's entry of a decisions document with the document's `DOCUMENT_KEYS` it holds (rule, thresholds,
    ...), as a page or a DICOM report of that image alone needs them."""
    return {**item, **{k: document[k] for k in DOCUMENT_KEYS if k in document}}


def decisions_document(results: list[dict], unreadable: list[dict] | None = None) -> dict:
    """A ``decisions.json`` document of single-image ``results`` (`XrayPredictor.predict`'s, which carry the
    `DOCUMENT_KEYS`): those keys once, the images without them, then the ``unreadable`` entries (``image``,
    ``status``, ``error``)."""
    if not results:
        raise ValueError("a decisions document needs at least one result")
    document = {k: results[0][k] for k in DOCUMENT_KEYS if k in results[0]}
    document["images"] = [{k: v for k, v in r.items() if k not in DOCUMENT_KEYS} for r in results]
    document["images"] += list(unreadable or [])
    return document


def inputs_used(header: dict, fields: dict) -> dict:
    """The tabular inputs of one X-ray as preprocessing takes them: its DICOM ``header`` values, overridden by the
    ``fields`` given with it that are not missing (``age``, ``sex``, ``view``, ``follow_up``; ``clinical`` kept as
    one object)."""
    from .data.tabular import is_missing

    used = {**header, **{k: v for k, v in fields.items() if k in RAW_TABULAR_KEYS and not is_missing(v)}}
    if fields.get(KEY_CLINICAL):
        used[KEY_CLINICAL] = fields[KEY_CLINICAL]
    return used


def gradcam_maps(network, image: torch.Tensor, tabular: torch.Tensor, findings, xray_shape) -> dict[str, np.ndarray]:
    """``{finding: Grad-CAM map in [0, 1]}`` of ``network``'s CNN branch for the prepared ``image`` (1, C, S, S) and
    ``tabular``, each on the X-ray's ``(height, width)`` grid (`to_xray_frame`)."""
    from .explain.saliency import gradcam

    height, width = xray_shape
    return {
        finding: to_xray_frame(
            gradcam(network, image, LABELS.index(finding), tabular)[0, 0].cpu().numpy(),
            int(image.shape[-1]),
            (width, height),
        )
        for finding in findings
    }


def to_xray_frame(cam: np.ndarray, image_size: int, frame_size: tuple[int, int]) -> np.ndarray:
    """A map at the network's input (``image_size`` square, the X-ray resized and centre-padded) on the X-ray's
    ``(width, height)`` grid: the padding cut away, then bilinear resizing."""
    from PIL import Image

    from .explain.saliency import rescale_box

    width, height = frame_size
    x0, y0, x1, y1 = rescale_box((0, 0, width, height), (width, height), image_size)
    left, top = int(round(x0)), int(round(y0))
    crop = cam[top : max(int(round(y1)), top + 1), left : max(int(round(x1)), left + 1)]
    resized = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32), mode="F").resize(
        (width, height), Image.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def finding_regions(maps: dict[str, np.ndarray], cam_threshold: float = 0.5) -> dict[str, np.ndarray]:
    """``{finding: bool mask}``: where each finding's map reaches ``cam_threshold``."""
    if not 0.0 < cam_threshold <= 1.0:
        raise ValueError(f"cam_threshold must be in (0, 1], got {cam_threshold}")
    return {finding: m >= cam_threshold for finding, m in maps.items()}


def label_map(maps: dict[str, np.ndarray], cam_threshold: float = 0.5, shape: tuple[int, int] | None = None):
    """uint8 label map: ``LABELS.index(finding) + 1`` where that finding's region is, the strongest map winning
    where regions overlap; 0 elsewhere (all 0, of ``shape``, without maps)."""
    if not maps:
        if shape is None:
            raise ValueError("label_map needs the shape when there are no maps")
        return np.zeros(shape, dtype=np.uint8)
    names = list(maps)
    stack = np.stack([maps[n] for n in names])
    strongest = stack.argmax(0)
    inside = stack.max(0) >= cam_threshold
    values = np.array([LABELS.index(n) + 1 for n in names], dtype=np.uint8)
    return np.where(inside, values[strongest], 0).astype(np.uint8)
