"""Metrics: subject-level against sklearn and hand counts, thresholds, bootstrap CIs, lesion localisation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from bids_fcd import evaluate


def random_predictions(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    prob = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 1)  # rounded: plenty of ties
    return y, prob


@pytest.mark.parametrize("seed", range(5))
def test_subject_metrics_match_sklearn(seed):
    y, prob = random_predictions(seed)
    threshold = 0.5
    predicted = (prob >= threshold).astype(int)
    metrics = evaluate.subject_metrics(y, prob, threshold)
    assert metrics["auroc"] == pytest.approx(roc_auc_score(y, prob))
    assert metrics["average_precision"] == pytest.approx(average_precision_score(y, prob))
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
    assert metrics["sensitivity"] == pytest.approx(recall_score(y, predicted))
    assert metrics["specificity"] == pytest.approx(recall_score(1 - y, 1 - predicted))
    assert metrics["ppv"] == pytest.approx(precision_score(y, predicted))
    assert metrics["f1"] == pytest.approx(f1_score(y, predicted))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, predicted))
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == len(y)


def test_subject_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    prob = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4])
    metrics = evaluate.subject_metrics(y, prob, 0.5)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (2, 1, 1, 3)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)
    assert metrics["specificity"] == pytest.approx(3 / 4)
    assert metrics["ppv"] == pytest.approx(2 / 3)
    # 12 patient-control pairs; the patient scores higher in 4 + 3 + 1 of them
    assert metrics["auroc"] == pytest.approx(8 / 12)


def test_undefined_metrics_are_none_not_errors():
    metrics = evaluate.subject_metrics(np.array([1, 1, 1]), np.array([0.2, 0.8, 0.9]), 0.5)
    assert metrics["auroc"] is None and metrics["specificity"] is None
    assert metrics["balanced_accuracy"] is None
    assert metrics["sensitivity"] == pytest.approx(2 / 3)


def test_youden_threshold_maximises_balanced_accuracy_and_cuts_between_neighbours():
    for seed in range(5):
        y, prob = random_predictions(seed, 30)
        threshold = evaluate.youden_threshold(y, prob)
        best = max(evaluate.subject_metrics(y, prob, t)["balanced_accuracy"]
                   for t in np.concatenate([np.unique(prob), [1.1]]))
        assert evaluate.subject_metrics(y, prob, threshold)["balanced_accuracy"] == pytest.approx(best)
        assert not np.any(np.isclose(prob, threshold))


def test_youden_threshold_interval_lies_in_the_gap_of_separated_scores_and_widens_with_overlap():
    rng = np.random.default_rng(0)
    y = np.array([0] * 30 + [1] * 30)
    separated = np.concatenate([rng.uniform(0.0, 0.2, 30), rng.uniform(0.8, 1.0, 30)])
    low, high = evaluate.youden_threshold_ci(y, separated, n_boot=200)
    assert 0.0 < low <= high < 0.85 and low > 0.1  # every resample cuts between the classes
    overlapping = np.concatenate([rng.uniform(0.0, 0.7, 30), rng.uniform(0.3, 1.0, 30)])
    wide_low, wide_high = evaluate.youden_threshold_ci(y, overlapping, n_boot=200)
    assert wide_high - wide_low > high - low
    assert evaluate.youden_threshold_ci(np.ones(4), np.array([0.9, 0.8, 0.7, 0.1]), n_boot=200) is None  # one class


def test_youden_threshold_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    assert evaluate.youden_threshold(y, prob) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        evaluate.youden_threshold(np.ones(3), np.ones(3))


def test_youden_ties_go_to_the_more_specific_cut():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.95, 0.96, 0.97])
    # cut 0.35: sensitivity 1.0, specificity 0.75; cut 0.925: 0.75 / 1.0; J is 0.75 at both
    assert evaluate.youden_threshold(y, prob) == pytest.approx(0.925)


def test_bootstrap_ci_contains_the_point_estimate_and_replays():
    y, prob = random_predictions(0, 60)
    point = evaluate.auroc(y, prob)
    ci = evaluate.bootstrap_ci(evaluate.auroc, y, prob, n_boot=300, seed=3)
    assert ci[0] <= point <= ci[1] and ci[0] < ci[1]
    assert ci == evaluate.bootstrap_ci(evaluate.auroc, y, prob, n_boot=300, seed=3)


def test_bootstrap_resamples_whole_groups():
    values = np.array([1.0, 1.0, 5.0, 5.0])
    groups = np.array(["a", "a", "b", "b"])
    samples = evaluate.bootstrap_samples(lambda v: (len(v), v[0] == v[1]), values, n_boot=50, groups=groups)
    assert all(n == 4 for n, _ in samples)  # two groups of two drawn each time
    means = evaluate.bootstrap_samples(lambda v: float(v.mean()), values, n_boot=200, groups=groups)
    assert set(np.round(means, 6)) <= {1.0, 3.0, 5.0}


def test_bootstrap_ci_is_none_when_mostly_undefined():
    values = np.array([1.0] + [0.0] * 9)

    def first_is_one(v: np.ndarray) -> float | None:  # defined in ~10% of the resamples
        return float(v.mean()) if v[0] == 1 else None

    assert evaluate.bootstrap_ci(first_is_one, values, n_boot=200) is None


def test_metrics_with_ci_keep_counts_plain_and_rates_with_intervals():
    y, prob = random_predictions(1)
    metrics = evaluate.subject_metrics_with_ci(y, prob, 0.5, n_boot=200)
    assert isinstance(metrics["tp"], int) and metrics["n"] == len(y)
    for key in evaluate.SUBJECT_RATES:
        low, high = metrics[key]["ci95"]
        assert low <= metrics[key]["value"] <= high


def lesion_world() -> tuple[np.ndarray, np.ndarray]:
    """A 12^3 probability map: one blob on the lesion, one false blob, one voxel below the size limit."""
    prob = np.zeros((12, 12, 12), dtype=np.float32)
    lesion = np.zeros_like(prob)
    lesion[2:5, 2:5, 2:5] = 1
    prob[3:6, 3:6, 3:6] = 0.9  # overlaps the lesion on a 2^3 corner
    prob[8:11, 8:11, 8:11] = 0.8  # far from it
    prob[0, 11, 0] = 0.95  # one voxel
    return prob, lesion


def test_lesion_case_counts_detection_false_positives_and_dice():
    prob, lesion = lesion_world()
    case = evaluate.lesion_case(prob, lesion, voxel_threshold=0.5, min_voxels=2)
    assert case["n_clusters"] == 2 and case["n_false_positive"] == 1 and case["detected"] is True
    predicted = prob >= 0.5
    expected = 2 * 8 / (predicted.sum() + 27)
    assert case["dice"] == pytest.approx(expected)
    missed = evaluate.lesion_case(prob, lesion, voxel_threshold=0.92, min_voxels=2)  # only the lone voxel
    assert missed["detected"] is False and missed["n_false_positive"] == 0


def test_lesion_case_for_controls_and_unknown_masks():
    prob, _ = lesion_world()
    control = evaluate.lesion_case(prob, np.zeros(prob.shape), 0.5, 1)
    assert control == {"n_clusters": 3, "n_false_positive": 3, "detected": None, "dice": None}
    unknown = evaluate.lesion_case(prob, None, 0.5, 1)
    assert unknown["n_false_positive"] is None and unknown["n_clusters"] == 3


def test_clusters_use_26_connectivity_like_infer():
    prob = np.zeros((5, 5, 5))
    prob[1, 1, 1] = prob[2, 2, 2] = 1.0  # touching at a corner only
    assert evaluate.candidate_clusters(prob, 0.5, 1)[1] == 1


def test_lesion_summary_and_ci():
    cases = [{"n_clusters": 1, "n_false_positive": 0, "detected": True, "dice": 0.5},
             {"n_clusters": 2, "n_false_positive": 2, "detected": False, "dice": 0.0},
             {"n_clusters": 1, "n_false_positive": 1, "detected": None, "dice": None},
             {"n_clusters": 0, "n_false_positive": None, "detected": None, "dice": None}]
    summary = evaluate.lesion_summary(cases)
    assert summary["detection_rate"] == 0.5 and summary["dice"] == 0.25
    assert summary["false_positives_per_participant"] == pytest.approx(1.0)  # unknown lesion not counted
    with_ci = evaluate.lesion_metrics_with_ci(cases, n_boot=100)
    assert with_ci["n_with_lesion"] == 2
    low, high = with_ci["detection_rate"]["ci95"]
    assert low <= 0.5 <= high


def _control_with_blobs(peaks: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A control's map: one separate 2x2x2 blob per peak probability; its (empty) lesion mask."""
    prob = np.zeros((12, 12, 12), dtype=np.float32)
    for k, peak in enumerate(peaks):
        prob[1 + 3 * k:3 + 3 * k, 1:3, 1:3] = peak
    return prob, np.zeros_like(prob)


