"""Participant-level inference on arrays: devices, test-time augmentation, clusters and atlas labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.infer import UNLABELLED, Prediction, atlas_region, find_clusters, predict, select_device
from bids_fcd.models import build_model
from bids_fcd.template import Grid
from tests.lesion_toy import BRAIN, SHAPE, random_centre, sample, toy_config, trained_model

CPU = torch.device("cpu")


def test_select_device() -> None:
    assert select_device("cpu") == CPU
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        select_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_select_device_cuda_without_cuda_says_so() -> None:
    with pytest.raises(RuntimeError, match="--device cuda .*no CUDA GPU"):
        select_device("cuda")


def test_predict_on_the_trained_toy_finds_the_lesion_and_respects_the_brain() -> None:
    model, _ = trained_model()
    config = toy_config()
    rng = np.random.default_rng(5)
    centre = random_centre(rng)
    x, lesion = sample(rng, centre)
    patient = predict(model, config, x, BRAIN, CPU, n_passes=4)
    control = predict(model, config, sample(rng, None)[0], BRAIN, CPU, n_passes=4)

    assert isinstance(patient, Prediction) and patient.n_passes == 4
    assert 0.0 <= control.fcd_probability < 0.5 < patient.fcd_probability <= 1.0
    for volume in (patient.prob_template, patient.uncertainty_template, patient.saliency_template):
        assert volume.shape == SHAPE and volume.dtype == np.float32
        assert not volume[~BRAIN].any()
    assert patient.prob_template.min() >= 0.0 and patient.prob_template.max() <= 1.0
    assert patient.uncertainty_template.min() >= 0.0
    assert patient.uncertainty_template.max() > 0.0  # flipped passes differ from un-flipped ones
    assert patient.prob_template[lesion].mean() > 0.5 > patient.prob_template[BRAIN & ~lesion].mean()
    peak = np.unravel_index(np.argmax(patient.saliency_template), SHAPE)
    assert np.linalg.norm(np.array(peak) - centre) <= 6.0
    assert not model.training


def test_predict_with_mc_dropout_is_stochastic_but_replays_with_its_seed() -> None:
    config = ModelConfig(grid_shape=(32, 32, 32), arch_params={"width": 0.5, "dropout": 0.3})
    torch.manual_seed(0)
    model = build_model(config)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 32)).astype(np.float32)
    brain = np.ones((32, 32, 32), dtype=bool)

    before = torch.random.get_rng_state()
    first = predict(model, config, x, brain, CPU, n_passes=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    again = predict(model, config, x, brain, CPU, n_passes=3, seed=1)
    other = predict(model, config, x, brain, CPU, n_passes=3, seed=2)
    single = predict(model, config, x, brain, CPU, n_passes=1)

    assert np.array_equal(first.prob_template, again.prob_template)
    assert first.fcd_probability == again.fcd_probability
    assert not np.array_equal(first.prob_template, other.prob_template)
    assert not model.training and all(not m.training for m in model.modules())
    assert single.n_passes == 1 and not single.uncertainty_template.any()


def test_predict_rejects_inputs_that_do_not_match_the_model() -> None:
    config = ModelConfig(grid_shape=(32, 32, 32), arch_params={"width": 0.5})
    model = build_model(config)
    brain = np.ones((32, 32, 32), dtype=bool)
    with pytest.raises(ValueError, match="do not match"):
        predict(model, config, np.zeros((1, 32, 32, 32), np.float32), brain, CPU)  # one channel, model wants two
    with pytest.raises(ValueError, match="do not match"):
        predict(model, config, np.zeros((2, 32, 32, 48), np.float32), np.ones((32, 32, 48), bool), CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda_matches_cpu() -> None:
    config = ModelConfig(grid_shape=(32, 32, 32), arch_params={"dropout": 0.0})
    model = build_model(config).eval()
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 32)).astype(np.float32)
    brain = np.ones((32, 32, 32), dtype=bool)
    on_cpu = predict(model, config, x, brain, CPU, n_passes=2)
    on_gpu = predict(model, config, x, brain, select_device("cuda"), n_passes=2)
    assert on_gpu.fcd_probability == pytest.approx(on_cpu.fcd_probability, abs=1e-3)
    np.testing.assert_allclose(on_gpu.prob_template, on_cpu.prob_template, atol=1e-3)


# --- clusters ---------------------------------------------------------------------------------------------------

# A 2 mm grid whose voxel (10, 20, 30) is the template point (-40, -20, 50) mm (left precentral gyrus).
GRID = Grid(shape=(24, 32, 40), affine=np.array([[2.0, 0, 0, -60], [0, 2.0, 0, -60], [0, 0, 2.0, -10], [0, 0, 0, 1]]))


def to_scanner(points: np.ndarray) -> np.ndarray:
    """A participant's head: rotated 90 degrees about z, half as large again, shifted (template -> scanner mm)."""
    linear = np.array([[0.0, -1.5, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 1.5]])
    return points @ linear.T + np.array([5.0, -7.0, 30.0])


