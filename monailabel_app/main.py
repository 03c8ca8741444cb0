"""MONAI Label app that serves a packaged MedFusionNet bundle (``scripts/package_bundle.py``) for 2-D chest X-rays.

    monailabel start_server --app monailabel_app --studies /path/to/xrays \\
        --conf bundle_path dist/cxr14_medfusionnet_classification --host 127.0.0.1 --port 8000
    monailabel start_server --app monailabel_app --studies http://127.0.0.1:8042/dicom-web \\
        --conf bundle_path dist/cxr14_medfusionnet_classification --conf modalities CR,DX

Studies come from a folder (PNG, JPEG, DICOM, NIfTI) or a DICOMweb server (``--studies <url>``: the series of the
``modalities`` conf, default ``CR,DX``, are the images; each is fetched as DICOM and read with its own MONOCHROME1 /
VOI LUT handling, no NIfTI conversion).

Two infer tasks, answering the same decisions:

- ``medfusionnet_findings`` (segmentation, the type 3D Slicer's MONAI Label module lists): labels are the 14
  findings (label value ``i + 1`` for ``LABELS[i]``); the result is one label map on the X-ray's pixel grid
  (NIfTI, the X-ray's pixel spacing) holding each positive finding's Grad-CAM region (`medfusionnet.serving`), so
  Slicer shows one segment per positive finding, named by finding. Its params (Slicer prints them, a client reads
  them) hold ``label_names``, the probabilities, thresholds, decisions, tier and, with a risk model, the tabular
  risk and the combined tier. Config ``cam_threshold`` (default 0.5) bounds the regions.
- ``medfusionnet`` (classification): ``output=json`` returns the same decisions; ``output=image`` the region of the
  most probable finding as a PNG of the X-ray's size.

Each answer also writes ``decisions.json`` and ``decisions.html`` for the image under ``<app>/reports/<image id>/``
(named as ``report`` in the params; config ``report`` false skips it, and the classification task then computes
only the top finding's map). Tabular input is read from the DICOM header, or from the request's params
(``age``, ``sex``, ``view``, ``follow_up``, and ``clinical``: ``{column: value}`` for a risk model's other fields),
else encoded as missing. An image id the datastore does not hold answers 404; a file that is not a readable 2-D
X-ray (a text upload, a DICOM without pixels) or a bad parameter answers 422, naming the file or the parameter; a
DICOMweb datastore that cannot be reached answers 502.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the app cannot answer because of its content (answered with 422 and this message)."""


def _series_file(path: str) -> str:
    """The X-ray file of ``path``: itself, or the one DICOM file of a series folder (a DICOMweb datastore's)."""
    if not os.path.isdir(path):
        return path
    files = sorted(f for f in os.listdir(path) if not f.startswith("."))
    if len(files) != 1:
        raise RequestError(f"series folder {path} holds {len(files)} files; a chest X-ray series holds one image")
    return os.path.join(path, files[0])


def _pixel_spacing(path: str) -> tuple[float, float]:
    """(row, column) spacing in mm of a DICOM file (PixelSpacing, else ImagerPixelSpacing); 1 for other files."""
    if not path.lower().endswith((".dcm", ".dicom")):
        return 1.0, 1.0
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)


