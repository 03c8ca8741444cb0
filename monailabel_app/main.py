"""MONAI Label app that serves a packaged MedFusionNet bundle (``scripts/package_bundle.py``) for 2-D chest X-rays.

    monailabel start_server --app monailabel_app --studies /path/to/xrays \\
        --conf bundle_path dist/cxr14_medfusionnet_classification --host 127.0.0.1 --port 8000

One infer task, ``medfusionnet`` (classification, 2-D). ``POST /infer/medfusionnet?image=<id>&output=json`` returns
the 14 probabilities, the decisions at the bundle's thresholds, the positive findings and the risk tier, as the
bundle's inference writes them to ``decisions.json``; ``output=image`` (or ``all``) also returns the Grad-CAM map of
the most probable finding, thresholded at half its maximum, as a PNG label image of the X-ray's size, which 3D
Slicer's MONAI Label module shows over the image. Tabular input is read from the DICOM header, or from the request's
params (``age``, ``sex``, ``view``, ``follow_up``, and ``clinical``: ``{column: value}`` for a risk model's other
fields), else encoded as missing. A bundle packaged with ``--risk_model`` also answers the patient's tabular risk
(level, probability and fired rules per outcome), the combined tier and its rule, as ``decisions.json`` holds them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

import numpy as np
import torch
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

logger = logging.getLogger(__name__)


class MedFusionNetInfer(InferTask):
    """Classification with decision support and a Grad-CAM label of the top finding, from a packaged bundle."""

    def __init__(self, bundle_path: str):
        if bundle_path not in sys.path:  # the bundle's own copy of the code
            sys.path.insert(0, bundle_path)
        from medfusionnet.constants import LABELS

        super().__init__(
            type=InferType.CLASSIFICATION,
            labels=list(LABELS),
            dimension=2,
            description="MedFusionNet: 14 NIH findings, decisions, risk tier and Grad-CAM",
        )
        self.bundle_path = bundle_path
        self._loaded = None

    def is_valid(self) -> bool:
        """The bundle holds a trained model."""
        return os.path.isfile(os.path.join(self.bundle_path, "models", "model.pt"))

    def _load(self):
        if self._loaded is None:
            from medfusionnet.data.transforms import xray_transforms
            from medfusionnet.engine.run_settings import saved_setting
            from medfusionnet.evaluation.calibration import TemperatureScaling
            from medfusionnet.evaluation.decision import RiskTierRule
            from medfusionnet.explain.workflow import load_trained
            from medfusionnet.risk.assessment import PatientRiskAssessor

            models = os.path.join(self.bundle_path, "models")
            network, encoder, image_size, thresholds = load_trained(models)
            calibration = os.path.join(models, "calibration.json")
            risk = PatientRiskAssessor.load_if_present(os.path.join(models, "risk_model.json"))
            self._loaded = {
                "trained_on": saved_setting(models, "data", default={}),
                "network": network,
                "image_size": image_size,
                "thresholds": np.asarray(thresholds),
                "risk": risk,
                "transform": xray_transforms(encoder, image_size, with_label=False, risk=risk),
                "rule": RiskTierRule(),
                "calibration": TemperatureScaling.load(calibration) if os.path.isfile(calibration) else None,
            }
            if self._loaded["trained_on"].get("synthetic"):
                logger.warning(
                    "%s was trained on the SYNTHETIC demo set, not on X-rays: its findings mean nothing", models
                )
        return self._loaded

    def __call__(self, request):
        """``(label PNG path, result JSON)`` for ``request["image"]`` (a file path)."""
        from PIL import Image

        from medfusionnet.constants import KEY_CLINICAL, KEY_RISK, LABELS, RAW_TABULAR_KEYS
        from medfusionnet.data.image_reader import read_xray
        from medfusionnet.evaluation.decision import decision_document
        from medfusionnet.explain.saliency import gradcam, rescale_box

        m = self._load()
        path = request["image"]
        fields = {k: request[k] for k in (*RAW_TABULAR_KEYS, KEY_CLINICAL) if request.get(k) is not None}
        if not isinstance(fields.get(KEY_CLINICAL, {}), dict):
            raise ValueError(f"params 'clinical' must be an object of column: value, got {fields[KEY_CLINICAL]!r}")
        name = os.path.basename(path)
        item = m["transform"]({**fields, "image": path, "name": name})
        image = torch.as_tensor(item["image"])[None]
        tabular = torch.as_tensor(item["tabular"])[None]
        with torch.no_grad():
            probs = torch.sigmoid(m["network"](image, tabular))[0].numpy().astype(np.float64)
        top = int(np.argmax(probs))
        cam = gradcam(m["network"], image, top, tabular)[0, 0].numpy()
        # back to the X-ray's own frame: undo the centred padding, then resize to the file's size
        height, width = read_xray(path).array.shape
        x0, y0, x1, y1 = rescale_box((0, 0, width, height), (width, height), m["image_size"])
        crop = cam[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))]
        mask = np.asarray(Image.fromarray((crop >= 0.5).astype(np.uint8) * 255).resize((width, height))) > 127
        label_path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        Image.fromarray(mask.astype(np.uint8)).save(label_path)
        # the same decisions, tier and calibrated scale as the bundle's inference (decision.decision_document)
        risks = {name: json.loads(item[KEY_RISK])} if m["risk"] is not None else None
        document = decision_document(
            [name], probs[None], m["thresholds"], m["rule"], m["calibration"], labels=LABELS, risks=risks
        )
        image_result = document["images"][0]
        result = {
            "image": image_result["image"],
            "tier": image_result["tier"],
            "rule": document["rule"],
            "thresholds": document["thresholds"],
            "findings": image_result["findings"],
            "probabilities": image_result["probabilities"],
            "decisions": image_result["decisions"],
            "calibrated": document["calibrated"],
            "model_trained_on": m["trained_on"],
            **{k: image_result[k] for k in ("tabular_risk", "combined_tier") if k in image_result},
            **({"combined_rule": document["combined_rule"]} if risks is not None else {}),
            "gradcam_finding": LABELS[top],
            "gradcam_label": "pixels at or above half the Grad-CAM maximum",
        }
        return label_path, result


class MedFusionNetApp(MONAILabelApp):
    """Serves ``--conf bundle_path <packaged bundle>`` (default: ``bundle`` next to this file)."""

    def __init__(self, app_dir, studies, conf):
        self.bundle_path = os.path.abspath(conf.get("bundle_path", os.path.join(app_dir, "bundle")))
        if not os.path.isdir(os.path.join(self.bundle_path, "medfusionnet")):
            raise ValueError(
                f"bundle_path {self.bundle_path} is not a packaged MedFusionNet bundle "
                "(run scripts/package_bundle.py and pass --conf bundle_path <its folder>)"
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedFusionNet",
            description="Chest X-ray findings with decision support",
            version="0.4.0",
        )

    def init_infers(self):
        """The one infer task."""
        return {"medfusionnet": MedFusionNetInfer(self.bundle_path)}
