"""Checks of the training settings before any data is read or any network is built.

The bundle configs pass their keys straight to the code, so a bad command-line override would otherwise fail only
once data and network are being set up, with a message that does not name the key (``--batch_size abc``: "invalid
literal for int()"), or not fail at all (``--image_size 100`` trains MedFusionNet off its 32-pixel grid).
`check_training_settings` runs first in the ``initialize`` list of the training configs and names the key, its
value and what is allowed.
"""

from __future__ import annotations

import math
import numbers

from ..data.nih import SPLITS
from ..networks.medfusionnet import SIZES
from ..networks.registry import NETWORKS
from .losses import LOSSES
from .training import AMP_DTYPES

SAMPLINGS = ("balanced", "natural")
CACHES = (None, "none", "memory", "disk")  # as transforms.XrayDataset takes them
# MedFusionNet's feature maps run at strides 4 to 32 and its stages are aligned across branches, so the input
# side must divide by 32. Other networks are held only to the transform's minimum of 32 here.
STRIDE = 32
NETWORKS_WITH_STRIDE = ("medfusionnet",)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _int_at_least(low: int):
    return lambda v: _is_int(v) and v >= low, f"an integer >= {low}"


def _number_at_least(low: float, strict: bool = False):
    check = (lambda v: _is_number(v) and v > low) if strict else (lambda v: _is_number(v) and v >= low)
    return check, f"a number {'>' if strict else '>='} {low:g}"


def _one_of(choices):
    return lambda v: v in choices, f"one of {list(choices)}"


# key -> (check, what is allowed)
RULES = {
    "batch_size": _int_at_least(1),
    "val_batch_size": _int_at_least(1),
    "max_epochs": _int_at_least(1),
    "val_interval": _int_at_least(1),
    "log_interval": _int_at_least(1),
    "num_workers": _int_at_least(0),
    "seed": _int_at_least(0),
    "image_size": _int_at_least(32),
    "curriculum_epochs": _int_at_least(0),
    "warmup_epochs": _int_at_least(0),
    "max_repeats": _int_at_least(1),
    "learning_rate": _number_at_least(0, strict=True),
    "fusion_lr_scale": _number_at_least(0, strict=True),
    "gate_lr_scale": _number_at_least(0, strict=True),
    "aux_loss_weight": _number_at_least(0),
    "weight_decay": _number_at_least(0),
    "focal_gamma": _number_at_least(0),
    "class_weight_power": _number_at_least(0),
    "asl_gamma_neg": _number_at_least(0),
    "no_finding_factor": _number_at_least(0),
    "val_fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "test_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "asl_clip": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "split": _one_of(SPLITS),
    "sampling": _one_of(SAMPLINGS),
    "loss_name": _one_of(LOSSES),
    "amp_dtype": _one_of(sorted(AMP_DTYPES)),
    "cache": _one_of(CACHES),
    "network_name": _one_of(sorted(NETWORKS)),
    "network_size": _one_of(sorted(SIZES)),
}


def check_training_settings(**settings) -> None:
    """Validate training config values given as keyword arguments (any subset of `RULES`' keys).

    Besides each key's own rule: ``val_fraction + test_fraction`` must stay below 1, ``warmup_epochs`` below
    ``max_epochs``, and for MedFusionNet
    (``network_name`` ``medfusionnet``, the default when it is not given) ``image_size`` must be a multiple of 32.

    Raises:
        ValueError: naming the first bad key, its value and what is allowed.
        TypeError: for a key this function does not know (a misspelt name in the config line).
    """
    unknown = sorted(set(settings) - set(RULES))
    if unknown:
        raise TypeError(f"check_training_settings() got unknown setting(s) {unknown}; known: {sorted(RULES)}")
    for key, value in settings.items():
        check, allowed = RULES[key]
        if not check(value):
            raise ValueError(f"{key}={value!r} ({type(value).__name__}) is not valid: use {allowed}")
    if "val_fraction" in settings and "test_fraction" in settings:
        total = settings["val_fraction"] + settings["test_fraction"]
        if total >= 1:
            raise ValueError(
                f"val_fraction={settings['val_fraction']!r} and test_fraction="
                f"{settings['test_fraction']!r} add up to {total:g}: their sum must stay below 1"
            )
    if settings.get("warmup_epochs", 0) and settings["warmup_epochs"] >= settings.get("max_epochs", math.inf):
        raise ValueError(
            f"warmup_epochs={settings['warmup_epochs']!r} is not valid: use fewer than max_epochs="
            f"{settings['max_epochs']!r}"
        )
    name, size = settings.get("network_name", "medfusionnet"), settings.get("image_size")
    if size is not None and name in NETWORKS_WITH_STRIDE and size % STRIDE:
        below = max(size // STRIDE * STRIDE, STRIDE)
        raise ValueError(
            f"image_size={size!r} is not valid for network_name='{name}': use a multiple of {STRIDE} "
            f"(e.g. {below} or {below + STRIDE})"
        )
