"""Preprocessing: raw T1w + FLAIR -> model-ready template-space arrays, and the way back."""

from __future__ import annotations

import numpy as np

ROBUST_PERCENTILES = (1.0, 99.0)


def normalise_intensity(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Robust-percentile normalisation ("robust-percentile" in ModelConfig.normalisation).

    The 1st and 99th percentiles of the brain's intensities map to 0 and 1, so scanners' arbitrary units and
    a few hot voxels do not move the scale, while FLAIR-bright lesions stay above 1. Outside the brain is 0;
    values are clipped to [-0.5, 3] to bound outliers. Returns float32 of the input's shape.
    """
    inside = brain_mask > 0
    low, high = np.percentile(volume[inside], ROBUST_PERCENTILES) if inside.any() else (0.0, 1.0)
    scaled = (volume - low) / max(high - low, 1e-6)
    scaled = np.clip(scaled, -0.5, 3.0)
    scaled[~inside] = 0.0
    return scaled.astype(np.float32)