def test_voxel_threshold_is_the_lowest_within_the_false_positive_bound():
    patient = np.zeros((12, 12, 12), dtype=np.float32)
    lesion = np.zeros_like(patient)
    lesion[6:9, 6:9, 6:9] = 1
    patient[6:9, 6:9, 6:9] = 0.35  # a faint true lesion: only thresholds <= 0.35 find it
    controls = [_control_with_blobs([0.25, 0.15]), _control_with_blobs([0.22]), _control_with_blobs([])]
    maps = [patient] + [c[0] for c in controls]
    lesions = [lesion] + [c[1] for c in controls]
    # 0.05..0.15: 3 false clusters over 4 participants; 0.20: 2 (0.5 each); 0.25: 1 (0.25 <= 0.3)
    assert evaluate.choose_voxel_threshold(maps, lesions, min_voxels=1) == 0.25
    assert evaluate.choose_voxel_threshold(maps, lesions, min_voxels=1, max_false_positives=0.5) == 0.2
    assert evaluate.choose_voxel_threshold(maps, lesions, min_voxels=9) == 0.05  # blobs of 8 voxels dropped
    # the lesion is no false positive, and a cluster off the mask in a patient is one
    off_mask = patient.copy()
    off_mask[0:2, 0:2, 10:12] = 0.6
    assert evaluate.choose_voxel_threshold([off_mask], [lesion], min_voxels=1) == 0.65


