"""The explain workflow: explanation maps of a trained model for a folder of X-rays, scored against NIH boxes.

Used by ``configs/explain.yaml``, ``scripts/explain.py`` and, through `LocalisationHandler`, ``configs/evaluate.yaml``.
Preprocessing and tabular encoding are those of inference (`transforms.xray_transforms` with the training run's
encoder and image size).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..constants import KEY_IMAGE, KEY_NAME, KEY_TABULAR, LABELS
from ..data.nih import folder_records
from ..data.tabular import TabularEncoder
from ..data.transforms import xray_transforms
from ..data.unreadable import find_unreadable
from ..distributed import is_main_process
from ..engine.run_settings import saved_setting
from ..evaluation.thresholds import load_thresholds
from ..files import write_json_atomic
from ..networks.registry import create_network
from .saliency import (
    LOCALISATION_KEYS,
    METHODS,
    NIH_BOX_FRAME,
    LocalisationMetric,
    box_labels,
    explanation_map,
    localisation_scores,
    map_similarity,
    random_map,
    read_boxes,
    rescale_box,
)

logger = logging.getLogger(__name__)


def load_trained(model_dir: str, device: str | torch.device = "cpu"):
    """``(network, encoder, image_size, thresholds)`` of a training run's output folder.

    Raises:
        FileNotFoundError: naming the missing ``model.pt`` / ``tabular_encoder.json`` / ``run_settings.json``.
        RuntimeError: naming the checkpoint when its weights do not fit the saved architecture.
    """
    ckpt = os.path.join(model_dir, "model.pt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt} not found: model_dir must be a training run's output_dir")
    network = create_network(**saved_setting(model_dir, "network_args"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(f"{ckpt}: the weights do not fit the network in run_settings.json: {err}") from None
    encoder = TabularEncoder.load(os.path.join(model_dir, "tabular_encoder.json"))
    image_size = int(saved_setting(model_dir, "image_size"))
    path = os.path.join(model_dir, "thresholds.json")
    if os.path.isfile(path):
        thresholds = load_thresholds(path, LABELS)
    else:
        logger.info("%s not found: findings are chosen at probability 0.5", path)
        thresholds = [0.5] * len(LABELS)
    return network.to(device).eval(), encoder, image_size, thresholds


def boxes_by_image(boxes_csv: str | None) -> dict:
    """``{image name: {finding: [(x, y, w, h), ...]}}`` from an NIH box list (empty when None)."""
    if not boxes_csv:
        return {}
    out: dict = {}
    for row in read_boxes(boxes_csv).itertuples(index=False):
        out.setdefault(row.name, {}).setdefault(row.finding, []).append((row.x, row.y, row.w, row.h))
    return out


def randomised_copy(network_args: dict, seed: int = 12345) -> torch.nn.Module:
    """The same architecture with freshly initialised weights (the model-randomisation sanity check)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return create_network(**network_args).eval()
    finally:
        torch.random.set_rng_state(state)


