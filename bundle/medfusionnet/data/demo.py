"""A small synthetic dataset in NIH's format, so the bundle trains out of the box on an offline machine.

The images are NOT chest X-rays: a smooth "thorax" with two dark "lungs", plus for each finding a faint blob with a
finding-specific place and size. Prevalences are imbalanced as in ChestX-ray14, and age and view position carry
signal for some findings, so both the image and the tabular input are worth learning from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np

from ..constants import (
    COL_AGE,
    COL_FINDINGS,
    COL_FOLLOW_UP,
    COL_IMAGE,
    COL_PATIENT,
    COL_SEX,
    COL_VIEW,
    LABELS,
    NO_FINDING,
)
from ..files import to_json

logger = logging.getLogger(__name__)

# Rough ChestX-ray14 ordering of prevalence, scaled up so that a few hundred images hold every finding.
_PREVALENCE = np.array([0.18, 0.08, 0.2, 0.28, 0.1, 0.1, 0.05, 0.08, 0.08, 0.05, 0.05, 0.05, 0.06, 0.03])
_AGE_LINKED = {LABELS.index("Cardiomegaly"), LABELS.index("Emphysema"), LABELS.index("Hernia")}
_AP_LINKED = {LABELS.index("Effusion"), LABELS.index("Edema"), LABELS.index("Consolidation")}


def _blob_layout(num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Per finding: centre (y, x) in [0.15, 0.85], width and signed contrast."""
    centres = rng.uniform(0.15, 0.85, size=(num_labels, 2))
    widths = rng.uniform(0.05, 0.12, size=(num_labels, 1))
    contrast = rng.choice([-1.0, 1.0], size=(num_labels, 1)) * rng.uniform(0.12, 0.22, size=(num_labels, 1))
    return np.hstack([centres, widths, contrast])


def _render(labels: np.ndarray, layout: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    image = 0.75 - 0.25 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    for cx in (0.3, 0.7):  # two dark lung fields
        image -= 0.35 * np.exp(-(((yy - 0.5) / 0.3) ** 2 + ((xx - cx) / 0.15) ** 2))
    for k in np.flatnonzero(labels):
        cy, cx, width, contrast = layout[k] + rng.normal(0, 0.02, size=4) * np.array([1, 1, 0.1, 0.1])
        image += contrast * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)))
    image += rng.normal(0, 0.03, size=image.shape)
    return np.clip(image, 0, 1)


# The default generator seed is one whose set, split patient-wise with training seeds 0-2, has positives of every
# finding in each split, so the demo run scores all 14 (a few hundred images hold only a handful of the rarest)
DEMO_SEED = 5


def make_demo_dataset(root: str, num_patients: int = 160, image_size: int = 96, seed: int = DEMO_SEED) -> str:
    """Write the demo set (``images/*.png`` and ``Data_Entry_2017.csv``) into ``root`` unless it is already there.

    Deterministic for given arguments; generation goes to a temporary folder that is renamed into place, so
    concurrent processes (e.g. DDP ranks) never see a half-written set. Returns ``root``.
    """
    import pandas as pd
    from PIL import Image

    params = {"num_patients": num_patients, "image_size": image_size, "seed": seed, "version": 1}
    marker = os.path.join(root, "demo.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
    logger.info("generating the synthetic demo dataset in %s", root)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    os.makedirs(os.path.join(tmp, "images"))
    rng = np.random.default_rng(seed)
    layout = _blob_layout(len(LABELS), rng)
    rows = []
    for patient in range(1, num_patients + 1):
        age = int(rng.integers(18, 90))
        sex = "M" if rng.random() < 0.55 else "F"
        for follow_up in range(int(rng.integers(1, 6))):
            view = "AP" if rng.random() < 0.3 else "PA"
            p = _PREVALENCE.copy()
            p[list(_AGE_LINKED)] *= 0.4 + 1.6 * (age - 18) / 72
            if view == "AP":
                p[list(_AP_LINKED)] *= 2.5
            labels = (rng.random(len(LABELS)) < np.clip(p, 0, 0.9)).astype(np.float32)
            name = f"{patient:08d}_{follow_up:03d}.png"
            pixels = (_render(labels, layout, image_size, rng) * 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(os.path.join(tmp, "images", name))
            findings = "|".join(LABELS[k] for k in np.flatnonzero(labels)) or NO_FINDING
            rows.append(
                {
                    COL_IMAGE: name,
                    COL_FINDINGS: findings,
                    COL_FOLLOW_UP: follow_up,
                    COL_PATIENT: patient,
                    COL_AGE: age,
                    COL_SEX: sex,
                    COL_VIEW: view,
                }
            )
    pd.DataFrame(rows).to_csv(os.path.join(tmp, "Data_Entry_2017.csv"), index=False)
    with open(os.path.join(tmp, "demo.json"), "w") as f:
        f.write(to_json(params))
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return root
    if os.path.isdir(root):
        shutil.rmtree(root)  # a set made with other parameters
    try:
        os.rename(tmp, root)
    except OSError:  # another process renamed its copy into place in between
        shutil.rmtree(tmp, ignore_errors=True)
    return root
