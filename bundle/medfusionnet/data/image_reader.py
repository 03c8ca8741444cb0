"""Reading chest X-rays from PNG/JPEG, DICOM and NIfTI into one convention.

Every reader returns a 2-D ``float32`` array ``(H, W)`` with values in ``[0, 1]`` (0 = black), which is the input
convention stated in ``metadata.json``:

- PNG/JPEG: divided by the maximum of the stored bit depth (255 for 8-bit, 65535 for 16-bit). RGB/RGBA files whose
  colour channels are identical (a known quirk of some NIH PNGs) are read as their first channel; other colour images
  are converted to luminance.
- DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or window from the header, then min-max scaling
  to ``[0, 1]``; MONOCHROME1 images are inverted so that bone is bright as in MONOCHROME2.
- NIfTI: a 2-D image (or a 3-D one with a single slice), min-max scaled; a volume with several slices is refused.

MONAI's stock readers keep raw intensities and do not apply the VOI LUT or the MONOCHROME1 inversion, hence these
small readers; ``transforms.LoadXrayd`` wraps them as a MONAI transform.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .tabular import parse_age, parse_view
from .unreadable import UnreadableImageError

logger = logging.getLogger(__name__)

PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = PNG_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES


@dataclass
class XrayImage:
    """A decoded X-ray: ``array`` is float32 ``(H, W)`` in ``[0, 1]``; ``header`` holds tabular fields found in the
    file (``age``, ``sex``, ``view`` from a DICOM header; empty for other formats)."""

    array: np.ndarray
    header: dict = field(default_factory=dict)


def is_supported(path: str) -> bool:
    """Whether ``path`` has a suffix this module can read."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


def read_xray(path: str) -> XrayImage:
    """Read a PNG/JPEG, DICOM or NIfTI chest X-ray (see the module docstring for the conventions).

    Raises:
        UnreadableImageError: when the file is missing, empty, truncated, not an image, or not 2-D.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UnreadableImageError(path, "file does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableImageError(path, "file is empty (0 bytes)")
    lower = path.lower()
    try:
        if lower.endswith(DICOM_SUFFIXES):
            image = _read_dicom(path)
        elif lower.endswith(NIFTI_SUFFIXES):
            image = _read_nifti(path)
        elif lower.endswith(PNG_SUFFIXES):
            image = XrayImage(_read_pil(path))
        else:
            raise UnreadableImageError(path, f"unsupported suffix; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    except UnreadableImageError:
        raise
    except Exception as e:  # decoder errors come in many types (OSError, ValueError, InvalidDicomError, ...)
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
    if not np.isfinite(image.array).all():
        raise UnreadableImageError(path, "image contains NaN or infinite values")
    return image


def _read_pil(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decodes now, so a truncated file fails here rather than later
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.float32) / 65535.0
        if mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float32)
            # 32-bit modes hold 16-bit PNG data when Pillow widens it; scale by the smallest range that fits
            top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
            return np.clip(arr / top, 0.0, 1.0)
        if mode in ("RGB", "RGBA", "LA", "RGBX"):
            arr = np.asarray(im)
            colour = arr[..., :3] if mode != "LA" else arr[..., :1]
            if colour.shape[-1] == 1 or (
                np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
            ):
                return colour[..., 0].astype(np.float32) / 255.0
            logger.debug("%s has distinct colour channels; converting to luminance", path)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def parse_dicom_header(ds) -> dict:
    """Tabular fields of a pydicom dataset: ``age`` (the raw ``PatientAge`` string), ``sex`` and ``view``."""
    header = {}
    for key, tag in (("age", "PatientAge"), ("sex", "PatientSex"), ("view", "ViewPosition")):
        value = getattr(ds, tag, None)
        if value not in (None, ""):
            header[key] = str(value).strip()
    return header


def _read_dicom(path: str) -> XrayImage:
    import pydicom

    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as e:  # pydicom's own advice (force=True) is not an option here
        raise UnreadableImageError(path, "not a DICOM file (no 'DICM' prefix and no File Meta header)") from e
    if "PixelData" not in ds:
        raise UnreadableImageError(path, "DICOM file has no pixel data")
    arr = ds.pixel_array
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise UnreadableImageError(path, f"DICOM has {ds.SamplesPerPixel} samples per pixel; expected grayscale")
    if arr.ndim != 2:
        raise UnreadableImageError(path, f"DICOM pixel data has shape {arr.shape}; expected a single 2-D frame")
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds).astype(np.float32)
    arr = _minmax(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr
    header = parse_dicom_header(ds)
    _warn_unusable_header(path, header)
    return XrayImage(arr, header)


_warned_headers: set[str] = set()  # files already reported by this process: a run reads each file every epoch


def _warn_unusable_header(path: str, header: dict) -> None:
    """Log header fields that the tabular encoding will treat as missing, naming the file (once per process), so
    that a malformed ``PatientAge`` (``0XXY``, ``412Y``) or a lateral view does not silently lose the patient data."""
    if path in _warned_headers:
        return
    if "age" in header and math.isnan(parse_age(header["age"])):
        logger.warning(
            "%s: PatientAge '%s' is not a valid age (nnnD/W/M/Y, at most 120 years); encoded as missing",
            path,
            header["age"],
        )
        _warned_headers.add(path)
    if "view" in header and parse_view(header["view"]) is None:
        logger.warning("%s: ViewPosition '%s' is neither PA nor AP; encoded as missing", path, header["view"])
        _warned_headers.add(path)


def _read_nifti(path: str) -> XrayImage:
    import nibabel as nib

    arr = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise UnreadableImageError(path, f"NIfTI image has shape {arr.shape}; the model takes a 2-D X-ray")
    # NIfTI stores (x, y); rows of an X-ray run along y
    return XrayImage(_minmax(arr.T))


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