def test_voxel_threshold_takes_the_fewest_false_positives_when_none_meets_the_bound():
    control, empty = _control_with_blobs([0.99, 0.99])  # two confident false clusters at every threshold
    assert evaluate.choose_voxel_threshold([control], [empty], min_voxels=1) == 0.95
    with pytest.raises(ValueError, match="known lesion status"):
        evaluate.choose_voxel_threshold([], [], min_voxels=1)


def test_by_group_skips_tiny_groups():
    groups = np.array(["a", "a", "b"])
    result = evaluate.by_group(groups, lambda mask: int(mask.sum()))
    assert result == {"a": 2}


def test_lesion_conspicuity_measures_volume_and_contrast_against_the_mirrored_homologue():
    rng = np.random.default_rng(0)
    brain = np.zeros((20, 10, 10), bool)
    brain[2:18, 1:9, 1:9] = True
    flair = rng.normal(0.0, 1.0, brain.shape)
    lesion = np.zeros(brain.shape, bool)
    lesion[3:6, 3:6, 3:6] = True
    flair[lesion] += 2.0
    result = evaluate.lesion_conspicuity(flair, lesion, brain, spacing_mm=2.0)
    assert result["volume_ml"] == pytest.approx(27 * 8 / 1000)
    assert 1.0 < result["flair_contrast"] < 3.0
    # A brighter homologue makes the same lesion faint.
    flair[np.flip(lesion, axis=0)] += 2.0
    assert abs(evaluate.lesion_conspicuity(flair, lesion, brain, 2.0)["flair_contrast"]) < 0.6
    assert evaluate.lesion_conspicuity(None, lesion, brain, 2.0) == {"volume_ml": result["volume_ml"],
                                                                      "flair_contrast": None,
                                                                      "edge_distance_mm": 4.0}
    # The lesion's shallowest voxels lie 2 voxels inside the mask (x = 3; the nearest outside it is x = 1);
    # one crossing the mask's edge is at 0.
    assert result["edge_distance_mm"] == pytest.approx(4.0)
    crossing = np.zeros(brain.shape, bool)
    crossing[1:4, 3:6, 3:6] = True
    assert evaluate.lesion_conspicuity(flair, crossing, brain, 2.0)["edge_distance_mm"] == 0.0
    # No homologue inside the brain: no contrast to measure.
    half_brain = brain.copy()
    half_brain[10:] = False
    assert evaluate.lesion_conspicuity(flair, lesion, half_brain, 2.0)["flair_contrast"] is None
    with pytest.raises(ValueError):
        evaluate.lesion_conspicuity(flair, np.zeros(brain.shape), brain, 2.0)


