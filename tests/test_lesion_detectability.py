"""The known-shape reference detector of benchmarks/lesion_detectability.py, on a toy volume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SPEC = importlib.util.spec_from_file_location(
    "lesion_detectability", Path(__file__).resolve().parents[1] / "benchmarks" / "lesion_detectability.py")
detectability = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(detectability)


def blob_world(amplitude: float):
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    before = rng.normal(1.0, 0.05, size=(2, *shape)).astype(np.float32)
    brain = np.zeros(shape, bool)
    brain[4:-4, 4:-4, 4:-4] = True
    grid = np.indices(shape)
    blob = np.exp(-((grid - np.array([22, 18, 20])[:, None, None, None]) ** 2).sum(0) / (2 * 2.0 ** 2))
    blob = np.where(blob > 0.05, blob, 0.0).astype(np.float32)
    after = before + amplitude * np.stack([-0.5 * blob, blob])  # T1w darker, FLAIR brighter
    return before * brain, after * brain, brain


def test_a_clear_lesion_scores_far_above_the_background_and_a_faint_one_does_not():
    before, after, brain = blob_world(amplitude=0.3)
    candidates = brain.copy()
    z_clear, false_positives = detectability.filter_outcome(before, after, brain, candidates, sigma_vox=3.0)
    assert z_clear > 8
    assert len(false_positives) == len(detectability.Z_THRESHOLDS)
    at_z = dict(zip(detectability.Z_THRESHOLDS, false_positives))
    assert at_z[2.0] >= at_z[4.0] >= at_z[8.0] == 0  # noise alone makes few clusters, fewer as t rises
    before, after, brain = blob_world(amplitude=0.01)
    z_faint, _ = detectability.filter_outcome(before, after, brain, candidates, sigma_vox=3.0)
    assert z_faint < 3 < z_clear