def blob_map() -> np.ndarray:
    prob = np.zeros(GRID.shape, dtype=np.float32)
    prob[9:12, 19:22, 29:32] = 0.7  # 27 voxels, evidence 19.9 ...
    prob[10, 20, 30] = 0.95  # ... with its peak at voxel (10, 20, 30): evidence 20.15
    prob[2:6, 2:6, 2:4] = 0.9  # 32 voxels, evidence 28.8: the strongest
    prob[20, 28, 5] = prob[21, 29, 6] = 0.8  # 2 voxels touching diagonally (26-connectivity): one component
    prob[15, 5, 35] = 0.45  # below the threshold
    return prob


def test_find_clusters_counts_sorts_and_measures_components() -> None:
    clusters = find_clusters(blob_map(), GRID, voxel_threshold=0.5, min_volume_mm3=0.0, to_scanner_mm=to_scanner)

    assert [c.id for c in clusters] == [1, 2, 3]
    assert [c.volume_mm3 for c in clusters] == [32 * 8.0, 27 * 8.0, 2 * 8.0]  # sorted by evidence, not by size
    assert clusters[0].peak_probability == pytest.approx(0.9)
    assert clusters[1].peak_probability == pytest.approx(0.95)
    assert clusters[1].mean_probability == pytest.approx((26 * 0.7 + 0.95) / 27, abs=1e-4)

    lesion = clusters[1]
    assert lesion.peak_template_mm == pytest.approx([-40.0, -20.0, 50.0])
    assert lesion.peak_mm == pytest.approx(to_scanner(np.array([[-40.0, -20.0, 50.0]]))[0].tolist())
    assert lesion.centroid_mm == pytest.approx(lesion.peak_mm)  # a symmetric cube around its peak
    assert lesion.region == "Left Precentral Gyrus" and "Harvard-Oxford" in lesion.atlas
    assert json.loads(json.dumps([c.to_json() for c in clusters]))[1]["region"] == "Left Precentral Gyrus"


def test_find_clusters_drops_small_components_and_reports_native_volumes() -> None:
    clusters = find_clusters(blob_map(), GRID, voxel_threshold=0.5, min_volume_mm3=100.0, to_scanner_mm=to_scanner,
                             native_voxel_volume_scale=1.5 ** 3)
    assert len(clusters) == 2  # the 16 mm3 pair is gone (the threshold is in template mm3)
    assert clusters[0].volume_mm3 == pytest.approx(32 * 8.0 * 3.375)
    assert find_clusters(np.zeros(GRID.shape, np.float32), GRID, 0.5, 0.0, to_scanner) == []


def test_atlas_region_names_labelled_voxels_nearby_labels_or_nothing() -> None:
    assert atlas_region(np.array([-40.0, -20.0, 50.0]))[1] == "Left Precentral Gyrus"
    assert atlas_region(np.array([40.0, -20.0, 50.0]))[1] == "Right Precentral Gyrus"
    assert atlas_region(np.array([-20.0, -10.0, -18.0]))[1] == "Left Hippocampus"  # subcortical labels too
    assert atlas_region(np.array([-30.0, 0.0, 30.0]))[1] == "Left Precentral Gyrus"  # white matter, gyrus < 5 mm
    assert atlas_region(np.array([-28.0, -20.0, 40.0]))[1] == UNLABELLED  # deep white matter
    assert atlas_region(np.array([0.0, 0.0, 200.0]))[1] == UNLABELLED  # outside the atlas