class _BundleTask(InferTask):
    """Shared part of the two tasks: the packaged bundle's `medfusionnet.serving.XrayPredictor`, loaded once."""

    def __init__(self, bundle_path: str, reports_dir: str, type, labels, description: str, config: dict):
        super().__init__(type=type, labels=labels, dimension=2, description=description, config=config)
        self.bundle_path = bundle_path
        self.reports_dir = reports_dir
        self._predictor = None

    def is_valid(self) -> bool:
        """The bundle holds a trained model."""
        return os.path.isfile(os.path.join(self.bundle_path, "models", "model.pt"))

    def predictor(self):
        """The bundle's model, loaded on first use."""
        if self._predictor is None:
            from medfusionnet.serving import XrayPredictor

            self._predictor = XrayPredictor(os.path.join(self.bundle_path, "models"))
        return self._predictor

    def predict(self, request):
        """``(file, prediction)`` of ``request["image"]`` with the request's tabular params."""
        from medfusionnet.constants import KEY_CLINICAL, RAW_TABULAR_KEYS
        from medfusionnet.data.unreadable import UnreadableImageError

        path = _series_file(request["image"])
        fields = {k: request[k] for k in (*RAW_TABULAR_KEYS, KEY_CLINICAL) if request.get(k) is not None}
        name = os.path.basename(path)
        try:
            return path, self.predictor().predict(path, fields, name=name)
        except UnreadableImageError as err:
            raise RequestError(f"not a readable chest X-ray: {err}") from None
        except ValueError as err:
            raise RequestError(str(err)) from None

    def cam_threshold(self, request) -> float:
        """The request's ``cam_threshold`` (a number in (0, 1])."""
        value = request.get("cam_threshold", 0.5)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"params 'cam_threshold' must be a number in (0, 1], got {value!r}") from None
        if not 0.0 < value <= 1.0:
            raise RequestError(f"params 'cam_threshold' must be in (0, 1], got {value}")
        return value

    @staticmethod
    def with_report(request) -> bool:
        """The request's ``report`` switch (true, false, or their text as a config table sends it)."""
        value = request.get("report", True)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise RequestError(f"params 'report' must be true or false, got {value!r}")
        return value

    def answer(self, request, prediction, maps: dict, cam_threshold: float) -> dict:
        """The result params, with the per-image ``decisions.json`` / ``decisions.html`` written when ``report``."""
        from medfusionnet.report import html
        from medfusionnet.serving import decisions_document

        predictor = self.predictor()
        result = dict(prediction.result)
        answer = {
            **result,
            "model_trained_on": predictor.trained_on,
            "tabular_inputs": prediction.fields,
            "cam_threshold": cam_threshold,
        }
        if not self.with_report(request):
            return answer
        image_id = str(request.get("image_id") or prediction.name)
        folder = os.path.join(self.reports_dir, html.safe_name(image_id))
        document = decisions_document([result])
        document["model_trained_on"] = predictor.trained_on
        if predictor.risk is not None:
            document["risk_model"] = predictor.risk.describe()
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "decisions.json"), "w") as f:
            json.dump(document, f, indent=2)
        page = html.write_study_page(
            os.path.join(folder, "report"), result, prediction.xray, maps, prediction.fields, cam_threshold
        )
        html.write_index(folder, document, {prediction.name: page})
        return {**answer, "report": os.path.join(folder, "decisions.html")}


class MedFusionNetFindings(_BundleTask):
    """Segmentation task: one label map of the positive findings' regions, segments named by finding."""

    def __init__(self, bundle_path: str, reports_dir: str):
        from medfusionnet.constants import LABELS

        super().__init__(
            bundle_path,
            reports_dir,
            InferType.SEGMENTATION,
            {label: i + 1 for i, label in enumerate(LABELS)},
            "MedFusionNet: regions of the positive NIH findings (Grad-CAM), with decisions and risk tier",
            {"cam_threshold": 0.5, "report": True},
        )

    def __call__(self, request):
        """``(label map NIfTI path, result params)``."""
        import nibabel as nib

        from medfusionnet.constants import LABELS
        from medfusionnet.serving import label_map

        cam_threshold = self.cam_threshold(request)
        path, prediction = self.predict(request)
        maps = self.predictor().finding_maps(prediction)
        labels = label_map(maps, cam_threshold, prediction.xray.shape)
        row, column = _pixel_spacing(path)
        # NIfTI axes are (x = column, y = row); the negative diagonal makes ITK (and so Slicer) read the file back
        # with LPS identity direction, origin 0 and the X-ray's spacing, the grid Slicer gives a loaded X-ray
        affine = np.diag([-column, -row, 1.0, 1.0])
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine), out)
        params = self.answer(request, prediction, maps, cam_threshold)
        params["label_names"] = {label: i + 1 for i, label in enumerate(LABELS)}
        params["segments"] = [LABELS[v - 1] for v in sorted(set(np.unique(labels)) - {0})]
        return out, params


