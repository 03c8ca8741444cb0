"""Explanation maps for the bundle's networks and localisation metrics against NIH's expert boxes.

- `gradcam`: MONAI's `GradCAM` / `GradCAMpp` on a named layer (`CAM_LAYERS`: the last CNN stage, the last C2T
  projection, the last T2C update of MedFusionNet; the last feature map of the DenseNet baseline).
- `LayerwiseRelevance`: layer-wise relevance propagation (LRP) with the z+ rule on the DenseNet convolutions and the
  epsilon rule on every other linear layer.
- `read_boxes`, `rescale_box`, `box_labels`: NIH ``BBox_List_2017.csv`` boxes in the model's input frame.
- `localisation_scores` and `LocalisationMetric`: adapted Rand error / precision / recall, false splits and merges
  (scikit-image), IoU, intersection over the detected area (NIH's IoBB) and the pointing game.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.metrics import CumulativeIterationMetric
from monai.visualize import GradCAM, GradCAMpp
from scipy.ndimage import gaussian_filter
from skimage.measure import label as connected_components
from skimage.metrics import adapted_rand_error, variation_of_information

from ..constants import LABELS

logger = logging.getLogger(__name__)

# Layer names per explanation target; `cam_layers` keeps those a given network has.
CAM_LAYERS: dict[str, tuple[str, ...]] = {
    "cnn": ("stages.3.cnn", "features"),  # MedFusionNet's last DenseNet stage; the baseline's feature extractor
    "c2t": ("stages.3.c2t.conv",),  # the 1x1 projection of the last C2T module, on the token grid
    "t2c": ("stages.2.t2c",),  # the last T2C update added to the CNN map (stride 16)
}
METHODS: tuple[str, ...] = ("gradcam", "gradcampp", "lrp")
# NIH spells one finding differently in the box list.
BOX_FINDING_NAMES = {"Infiltrate": "Infiltration"}
NIH_BOX_FRAME = 1024  # NIH box coordinates are pixels of the 1024 x 1024 PNGs
LOCALISATION_KEYS: tuple[str, ...] = (
    "adapted_rand_error",
    "rand_precision",
    "rand_recall",
    "false_splits",
    "false_merges",
    "iou",
    "iobb",
    "pointing_hit",
)


# --------------------------------------------------------------------------------------------------------- maps


def cam_layers(model: nn.Module) -> dict[str, str]:
    """``{target: layer name}`` for the `CAM_LAYERS` targets that ``model`` has."""
    names = {name for name, _ in model.named_modules()}
    found = {}
    for target, candidates in CAM_LAYERS.items():
        for name in candidates:
            if name in names:
                found[target] = name
                break
    return found


def gradcam(
    model: nn.Module,
    image: torch.Tensor,
    class_idx: int,
    tabular: torch.Tensor | None = None,
    layer: str = "cnn",
    plus: bool = False,
) -> torch.Tensor:
    """Grad-CAM (or Grad-CAM++ with ``plus``) of finding ``class_idx``: ``(B, 1, H, W)`` in [0, 1] at input size.

    ``layer`` is a `CAM_LAYERS` target (``cnn``, ``c2t``, ``t2c``) or a module name of ``model``.
    """
    layers = cam_layers(model)
    name = layers.get(layer, layer)
    if name not in {n for n, _ in model.named_modules()}:
        raise ValueError(f"layer '{layer}' is not in this network; its explanation targets are {sorted(layers)}")
    cams = model.__dict__.setdefault("_explain_cams", {})  # MONAI's CAMs add hooks that are never removed: reuse
    if (name, plus) not in cams:
        # MONAI's default post-processing maps the maximum to 0; here 1 stays the strongest evidence
        cams[(name, plus)] = (GradCAMpp if plus else GradCAM)(
            nn_module=model, target_layers=name, postprocessing=_min_max
        )
    cam = cams[(name, plus)]
    maps = []
    with torch.enable_grad():
        # one image at a time: MONAI's Grad-CAM++ broadcasts the class score against the map's last axis
        for i in range(image.shape[0]):
            row = None if tabular is None else tabular[i : i + 1]
            # an input that requires grad, so the backward hooks of the first layers see a gradient too
            one = image[i : i + 1].detach().clone().requires_grad_(True)
            maps.append(cam(one, class_idx=int(class_idx), tabular=row).detach())
    return torch.cat(maps)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-map scaling of ``(B, 1, ...)`` maps to [0, 1] (all zeros for a constant map)."""
    flat = x.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x - low.view(shape)) / span.view(shape)