def save_overlay(
    path: str,
    image: np.ndarray,
    saliency: np.ndarray,
    title: str,
    signed: bool = False,
    boxes: Sequence[Sequence[float]] = (),
) -> None:
    """PNG of ``saliency`` over the X-ray (jet: blue low, red high; ``signed`` maps such as LRP in blue-white-red,
    red = evidence for the finding), with boxes ``(x0, y0, x1, y1)`` in green."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if signed:  # pixel relevance is sparse: scale to the 99.5th percentile so that more than a few pixels show
        bound = float(np.percentile(np.abs(saliency), 99.5)) or float(np.abs(saliency).max()) or 1.0
        ax.imshow(saliency, cmap="bwr", vmin=-bound, vmax=bound, alpha=0.6)
    else:
        ax.imshow(saliency, cmap="jet", vmin=0, vmax=1, alpha=0.4)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=1.5))
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _methods(methods: Sequence[str], layers: Sequence[str]) -> list[tuple[str, str]]:
    """``(method, layer)`` pairs: Grad-CAM variants once per layer, LRP once (its layer is ``input``)."""
    pairs = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method '{method}' is not supported; use one of {METHODS}")
        pairs += [("lrp", "input")] if method == "lrp" else [(method, layer) for layer in layers]
    return pairs


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def explain_images(
    model_dir: str,
    input_dir: str,
    explain_dir: str,
    tabular_csv: str | None = None,
    findings: Sequence[str] | None = None,
    methods: Sequence[str] = ("gradcam", "lrp"),
    cam_layers: Sequence[str] = ("cnn",),
    boxes_csv: str | None = None,
    box_frame: int = NIH_BOX_FRAME,
    map_threshold: float = 0.5,
    random_maps: int = 20,
    sanity_check: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """Explain every image under ``input_dir`` (a folder, or one file) with a trained model; returns the summary.

    Findings explained per image: ``findings`` when given; otherwise those at or above their saved threshold (the
    most probable one when none is), plus every finding that has a box for that image. Writes under
    ``explain_dir``: ``maps/<image>_<finding>_<method>[_<layer>].npy`` (float32 map at the model's input size),
    ``overlays/... .png``, ``explanations.csv`` (one row per map) and ``summary.json``. With ``boxes_csv`` (NIH
    format; coordinates in a ``box_frame`` px square frame) also ``localisation.csv``: `saliency.LOCALISATION_KEYS`
    per map and for ``random_maps`` smoothed random maps. With ``sanity_check`` each map is compared with the same method
    on a re-initialised network (Spearman rank correlation; near 1 would mean the map ignores the weights).
    """
    network, encoder, image_size, thresholds = load_trained(model_dir, device)
    pairs = _methods(methods, cam_layers)
    unknown = [f for f in findings or () if f not in LABELS]
    if unknown:
        raise ValueError(f"finding(s) {unknown} are not among the 14 labels {list(LABELS)}")
    boxes = boxes_by_image(boxes_csv)
    if os.path.isdir(input_dir):
        records = folder_records(input_dir, tabular_csv)
    elif os.path.isfile(input_dir):
        records = [{KEY_IMAGE: input_dir, KEY_NAME: os.path.basename(input_dir)}]
    else:
        raise FileNotFoundError(f"input_dir '{input_dir}' is neither a folder nor a file")
    transform = xray_transforms(encoder, image_size, with_label=False)
    random_net = randomised_copy(saved_setting(model_dir, "network_args")).to(device) if sanity_check else None
    for sub in ("maps", "overlays"):
        os.makedirs(os.path.join(explain_dir, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, loc_rows, skipped = [], [], []
    for record in records:
        name = str(record[KEY_NAME])
        try:
            item = transform(dict(record))
        except Exception as err:  # MONAI wraps the reader's error; only unreadable images are skipped
            cause = find_unreadable(err)
            if cause is None:
                raise
            logger.warning("skipping unreadable image: %s", cause)
            skipped.append(name)
            continue
        image = torch.as_tensor(item[KEY_IMAGE])[None].to(device)
        tabular = torch.as_tensor(item[KEY_TABULAR])[None].to(device)
        with torch.no_grad():
            probs = torch.sigmoid(network(image, tabular))[0].cpu().numpy()
        image_boxes = boxes.get(os.path.basename(name), {})
        if findings:
            chosen = list(findings)
        else:
            chosen = [label for label, p, t in zip(LABELS, probs, thresholds) if p >= t]
            chosen = chosen or [LABELS[int(np.argmax(probs))]]
        chosen = list(dict.fromkeys(chosen + list(image_boxes)))
        for finding in chosen:
            c = LABELS.index(finding)
            truth = (
                box_labels(image_boxes[finding], (box_frame, box_frame), image_size) if finding in image_boxes else None
            )
            drawn = [rescale_box(b, (box_frame, box_frame), image_size) for b in image_boxes.get(finding, [])]
            for method, layer in pairs:
                saliency = explanation_map(network, method, image, c, tabular, layer)[0, 0].cpu().numpy()
                tag = method if method == "lrp" else f"{method}_{layer}"
                stem = _safe(f"{os.path.splitext(name)[0]}_{finding}_{tag}")
                np.save(os.path.join(explain_dir, "maps", stem + ".npy"), saliency.astype(np.float32))
                save_overlay(
                    os.path.join(explain_dir, "overlays", stem + ".png"),
                    image[0, 0].cpu().numpy(),
                    saliency,
                    f"{name}\n{finding} p={probs[c]:.3f} ({method}" + ("" if method == "lrp" else f", {layer}") + ")",
                    signed=method == "lrp",
                    boxes=drawn,
                )
                row = {
                    "name": name,
                    "finding": finding,
                    "probability": float(probs[c]),
                    "method": method,
                    "layer": layer,
                    "map": f"maps/{stem}.npy",
                    "overlay": f"overlays/{stem}.png",
                    "constant_map": bool(np.ptp(saliency) == 0),
                }
                if random_net is not None:
                    randomised = explanation_map(random_net, method, image, c, tabular, layer)
                    row["randomised_spearman"] = map_similarity(saliency, randomised[0, 0].cpu().numpy())
                rows.append(row)
                if truth is not None:
                    loc_rows.append(
                        {
                            "name": name,
                            "finding": finding,
                            "method": method,
                            "layer": layer,
                            **localisation_scores(saliency, truth, map_threshold),
                        }
                    )
            if truth is not None:
                for k in range(random_maps):
                    noise = random_map(truth.shape, rng, sigma=image_size / 32)
                    loc_rows.append(
                        {
                            "name": name,
                            "finding": finding,
                            "method": "random",
                            "layer": f"seed{k}",
                            **localisation_scores(noise, truth, map_threshold),
                        }
                    )
    summary = _summarise(rows, loc_rows, skipped, model_dir, map_threshold)
    _write_csv(os.path.join(explain_dir, "explanations.csv"), rows)
    if loc_rows:
        _write_csv(os.path.join(explain_dir, "localisation.csv"), loc_rows)
    write_json_atomic(os.path.join(explain_dir, "summary.json"), summary)
    logger.info(
        "explained %d image(s) (%d map(s), %d skipped) into %s",
        len(records) - len(skipped),
        len(rows),
        len(skipped),
        explain_dir,
    )
    return summary


def _summarise(rows: list, loc_rows: list, skipped: list, model_dir: str, map_threshold: float) -> dict:
    summary: dict = {
        "model_dir": os.path.abspath(model_dir),
        "maps": len(rows),
        "skipped": skipped,
        "map_threshold": map_threshold,
        "constant_maps": sum(r["constant_map"] for r in rows),
    }
    methods = sorted({(r["method"], r["layer"]) for r in rows})
    if rows and "randomised_spearman" in rows[0]:
        summary["randomisation_check"] = {
            f"{m}:{lay}": float(
                np.mean([r["randomised_spearman"] for r in rows if (r["method"], r["layer"]) == (m, lay)])
            )
            for m, lay in methods
        }
    if loc_rows:
        groups: dict = {}
        for r in loc_rows:
            key = "random" if r["method"] == "random" else f"{r['method']}:{r['layer']}"
            groups.setdefault(key, []).append(r)
        summary["localisation"] = {
            key: {"maps": len(g), **{k: float(np.mean([r[k] for r in g])) for k in LOCALISATION_KEYS}}
            for key, g in groups.items()
        }
    return summary


def _write_csv(path: str, rows: list) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


class LocalisationHandler:
    """Ignite handler for an evaluator: for every evaluated image that has boxes, the explanation map of each boxed
    finding is scored with `saliency.LocalisationMetric` (and a random-map baseline); at epoch end the means go to
    ``engine.state.metrics`` (``localisation_<key>``, ``random_<key>``) and ``<output_dir>/localisation.json``.

    The images must be preprocessed as in training (boxes are rescaled from a ``box_frame`` px square frame to
    ``image_size``).
    """

    def __init__(
        self,
        boxes_csv: str,
        output_dir: str,
        image_size: int,
        method: str = "gradcam",
        layer: str = "cnn",
        map_threshold: float = 0.5,
        box_frame: int = NIH_BOX_FRAME,
        random_maps: int = 20,
        seed: int = 0,
    ):
        self.boxes = boxes_by_image(boxes_csv)
        self.output_dir = output_dir
        self.image_size = int(image_size)
        self.method, self.layer = method, layer
        self.box_frame = box_frame
        self.random_maps = random_maps
        self.seed = seed
        self.metric = LocalisationMetric(map_threshold)
        self.random_metric = LocalisationMetric(map_threshold)

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start, iteration end and epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.metric.reset()
        self.random_metric.reset()
        self.rng = np.random.default_rng(self.seed)

    def _score(self, engine: Engine) -> None:
        network = engine.network
        for item in engine.state.batch:
            image_boxes = self.boxes.get(os.path.basename(str(item[KEY_NAME])), {})
            if not image_boxes:
                continue
            image = torch.as_tensor(item[KEY_IMAGE])[None].to(engine.state.device)
            tabular = torch.as_tensor(item[KEY_TABULAR])[None].to(engine.state.device)
            for finding, boxes in image_boxes.items():
                truth = box_labels(boxes, (self.box_frame, self.box_frame), self.image_size)
                truth_t = torch.from_numpy(truth)[None, None]
                saliency = explanation_map(
                    network, self.method, image.float(), LABELS.index(finding), tabular.float(), self.layer
                )
                self.metric(y_pred=saliency.cpu(), y=truth_t)
                for _ in range(self.random_maps):
                    noise = random_map(truth.shape, self.rng, sigma=self.image_size / 32)
                    self.random_metric(y_pred=torch.from_numpy(noise)[None, None], y=truth_t)

    def _report(self, engine: Engine) -> None:
        scores, random = self.metric.aggregate(), self.random_metric.aggregate()
        for key, value in scores.items():
            engine.state.metrics[f"localisation_{key}"] = value
        for key, value in random.items():
            engine.state.metrics[f"random_{key}"] = value
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            report = {
                "method": self.method,
                "layer": self.layer,
                "map_threshold": self.metric.threshold,
                "scores": scores,
                "random_baseline": random,
            }
            write_json_atomic(os.path.join(self.output_dir, "localisation.json"), report)
            logger.info(
                "localisation (%s, %s) over %d map(s): pointing game %.3f (random %.3f)",
                self.method,
                self.layer,
                scores.get("count", 0),
                scores.get("pointing_hit", float("nan")),
                random.get("pointing_hit", float("nan")),
            )