class MedFusionNetInfer(_BundleTask):
    """Classification task: the decisions, and the region of the most probable finding as a PNG."""

    def __init__(self, bundle_path: str, reports_dir: str):
        from medfusionnet.constants import LABELS

        super().__init__(
            bundle_path,
            reports_dir,
            InferType.CLASSIFICATION,
            list(LABELS),
            "MedFusionNet: 14 NIH findings, decisions, risk tier and Grad-CAM",
            {"cam_threshold": 0.5, "report": True},
        )

    def __call__(self, request):
        """``(label PNG path, result params)``."""
        from PIL import Image

        from medfusionnet.constants import LABELS

        cam_threshold = self.cam_threshold(request)
        _, prediction = self.predict(request)
        top = LABELS[int(np.argmax(prediction.probabilities))]
        positive = prediction.result["findings"]
        wanted = [*positive, top] if self.with_report(request) else [top]
        maps = self.predictor().finding_maps(prediction, list(dict.fromkeys(wanted)))
        out = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        Image.fromarray((maps[top] >= cam_threshold).astype(np.uint8)).save(out)
        maps = {finding: maps[finding] for finding in positive}
        params = self.answer(request, prediction, maps, cam_threshold)
        params["gradcam_finding"] = top
        params["gradcam_label"] = f"pixels where the Grad-CAM map reaches {cam_threshold:g} of its maximum"
        return out, params


class MedFusionNetApp(MONAILabelApp):
    """Serves ``--conf bundle_path <packaged bundle>`` (default: ``bundle`` next to this file)."""

    def __init__(self, app_dir, studies, conf):
        self.bundle_path = os.path.abspath(conf.get("bundle_path", os.path.join(app_dir, "bundle")))
        if not os.path.isdir(os.path.join(self.bundle_path, "medfusionnet")):
            raise ValueError(
                f"bundle_path {self.bundle_path} is not a packaged MedFusionNet bundle "
                "(run scripts/package_bundle.py and pass --conf bundle_path <its folder>)"
            )
        if self.bundle_path not in sys.path:  # the bundle's own copy of the code
            sys.path.insert(0, self.bundle_path)
        self.modalities = conf.get("modalities", "CR,DX")
        self.reports_dir = os.path.join(app_dir, "reports")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedFusionNet",
            description="Chest X-ray findings with decision support",
            version="0.5.0",
        )

    def init_infers(self):
        """The two infer tasks."""
        return {
            "medfusionnet_findings": MedFusionNetFindings(self.bundle_path, self.reports_dir),
            "medfusionnet": MedFusionNetInfer(self.bundle_path, self.reports_dir),
        }

    def init_remote_datastore(self):
        """A DICOMweb datastore of the X-ray series (``modalities``), kept as DICOM (no NIfTI conversion, no dcmqi
        download)."""
        from monailabel.config import settings
        from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

        client = DICOMwebClientX(
            url=self.studies,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or os.path.join(self.app_dir, "dicomweb")
        return DICOMWebDatastore(
            client=client, search_filter={"Modality": self.modalities}, cache_path=cache, convert_to_nifti=False
        )

    def infer(self, request, datastore=None):
        """`MONAILabelApp.infer` with clear answers: 404 for an image id the datastore does not hold, 422 for an
        unreadable file or a bad parameter, 502 when the DICOMweb datastore cannot be reached."""
        image = request.get("image")
        if isinstance(image, str) and image and not os.path.exists(image):
            store = datastore or self.datastore()
            try:
                uri = store.get_image_uri(image)
            except IndexError:  # MONAI Label's DICOMweb lookup of a series the PACS does not hold
                raise HTTPException(404, f"image {image!r} is not in the datastore {store.name()}") from None
            except Exception as err:  # the PACS is down or answers with an error: not the request's fault
                raise HTTPException(
                    502, f"the datastore {store.name()} could not be asked for image {image!r}: {type(err).__name__}"
                ) from None
            if not uri or not os.path.exists(uri) or (os.path.isdir(uri) and not os.listdir(uri)):
                raise HTTPException(404, f"image {image!r} is not in the datastore {store.name()}")
            request = {**request, "image_id": image}
        try:
            return super().infer(request, datastore)
        except RequestError as err:
            raise HTTPException(422, str(err)) from None
