"""The model shipped inside the package: it loads safely, says what it is, and finds a lesion it never saw.

Accuracy figures live in bids_fcd/weights/MODEL_CARD.md (benchmarks/evaluate_default_model.py); this test only
guards against shipping weights that do not work: a broken training run, weights from another architecture or
grid, or thresholds that call every brain FCD.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_fcd.infer import find_clusters, predict
from bids_fcd.models import load_checkpoint
from bids_fcd.participant import DEFAULT_MODEL
from bids_fcd.synth import synth_template_sample
from bids_fcd.template import model_grid

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} is not built yet")


def peak_in_lesion(peak_template_mm: list[float], lesion: np.ndarray, grid) -> bool:
    """Whether a template-space point falls in the lesion grown by 2 voxels (3 mm)."""
    voxel = np.rint(nib.affines.apply_affine(np.linalg.inv(grid.affine), peak_template_mm)).astype(int)
    return bool(ndimage.binary_dilation(lesion > 0, iterations=2)[tuple(voxel)])


@pytest.fixture(scope="module")
def shipped():
    model, config = load_checkpoint(DEFAULT_MODEL, torch.device("cpu"))
    return model, config


def test_shipped_model_card_and_config_say_what_it_is(shipped):
    _, config = shipped
    assert (DEFAULT_MODEL.parent / "MODEL_CARD.md").is_file()
    assert "simulated" in config.training["data"] and "no patient data" in config.training["data"]
    assert 0.0 < config.subject_threshold < 1.0 and 0.0 < config.voxel_threshold < 1.0
    assert config.channels == ("T1w", "FLAIR") and config.template_space == "MNI152NLin2009aSym"
    assert DEFAULT_MODEL.stat().st_size < 20 * 2**20


def test_shipped_model_ranks_unseen_lesions_above_controls_and_points_at_them(shipped):
    """Fresh synthetic volumes (a seed training never used): patients score above controls, the top candidate
    of each patient overlaps its lesion, and the saliency map peaks in a lesion (Grad-CAM's pooled map did not)."""
    model, config = shipped
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    rng = np.random.default_rng(987654)
    scores, hits, saliency_hits = {0: [], 1: []}, [], []
    for label in (1, 0, 1, 0):
        t1w, flair, brain, lesion = synth_template_sample(rng, grid, with_lesion=bool(label))
        prediction = predict(model, config, np.stack([t1w, flair]), brain.astype(bool), torch.device("cpu"),
                             n_passes=1)
        scores[label].append(prediction.fcd_probability)
        if label:
            clusters = find_clusters(prediction.prob_template, grid, config.voxel_threshold, config.min_cluster_mm3,
                                     to_scanner_mm=lambda points: points)
            hits.append(bool(clusters) and peak_in_lesion(clusters[0].peak_template_mm, lesion, grid))
            saliency_peak = np.unravel_index(np.argmax(prediction.saliency_template), grid.shape)
            saliency_hits.append(peak_in_lesion(nib.affines.apply_affine(grid.affine, saliency_peak), lesion, grid))
    assert min(scores[1]) > max(scores[0]), scores
    assert all(hits), hits
    assert any(saliency_hits), "the saliency map points at neither lesion"


def test_the_model_card_is_what_its_benchmark_writes_from_its_recorded_figures():
    """MODEL_CARD.md is regenerated from benchmarks/results/model_card.json exactly: no figure edited by hand,
    none left over from an earlier model or benchmark run."""
    import importlib.util
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("evaluate_default_model",
                                                  repo / "benchmarks" / "evaluate_default_model.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = json.loads((repo / "benchmarks" / "results" / "model_card.json").read_text())
    _, config = load_checkpoint(DEFAULT_MODEL)
    assert result["subject_threshold"] == config.subject_threshold
    assert benchmark.model_card(result, config) == (DEFAULT_MODEL.parent / "MODEL_CARD.md").read_text()