def test_detector_figures_count_false_positives_on_controls_only():
    labels = [1, 1, 0, 0]
    cases = [{"n_clusters": 2, "n_false_positive": 1, "detected": True, "dice": 0.5},
             {"n_clusters": 0, "n_false_positive": 0, "detected": False, "dice": 0.0},
             {"n_clusters": 1, "n_false_positive": 1, "detected": None, "dice": None},
             {"n_clusters": 0, "n_false_positive": 0, "detected": None, "dice": None}]
    figures = evaluate.detector_figures(labels, [0.9, 0.4, 0.6, 0.1], cases, threshold=0.5)
    assert figures == {"auroc": 0.75, "sensitivity": 0.5, "specificity": 0.5, "detection_rate": 0.5,
                       "dice": 0.25, "false_positive_clusters_per_control": 0.5}


def test_detector_figures_ci_brackets_the_figures_and_resamples_groups_whole():
    rng = np.random.default_rng(0)
    labels = [1] * 12 + [0] * 12
    probabilities = np.r_[rng.uniform(0.3, 1.0, 12), rng.uniform(0.0, 0.7, 12)]
    cases = ([{"n_clusters": 1, "n_false_positive": 0, "detected": bool(i % 3), "dice": 0.4} for i in range(12)]
             + [{"n_clusters": i % 2, "n_false_positive": i % 2, "detected": None, "dice": None} for i in range(12)])
    point = evaluate.detector_figures(labels, probabilities, cases, threshold=0.5)
    intervals = evaluate.detector_figures_ci(labels, probabilities, cases, threshold=0.5, n_boot=300)
    assert set(intervals) == set(point)
    for key, (low, high) in intervals.items():
        assert low <= point[key] <= high
    assert intervals["auroc"][1] - intervals["auroc"][0] > 0.1  # 24 participants cannot pin AUROC down
    assert intervals["dice"] == [pytest.approx(0.4), pytest.approx(0.4)]
    # Three implanted copies of one brain move together: brains 0 and 2 of four are found, so resampling whole
    # brains can draw none or all of them found (1 in 16 each), whereas 12 independent rows almost never can.
    brains = [f"brain{i // 3}" for i in range(12)] * 2
    grouped_cases = ([{"n_clusters": 1, "n_false_positive": 0, "detected": i // 3 % 2 == 0, "dice": 0.4}
                      for i in range(12)] + cases[12:])
    grouped = evaluate.detector_figures_ci(labels, probabilities, grouped_cases, 0.5, groups=brains, n_boot=300)
    assert grouped["detection_rate"] == [0.0, 1.0]
    independent = evaluate.detector_figures_ci(labels, probabilities, grouped_cases, 0.5, n_boot=300)
    assert 0.0 < independent["detection_rate"][0] and independent["detection_rate"][1] < 1.0


def test_volume_bands_and_detection_by_band():
    assert [evaluate.band_label(v, (1.0, 3.0), "mL") for v in (0.5, 1.0, 2.9, 3.0, 8.0)] == [
        "< 1 mL", "1-3 mL", "1-3 mL", ">= 3 mL", ">= 3 mL"]
    assert evaluate.band_labels((1.0, 3.0), "mL") == ["< 1 mL", "1-3 mL", ">= 3 mL"]
    assert evaluate.band_members([2.0, None, 0.5, 4.0, 1.5], (1.0, 3.0), "mL") == {
        "< 1 mL": [2], "1-3 mL": [0, 4], ">= 3 mL": [3]}
    result = evaluate.detection_by_band([0.5, 0.7, 2.0, 5.0], [False, True, True, True], (1.0, 3.0), "mL")
    assert result == {"< 1 mL": {"n": 2, "detection_rate": 0.5}, "1-3 mL": {"n": 1, "detection_rate": 1.0},
                      ">= 3 mL": {"n": 1, "detection_rate": 1.0}}
    assert evaluate.detection_by_band([], [], (1.0, 3.0), "mL")[">= 3 mL"] == {"n": 0, "detection_rate": None}


def test_missed_lesions_are_split_into_unseen_and_under_the_cut():
    detected = [True, False, False, False, True]
    peaks = [0.9, 0.01, 0.3, evaluate.UNSEEN_PEAK, 0.02]  # a found lesion never counts, whatever its peak
    missed = evaluate.missed_lesions(detected, np.array(peaks))
    assert missed == {"n": 3, "unseen": 1, "under_the_cut": 2}
    assert all(type(value) is int for value in missed.values())  # json-safe
    assert evaluate.missed_lesions([], []) == {"n": 0, "unseen": 0, "under_the_cut": 0}


def test_froc_trades_detection_for_false_positives_and_reports_the_best_within_each_budget():
    shape = (12, 12, 12)
    lesion = np.zeros(shape)
    lesion[2:5, 2:5, 2:5] = 1
    faint = np.zeros(shape)
    faint[lesion > 0] = 0.3  # found only by a low threshold
    noisy_control = np.zeros(shape)
    noisy_control[8:10, 8:10, 8:10] = 0.2  # one false cluster below 0.25
    quiet_control = np.zeros(shape)
    thresholds = (0.1, 0.25, 0.5)
    cases = [evaluate.froc_case(prob, mask, min_voxels=2, thresholds=thresholds)
             for prob, mask in ((faint, lesion), (noisy_control, np.zeros(shape)), (quiet_control, np.zeros(shape)))]
    assert cases[0] == {"detected": [True, True, False], "n_clusters": [1, 1, 0]}
    assert cases[1] == {"detected": [None, None, None], "n_clusters": [1, 0, 0]}
    result = evaluate.froc([1, 0, 0], cases, thresholds=thresholds, fp_budgets=(0.0, 0.5, 1.0))
    assert [p["detection_rate"] for p in result["points"]] == [1.0, 1.0, 0.0]
    assert [p["false_positive_clusters_per_control"] for p in result["points"]] == [0.5, 0.0, 0.0]
    assert result["detection_within_fp"] == {"0": 1.0, "0.5": 1.0, "1": 1.0}
    only_controls = evaluate.froc([0, 0], cases[1:], thresholds=thresholds, fp_budgets=(1.0,))
    assert only_controls["detection_within_fp"] == {"1": None}
    assert only_controls["points"][0]["detection_rate"] is None


def test_froc_budget_without_a_point_under_it_is_none():
    shape = (8, 8, 8)
    control = np.zeros(shape)
    control[1:3, 1:3, 1:3] = 0.99  # a false cluster at every threshold
    lesion = np.zeros(shape)
    lesion[5:7, 5:7, 5:7] = 1
    cases = [evaluate.froc_case(lesion * 0.99, lesion, 1, (0.5,)), evaluate.froc_case(control, np.zeros(shape), 1, (0.5,))]
    assert evaluate.froc([1, 0], cases, thresholds=(0.5,), fp_budgets=(0.5, 1.0))["detection_within_fp"] == {
        "0.5": None, "1": 1.0}
