"""MONAI transforms and datasets for chest X-rays with tabular patient data.

Pipelines: `LoadXrayd` (any supported file to a ``(1, H, W)`` image in [0, 1]) -> `AssessRiskd` (inference with a
risk model only: the patient's tabular risk) -> `EncodeTabulard` (raw fields to the ``tabular`` vector) -> resize
of the longest side and padding to a square -> augmentation (training only) -> float32 tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    Resized,
    ResizeWithPadOrCropd,
    Transform,
)

from ..constants import (
    KEY_CLINICAL,
    KEY_IMAGE,
    KEY_LABEL,
    KEY_NAME,
    KEY_PATIENT,
    KEY_RISK,
    KEY_TABULAR,
    RAW_TABULAR_KEYS,
)
from .image_reader import read_xray
from .tabular import TabularEncoder, is_missing
from .unreadable import find_unreadable, placeholder

logger = logging.getLogger(__name__)


class LoadXrayd(MapTransform):
    """Replace each file path under ``keys`` by a ``(1, H, W)`` float32 `MetaTensor` in [0, 1] (`image_reader.read_xray`).

    An array or tensor already in memory (``(H, W)`` or ``(1, H, W)``, in [0, 1]) is passed through as the image.

    Tabular fields found in a DICOM header (age, sex, view) fill the item's raw fields where those are missing.
    Raises `unreadable.UnreadableImageError` for a file that cannot be decoded.
    """

    def __init__(self, keys: KeysCollection = KEY_IMAGE, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (np.ndarray, torch.Tensor)):  # an image already in memory, (H, W) or (1, H, W)
                array = torch.as_tensor(value, dtype=torch.float32)
                d[key] = MetaTensor(array if array.ndim == 3 else array[None])
                continue
            path = str(value)
            xray = read_xray(path)
            d[key] = MetaTensor(torch.from_numpy(xray.array[None]), meta={"filename_or_obj": path})
            for field, value in xray.header.items():
                if is_missing(d.get(field)):
                    d[field] = value
        return d


class AssessRiskd(Transform):
    """The patient's tabular risk (``assessor.assess``, e.g. `risk.assessment.PatientRiskAssessor`) from the item's
    raw fields, stored under ``risk`` as JSON text (text collates into a batch whatever the assessment holds)."""

    def __init__(self, assessor, output_key: str = KEY_RISK):
        self.assessor = assessor
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.output_key] = json.dumps(self.assessor.assess(d, where=f"image '{d.get(KEY_NAME)}'"))
        return d


class EncodeTabulard(Transform):
    """Encode the declared raw fields (NIH's age, sex, view, follow-up by default) into ``tabular`` with a fitted
    `TabularEncoder`.

    The raw fields, the ``clinical`` columns and the patient id are removed afterwards: they may be missing (None) in
    some items, which the batch collation cannot stack.
    """

    def __init__(self, encoder: TabularEncoder, output_key: str = KEY_TABULAR):
        self.encoder = encoder
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d[self.output_key] = torch.from_numpy(self.encoder.encode(d))
        for key in (*RAW_TABULAR_KEYS, *(f.name for f in self.encoder.fields), KEY_PATIENT, KEY_CLINICAL):
            d.pop(key, None)
        return d


def xray_transforms(
    encoder: TabularEncoder, image_size: int, train: bool = False, with_label: bool = True, risk=None
) -> Compose:
    """The preprocessing of one workflow: load, assess the tabular risk (with a ``risk`` assessor), encode tabular,
    resize/pad to ``image_size``, augment if ``train``.

    Augmentation is a mild random affine (rotation up to 10 degrees, scaling 0.9-1.1, shifts up to 5%), applied
    with probability 0.5; no flips, since left and right carry anatomical meaning in chest X-rays.
    """
    if int(image_size) < 32:
        raise ValueError(f"image_size={image_size} is too small; use 32 or more")
    keys = [KEY_IMAGE, KEY_TABULAR] + ([KEY_LABEL] if with_label else [])
    steps = [
        LoadXrayd(KEY_IMAGE),
        *([AssessRiskd(risk)] if risk is not None else []),
        EncodeTabulard(encoder),
        Resized(KEY_IMAGE, spatial_size=int(image_size), size_mode="longest", mode="area"),
        ResizeWithPadOrCropd(KEY_IMAGE, spatial_size=(int(image_size), int(image_size))),
    ]
    if train:
        steps.append(
            RandAffined(
                KEY_IMAGE,
                prob=0.5,
                rotate_range=np.deg2rad(10),
                scale_range=0.1,
                translate_range=0.05 * image_size,
                padding_mode="zeros",
            )
        )
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return Compose(steps)


class XrayDataset(torch.utils.data.Dataset):
    """A MONAI dataset (plain, ``memory`` or ``disk`` cache) that turns unreadable images into logged skips.

    An item whose file cannot be decoded is logged with its path and replaced by `unreadable.placeholder`, which
    the loader's collation drops (`data.unreadable` describes the whole path). Any other error propagates
    unchanged.

    Args:
        data: datalist items.
        transform: the item transform (`xray_transforms`).
        cache: None, ``"memory"`` (`monai.data.CacheDataset` filled at run time) or ``"disk"``
            (`monai.data.PersistentDataset` under ``cache_dir``); the deterministic steps are cached.
        cache_dir: folder for the disk cache.
    """

    def __init__(self, data: Sequence[dict], transform, cache: str | None = None, cache_dir: str | None = None):
        from monai.data import CacheDataset, Dataset, PersistentDataset

        self.data = list(data)
        self.transform = transform
        if cache in (None, "", "none"):
            self.inner = Dataset(self.data, transform)
        elif cache == "memory":
            self.inner = CacheDataset(self.data, transform, runtime_cache=True, progress=False)
        elif cache == "disk":
            if not cache_dir:
                raise ValueError("cache='disk' needs a cache_dir")
            self.inner = PersistentDataset(self.data, transform, cache_dir=cache_dir)
        else:
            raise ValueError(f"cache='{cache}' is not supported; use none, memory or disk")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        try:
            return self.inner[index]
        except Exception as e:
            cause = find_unreadable(e)
            if cause is None:
                raise
            logger.warning("skipping unreadable image: %s", cause)
            return placeholder(self.data[index], self.transform, cause)