class LayerwiseRelevance:
    """Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) for the bundle's networks.

    Rules: z+ on the convolutions of the DenseNet stem and stages (their inputs are image intensities in [0, 1] or
    outputs of a ReLU, as the rule assumes); epsilon on every other convolution and linear layer; BatchNorm as an
    element-wise affine layer under the epsilon rule. DenseNet normalises *before* each convolution (BN -> ReLU ->
    conv, on the concatenation of all earlier maps), so the usual canonisation, folding BN into the preceding
    convolution, is not possible there; treating BN as its own affine layer keeps the propagation exact, with the
    BN shift absorbing its share of relevance. The rules are applied by the gradient trick: each rule layer's output
    is replaced by ``z * (y / z).detach()`` (``z`` the rule's modified pre-activation), so the input gradient times
    the input is the relevance, and concatenations and additions (dense and T2C connections) pass it on unchanged.

    Left out: the transformer and fusion parts (LayerNorm, softmax attention, GELU and sigmoid gates) pass plain
    gradients, without the AttnLRP rules, so relevance is conserved exactly only through the CNN path. This is
    hand-written because captum's LRP rejects DenseNet's reused tensors and zennit needs torchvision, which has no
    build for this CPU torch.
    """

    def __init__(self, model: nn.Module, epsilon: float = 1e-6):
        self.model = model
        self.epsilon = epsilon
        cnn_prefixes = ("stem.", "features.") + tuple(f"stages.{i}.cnn." for i in range(4))
        self.zplus = {
            m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name.startswith(cnn_prefixes)
        }

    def _hook(self, module: nn.Module, inputs, output):
        if module in self.zplus:  # z+: only the positive weights, no bias
            z = module._conv_forward(inputs[0], module.weight.clamp(min=0), None)
        else:  # epsilon: the layer's own pre-activation (for BatchNorm, y = a x + b)
            z = output
        z = z + self.epsilon * torch.where(z >= 0, 1.0, -1.0)
        return z * (output / z).detach()

    def __call__(self, image: torch.Tensor, class_idx: int, tabular: torch.Tensor | None = None) -> torch.Tensor:
        """Relevance ``(B, 1, H, W)`` of each input pixel for the logit of ``class_idx`` (the sum approximates the
        logit through the CNN path; positive = evidence for the finding)."""
        was_training = self.model.training
        self.model.eval()
        handles = [
            m.register_forward_hook(self._hook)
            for m in self.model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
        ]
        try:
            with torch.enable_grad():
                x = image.detach().clone().requires_grad_(True)
                logits = self.model(x, tabular)
                (grad,) = torch.autograd.grad(logits[:, int(class_idx)].sum(), x)
            return (x * grad).detach()
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)


def explanation_map(
    model: nn.Module,
    method: str,
    image: torch.Tensor,
    class_idx: int,
    tabular: torch.Tensor | None = None,
    layer: str = "cnn",
) -> torch.Tensor:
    """``(B, 1, H, W)`` map of ``method`` (`METHODS`): Grad-CAM maps in [0, 1], LRP relevance unnormalised."""
    if method not in METHODS:
        raise ValueError(f"method '{method}' is not supported; use one of {METHODS}")
    if method == "lrp":
        return LayerwiseRelevance(model)(image, class_idx, tabular)
    return gradcam(model, image, class_idx, tabular, layer, plus=method == "gradcampp")


def normalize_map(saliency: np.ndarray) -> np.ndarray:
    """The positive part of a map divided by its maximum (all zeros when nothing is positive)."""
    positive = np.clip(np.asarray(saliency, dtype=np.float64), 0, None)
    peak = positive.max() if positive.size else 0.0
    return positive / peak if peak > 0 else positive


