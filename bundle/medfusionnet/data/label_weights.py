"""Per-finding weights from the training split's label counts, for the loss and for MedFusionNet's class-aware
reweighting."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def inverse_frequency_weights(
    positives: Sequence[float], power: float = 0.5, max_gain: float | None = None
) -> torch.Tensor:
    """``(1 / frequency) ** power`` per finding, normalised to mean 1 (float32 ``(K,)``).

    A finding without positives counts as one positive. ``power`` 1 is plain inverse frequency, 0 gives equal
    weights; 0.5 tempers ChestX-ray14's ~100x spread. With ``max_gain`` the weights are then clipped to
    ``[1 / max_gain, max_gain]``. The split's size cancels in the normalisation, so only the counts are needed.
    """
    counts = torch.as_tensor(positives, dtype=torch.float64).clamp_min(1.0)
    weights = counts.pow(-float(power))
    weights = weights / weights.mean()
    if max_gain is not None:
        weights = weights.clamp(1.0 / max_gain, max_gain)
    return weights.float()
