"""Histogram standardisation of the model input (Nyul-Udupa, TorchIO): landmarks, the mapping, and every path
that feeds a network trained with it (participant-level `predict`, the group level's samples, checkpoints)."""

from __future__ import annotations

import numpy as np
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.data import Sample, as_model_input
from bids_fcd.infer import predict
from bids_fcd.inputs import Participant
from bids_fcd.models import build_model, load_checkpoint, save_checkpoint
from bids_fcd.preprocess import (
    HISTOGRAM_PERCENTILES,
    histogram_landmarks,
    model_input,
    normalise_intensity,
    standardise_histograms,
)

CHANNELS = ("T1w", "FLAIR")
SHAPE = (32, 32, 32)


def brain_mask() -> np.ndarray:
    brain = np.zeros(SHAPE, dtype=bool)
    brain[4:28, 4:28, 4:28] = True
    return brain


def normalised_volume(seed: int, shape_parameter: float) -> np.ndarray:
    """Two channels of a gamma-distributed brain whose histogram shape `shape_parameter` sets, normalised."""
    rng = np.random.default_rng(seed)
    brain = brain_mask()
    raw = rng.gamma(shape_parameter, 1.0, size=(2, *SHAPE)).astype(np.float32)
    return np.stack([normalise_intensity(channel, brain) for channel in raw])


def test_landmarks_are_the_mean_percentiles_and_a_standardised_volume_takes_them_as_its_own():
    brain = brain_mask()
    volumes = [normalised_volume(0, 2.0), normalised_volume(1, 9.0)]
    landmarks = histogram_landmarks(volumes, [brain, brain], CHANNELS)

    expected = np.mean([np.percentile(v[1][brain], HISTOGRAM_PERCENTILES) for v in volumes], axis=0)
    assert np.allclose(landmarks["FLAIR"], expected, atol=1e-4)
    assert landmarks["T1w"][0] < 0.01 and abs(landmarks["T1w"][-1] - 1.0) < 0.01  # 1st..99th = 0..1 already

    other = normalised_volume(2, 0.8)  # a third, differently skewed histogram
    standardised = standardise_histograms(other, brain, landmarks, CHANNELS)
    for c, name in enumerate(CHANNELS):
        assert not np.allclose(np.percentile(other[c][brain], HISTOGRAM_PERCENTILES), landmarks[name], atol=0.02)
        assert np.allclose(np.percentile(standardised[c][brain], HISTOGRAM_PERCENTILES), landmarks[name], atol=0.01)
    assert standardised.dtype == np.float32 and not standardised[:, ~brain].any()
    again = standardise_histograms(standardised, brain, landmarks, CHANNELS)
    assert np.abs(again - standardised).max() < 1e-3  # idempotent: predict may see an input standardised already


def test_standardisation_keeps_order_and_a_bright_lesion_stays_above_the_99th_landmark():
    brain = brain_mask()
    image = normalised_volume(3, 3.0)
    image[1, 14:17, 14:17, 14:17] = 2.0  # FLAIR-bright lesion, twice the 99th percentile
    landmarks = histogram_landmarks([normalised_volume(4, 6.0)], [brain], CHANNELS)
    standardised = standardise_histograms(image, brain, landmarks, CHANNELS)

    order = np.argsort(image[1][brain], kind="stable")
    assert np.all(np.diff(standardised[1][brain][order]) >= -1e-6)  # monotone: no voxel overtakes another
    assert standardised[1, 15, 15, 15] > landmarks["FLAIR"][-1] + 0.3  # extended linearly, not clipped at 99th


def test_model_input_is_the_input_itself_without_landmarks():
    image, brain = normalised_volume(5, 3.0), brain_mask()
    assert model_input(image, brain, ModelConfig()) is image
    config = ModelConfig(histogram_landmarks=histogram_landmarks([normalised_volume(6, 8.0)], [brain], CHANNELS))
    assert not np.allclose(model_input(image, brain, config), image)


def test_predict_standardises_for_a_model_trained_so_and_the_checkpoint_keeps_the_landmarks(tmp_path):
    brain = brain_mask()
    landmarks = histogram_landmarks([normalised_volume(7, 8.0)], [brain], CHANNELS)
    config = ModelConfig(grid_shape=SHAPE, arch_params={"width": 0.5, "dropout": 0.0}, histogram_landmarks=landmarks)
    torch.manual_seed(0)
    model = build_model(config).eval()
    image = normalised_volume(8, 1.5)
    device = torch.device("cpu")

    standardised_by_predict = predict(model, config, image, brain, device, n_passes=1)
    by_hand = predict(model, config.updated(histogram_landmarks={}),
                      standardise_histograms(image, brain, landmarks, CHANNELS), brain, device, n_passes=1)
    as_is = predict(model, config.updated(histogram_landmarks={}), image, brain, device, n_passes=1)
    assert np.allclose(standardised_by_predict.prob_template, by_hand.prob_template, atol=1e-5)
    assert not np.allclose(standardised_by_predict.prob_template, as_is.prob_template, atol=1e-5)

    save_checkpoint(model, config, tmp_path / "model.pt")
    _, loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.histogram_landmarks == landmarks


def test_group_samples_are_standardised_only_for_a_model_trained_so():
    brain = brain_mask()
    unit = Participant(subject="01", session=None, t1w=None, flair=None, label=0)
    samples = [Sample(unit, normalised_volume(9, 1.5), brain, None, "site")]
    assert as_model_input(samples, ModelConfig()) is samples
    landmarks = histogram_landmarks([normalised_volume(10, 8.0)], [brain], CHANNELS)
    standardised = as_model_input(samples, ModelConfig(histogram_landmarks=landmarks))
    assert np.allclose(standardised[0].image, standardise_histograms(samples[0].image, brain, landmarks, CHANNELS))
    assert standardised[0].brain_mask is brain and standardised[0].unit is unit