def random_map(shape: Sequence[int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smoothed uniform noise in [0, 1]: a random baseline with blobs about as large as Grad-CAM's (``sigma`` px)."""
    noise = gaussian_filter(rng.random(tuple(shape)), sigma=sigma, mode="reflect")
    noise -= noise.min()
    return noise / noise.max() if noise.max() > 0 else noise


# -------------------------------------------------------------------------------------------------------- boxes


def read_boxes(path) -> pd.DataFrame:
    """NIH box list (``Image Index, Finding Label, Bbox [x,y,w,h]`` and three unnamed columns) as a frame with
    columns ``name, finding, x, y, w, h``; ``Infiltrate`` becomes ``Infiltration``.

    Raises:
        ValueError: naming the file and line for a row with fewer than 6 fields, a non-numeric coordinate, a
            non-positive width or height, or a finding not among the 14 labels.
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if frame.shape[1] < 6:
        raise ValueError(
            f"{path}: expected 6 columns (Image Index, Finding Label, x, y, w, h); found " f"{list(frame.columns)}"
        )
    frame = frame.iloc[:, :6]
    frame.columns = ["name", "finding", "x", "y", "w", "h"]
    frame["name"] = frame["name"].str.strip()
    frame["finding"] = frame["finding"].str.strip().replace(BOX_FINDING_NAMES)
    for column in ("x", "y", "w", "h"):
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64)) | (values <= 0 if column in "wh" else values < 0)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(
                f"{path}: line {i + 2} ('{frame['name'].iloc[i]}'): box {column} = "
                f"'{frame[column].iloc[i]}' is not a valid coordinate"
            )
        frame[column] = values.astype(np.float64)
    unknown = ~frame["finding"].isin(LABELS)
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise ValueError(f"{path}: line {i + 2}: finding '{frame['finding'].iloc[i]}' is not one of {list(LABELS)}")
    return frame


def rescale_box(box: Sequence[float], frame_size: Sequence[int], image_size: int) -> tuple[float, ...]:
    """``(x0, y0, x1, y1)`` in model-input pixels of a box ``(x, y, w, h)`` given in a ``frame_size = (width,
    height)`` image, for the bundle's preprocessing: longest side resized to ``image_size``, then centred padding
    (MONAI's symmetric `ResizeWithPadOrCrop`) to a square."""
    width, height = frame_size
    scale = image_size / max(width, height)
    new_w, new_h = int(round(width * scale)), int(round(height * scale))
    pad_x, pad_y = (image_size - new_w) // 2, (image_size - new_h) // 2
    x, y, w, h = box
    sx, sy = new_w / width, new_h / height
    return (x * sx + pad_x, y * sy + pad_y, (x + w) * sx + pad_x, (y + h) * sy + pad_y)


def box_labels(boxes: Sequence[Sequence[float]], frame_size: Sequence[int], image_size: int) -> np.ndarray:
    """``(image_size, image_size)`` int map: 0 background, ``k + 1`` for pixels whose centre lies in box ``k``
    (a later box wins where boxes overlap)."""
    centres = np.arange(image_size) + 0.5
    out = np.zeros((image_size, image_size), dtype=np.int64)
    for k, box in enumerate(boxes):
        x0, y0, x1, y1 = rescale_box(box, frame_size, image_size)
        rows = (centres >= y0) & (centres < y1)
        cols = (centres >= x0) & (centres < x1)
        out[np.ix_(rows, cols)] = k + 1
    return out


# ------------------------------------------------------------------------------------------------------ metrics


def localisation_scores(saliency: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict:
    """Scores of one map against labelled boxes ``truth`` (0 background, one label per box), `LOCALISATION_KEYS`.

    The map, normalised by `normalize_map`, is thresholded at ``threshold`` into a mask whose connected components
    (8-connectivity) are the predicted regions. Background counts as a region on both sides, so adapted Rand error
    is 0 only for identical partitions. ``false_splits`` is H(predicted | boxes), ``false_merges`` H(boxes |
    predicted) (scikit-image's variation of information, in bits). ``iobb`` is the mask's area inside a
    box over the mask's area (NIH's IoBB; 0 for an empty mask); ``pointing_hit`` is 1 when the map's maximum lies
    in a box.
    """
    m = normalize_map(saliency)
    truth = np.asarray(truth).astype(np.int64)
    if m.shape != truth.shape:
        raise ValueError(f"map shape {m.shape} and box map shape {truth.shape} differ")
    mask = m >= threshold if m.max() > 0 else np.zeros_like(m, dtype=bool)
    predicted = connected_components(mask, connectivity=2)
    error, precision, recall = adapted_rand_error(truth, predicted, ignore_labels=())
    splits, merges = variation_of_information(truth, predicted)
    inside = truth > 0
    overlap = float((mask & inside).sum())
    union = float((mask | inside).sum())
    peak = map_peak(m)
    return {
        "adapted_rand_error": float(error),
        "rand_precision": float(precision),
        "rand_recall": float(recall),
        "false_splits": float(splits),
        "false_merges": float(merges),
        "iou": overlap / union if union else 0.0,
        "iobb": overlap / float(mask.sum()) if mask.any() else 0.0,
        "pointing_hit": float(inside[peak]) if m.max() > 0 else 0.0,
    }


def map_peak(saliency: np.ndarray) -> tuple[int, int]:
    """``(row, col)`` of a map's maximum. Upsampled coarse maps (Grad-CAM of a 7 x 7 stage) have flat maxima; the
    peak is then the maximal pixel nearest the centroid of all maximal pixels, not the first one in raster order
    (which would always sit at the plateau's top-left corner)."""
    m = np.asarray(saliency, dtype=np.float64)
    rows, cols = np.nonzero(m >= m.max() - 1e-6 * max(abs(m.max()), 1e-12))
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])


class LocalisationMetric(CumulativeIterationMetric):
    """MONAI metric: `localisation_scores` of maps ``y_pred`` ``(B, 1, H, W)`` against box label maps ``y``
    ``(B, 1, H, W)``; `aggregate` returns the mean of each `LOCALISATION_KEYS` entry and the count."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("LocalisationMetric needs the box label maps as y")
        rows = []
        for pred, truth in zip(y_pred, y):
            scores = localisation_scores(pred[0].detach().float().cpu().numpy(), truth[0].cpu().numpy(), self.threshold)
            rows.append([scores[k] for k in LOCALISATION_KEYS])
        return torch.tensor(rows, dtype=torch.float64)

    def aggregate(self) -> dict:
        """``{key: mean over the buffered maps}`` plus ``count``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return {"count": 0}
        return {"count": int(data.shape[0]), **{k: float(v) for k, v in zip(LOCALISATION_KEYS, data.mean(0))}}


def map_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (the model-randomisation check of Adebayo et al. 2018)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)
