"""Metrics for FCD detection: subject-level classification and lesion localisation, with bootstrap CIs.

Pure functions on arrays, shared by the group level (out-of-fold and test predictions) and the model-card
benchmark. Conventions: `y_true` is 1 for FCD and 0 for control; `prob` is the subject-level FCD probability;
a participant is predicted FCD when `prob >= threshold`. Lesion metrics take voxel-wise probability maps and
lesion masks on one template grid, (X, Y, Z); candidate clusters are cut exactly as the participant level does
(`bids_fcd.infer.find_clusters`: `prob >= voxel_threshold`, 26-connectivity, small components dropped).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import median_abs_deviation, rankdata

THRESHOLD_RULE = ("Youden's J (sensitivity + specificity - 1, i.e. maximal balanced accuracy) on held-out "
                  "subject probabilities; the cut is the midpoint between neighbouring probabilities; among equal J "
                  "the cut with the higher specificity (fewer false alarms), then the one nearest 0.5")
MAX_FP_PER_PARTICIPANT = 0.3  # below the detector's target of 0.5 per control, leaving room for a new cohort
VOXEL_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.05), 2))
VOXEL_THRESHOLD_RULE = (f"lowest of 0.05, 0.10, ..., 0.95 with at most {MAX_FP_PER_PARTICIPANT} false-positive "
                        "candidate clusters per participant whose lesion is known (all clusters of a control, those "
                        "off the mask in a patient), which maximises lesion detection within that bound; where none "
                        "meets it, the one with the fewest")
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
# False-positive clusters per control at which `froc` reports the best detection: around the detector's target (0.5)
FROC_FP_BUDGETS = (0.25, 0.5, 1.0, 2.0)
# A missed lesion whose map peaks under this inside it was unseen: no voxel threshold or cluster size finds it
UNSEEN_PEAK = 0.05
# Lesion-volume bands for "which lesions are missed": about the thirds of the log-uniform 0.5-8 mL range the
# synthetic lesions are drawn from.
LESION_VOLUME_EDGES_ML = (1.0, 3.0)
# Bands of `lesion_conspicuity`'s edge distance: crossing the brain mask's edge (0), about one voxel of the 1.5 mm
# grid inside it (1.5-2.6 mm), deeper
LESION_EDGE_DISTANCE_EDGES_MM = (1.0, 3.0)


def _safe_ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def confusion(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict[str, int]:
    """True/false positives/negatives of `prob >= threshold` against `y_true`."""
    y_true = np.asarray(y_true).astype(int)
    predicted = np.asarray(prob, dtype=float) >= threshold
    return {"tp": int(np.sum(predicted & (y_true == 1))), "fp": int(np.sum(predicted & (y_true == 0))),
            "tn": int(np.sum(~predicted & (y_true == 0))), "fn": int(np.sum(~predicted & (y_true == 1)))}


def auroc(y_true: np.ndarray, prob: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged, as sklearn), None with one class."""
    y_true = np.asarray(y_true).astype(int)
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(prob, dtype=float))
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, prob: np.ndarray) -> float | None:
    """Area under the precision-recall curve as sklearn's `average_precision_score` (step-wise, distinct
    thresholds); None with one class."""
    y_true = np.asarray(y_true).astype(int)
    if y_true.sum() == 0 or y_true.sum() == len(y_true):
        return None
    order = np.argsort(-np.asarray(prob, dtype=float), kind="mergesort")
    prob_sorted, y_sorted = np.asarray(prob, dtype=float)[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(prob_sorted)), len(y_sorted) - 1]
    tps = np.cumsum(y_sorted)[last_of_tie]
    precision = tps / (last_of_tie + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def subject_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    """AUROC, average precision and the threshold-dependent metrics of subject-level predictions.

    Returns a dict of floats (None where undefined, e.g. specificity without controls) plus the confusion
    counts and `n`, `n_positive`.
    """
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=float)
    counts = confusion(y_true, prob, threshold)
    tp, fp, tn, fn = counts["tp"], counts["fp"], counts["tn"], counts["fn"]
    sensitivity = _safe_ratio(tp, tp + fn)
    specificity = _safe_ratio(tn, tn + fp)
    ppv = _safe_ratio(tp, tp + fp)
    both = sensitivity is not None and specificity is not None
    return {
        "n": len(y_true), "n_positive": int(y_true.sum()),
        "auroc": auroc(y_true, prob),
        "average_precision": average_precision(y_true, prob),
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else None,
        "sensitivity": sensitivity, "specificity": specificity, "ppv": ppv,
        "npv": _safe_ratio(tn, tn + fn),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _safe_ratio(tp + tn, len(y_true)),
        # Calibration: mean squared gap between probability and outcome (0 perfect; 0.25 for a constant 0.5).
        "brier": float(np.mean((prob - y_true) ** 2)) if len(y_true) else None,
        **counts,
    }


def youden_threshold(y_true: np.ndarray, prob: np.ndarray) -> float:
    """The subject threshold of `THRESHOLD_RULE`: maximal sensitivity + specificity - 1.

    Candidate cuts are the midpoints between consecutive distinct probabilities (and one below the lowest and
    one above the highest), so that no participant sits exactly on the cut. Needs both classes. On a small cohort
    operating points far apart often tie on J (e.g. sensitivity 0.90 / specificity 0.65 and 0.65 / 0.90 on 20 + 20);
    the tie goes to specificity, because every false alarm is a scan a reader must clear.
    """
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=float)
    if len(np.unique(y_true)) < 2:
        raise ValueError("Youden's J needs both classes")
    values = np.unique(prob)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    positives, negatives = prob[y_true == 1], prob[y_true == 0]
    sensitivity = (positives[None, :] >= cuts[:, None]).mean(axis=1)
    specificity = (negatives[None, :] < cuts[:, None]).mean(axis=1)
    j = sensitivity + specificity - 1
    best = np.flatnonzero(np.isclose(j, j.max()))
    best = best[np.isclose(specificity[best], specificity[best].max())]
    return float(np.clip(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]], 0.0, 1.0))


def youden_threshold_ci(y_true: np.ndarray, prob: np.ndarray, n_boot: int = 1000, seed: int = 0,
                        groups: np.ndarray | None = None) -> tuple[float, float] | None:
    """95 % bootstrap interval of the `youden_threshold` cut itself, chosen again on each resample of the
    participants: J is often flat over a wide range of cuts, so a cohort of this size fixes the operating point
    only this well (on 180 synthetic participants the cut was 0.73, its interval 0.62-0.93)."""
    def cut(labels: np.ndarray, scores: np.ndarray) -> float | None:
        return youden_threshold(labels, scores) if len(np.unique(labels)) == 2 else None

    return bootstrap_ci(cut, y_true, prob, n_boot=n_boot, seed=seed, groups=groups)


def bootstrap_samples(statistic: Callable[..., object], *arrays: np.ndarray, n_boot: int = 1000,
                      seed: int = 0,
                      groups: np.ndarray | None = None) -> list:
    """`statistic(*resampled_arrays)` for `n_boot` bootstrap resamples of the rows (all arrays together).

    Whole groups are resampled when `groups` is given (participants, so that their sessions stay together).
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    if len(arrays[0]) == 0:
        return []
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(arrays[0]))]
    else:
        groups = np.asarray(groups)
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    samples = []
    for _ in range(n_boot):
        index = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        samples.append(statistic(*(a[index] for a in arrays)))
    return samples


def percentile_ci(values: Sequence[float | None], n_boot: int, level: float = 0.95) -> tuple[float,
                                                                                             float] | None:
    """Percentile interval of the defined values (None/NaN skipped); None when fewer than half are defined."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    if not defined or len(defined) < n_boot / 2:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(statistic: Callable[..., float | None], *arrays: np.ndarray, n_boot: int = 1000,
                 seed: int = 0,
                 groups: np.ndarray | None = None, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of a scalar `statistic(*arrays)`.

    Resamples where the statistic is undefined (None or NaN, e.g. AUROC with one class) are skipped; None
    when fewer than half of them are defined.
    """
    return percentile_ci(bootstrap_samples(statistic, *arrays, n_boot=n_boot, seed=seed, groups=groups),
                         n_boot,
                         level)


def _with_ci(point: dict, samples: list[dict], keys: Sequence[str], n_boot: int) -> dict:
    """Each of `keys` as {"value", "ci95"}; other entries of `point` unchanged."""
    result = dict(point)
    for key in keys:
        ci = percentile_ci([s[key] for s in samples], n_boot) if point[key] is not None else None
        result[key] = {"value": point[key], "ci95": list(ci) if ci else None}
    return result


SUBJECT_RATES = ("auroc", "average_precision", "balanced_accuracy", "sensitivity", "specificity", "ppv",
                 "npv", "f1", "accuracy", "brier")


def subject_metrics_with_ci(y_true: np.ndarray, prob: np.ndarray, threshold: float, n_boot: int = 1000,
                            seed: int = 0, groups: np.ndarray | None = None) -> dict:
    """`subject_metrics` with every rate as {"value", "ci95": [low, high] or None}; counts stay plain.

    The threshold is held fixed across resamples (it was chosen beforehand).
    """
    samples = bootstrap_samples(lambda y, p: subject_metrics(y, p, threshold), y_true, prob, n_boot=n_boot,
                                seed=seed, groups=groups)
    return _with_ci(subject_metrics(y_true, prob, threshold), samples, SUBJECT_RATES, n_boot)


# --- lesion localisation ------------------------------------------------------------------------------------


def candidate_clusters(prob: np.ndarray, voxel_threshold: float, min_voxels: int) -> tuple[np.ndarray, int]:
    """(X, Y, Z) int32 labels 1..n of the candidate clusters kept, and n: 26-connected components of
    `prob >= voxel_threshold` of at least `min_voxels` voxels. `infer.find_clusters` cuts the participant level's
    candidates with this too, so the evaluations count exactly the clusters a user is shown."""
    labels, n = ndimage.label(prob >= voxel_threshold, structure=CONNECTIVITY)
    if n == 0:
        return labels.astype(np.int32), 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(counts >= min_voxels)
    keep = keep[keep > 0]
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1)
    return relabel[labels], len(keep)


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean volumes; 1.0 when both are empty."""
    total = prediction.sum() + target.sum()
    return float(2 * np.logical_and(prediction, target).sum() / total) if total else 1.0


def lesion_case(prob: np.ndarray, lesion: np.ndarray | None, voxel_threshold: float, min_voxels: int) -> dict:
    """Localisation outcome of one participant.

    Args:
        prob: (X, Y, Z) voxel-wise FCD probability.
        lesion: (X, Y, Z) lesion mask (fraction or binary; >= 0.5 counts as lesion); an empty mask for a
        control
            (every cluster is a false positive); None when unknown (a patient without a mask).
        voxel_threshold: cut of `prob` into clusters.
        min_voxels: smallest kept cluster, in voxels of the grid.

    Returns:
        n_clusters; n_false_positive (clusters not touching the lesion; None when the lesion is unknown);
        detected (a cluster overlaps the lesion) and dice (of `prob >= voxel_threshold` against the lesion),
        both None without a non-empty lesion.
    """
    labels, n = candidate_clusters(prob, voxel_threshold, min_voxels)
    if lesion is None:
        return {"n_clusters": n, "n_false_positive": None, "detected": None, "dice": None}
    target = np.asarray(lesion) >= 0.5
    if not target.any():
        return {"n_clusters": n, "n_false_positive": n, "detected": None, "dice": None}
    hit = np.unique(labels[target & (labels > 0)])
    return {"n_clusters": n, "n_false_positive": n - len(hit), "detected": bool(len(hit)),
            "dice": dice(prob >= voxel_threshold, target)}


def _mean_of(cases: Sequence[dict], key: str) -> float | None:
    values = [c[key] for c in cases if c[key] is not None]
    return float(np.mean(values)) if values else None


def lesion_summary(cases: Sequence[dict]) -> dict:
    """Detection rate and mean Dice over participants with a lesion; false-positive clusters per participant
    whose lesion is known (controls and patients with a mask)."""
    with_lesion = [c for c in cases if c["detected"] is not None]
    return {
        "n": len(cases), "n_with_lesion": len(with_lesion),
        "detection_rate": _mean_of(with_lesion, "detected"),
        "dice": _mean_of(with_lesion, "dice"),
        "false_positives_per_participant": _mean_of(cases, "n_false_positive"),
    }


def lesion_metrics_with_ci(cases: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """`lesion_summary` with bootstrap CIs (participants resampled) on its rates."""
    rows = np.asarray(list(cases), dtype=object)
    samples = bootstrap_samples(lambda c: lesion_summary(list(c)), rows, n_boot=n_boot, seed=seed)
    return _with_ci(lesion_summary(cases), samples,
                    ("detection_rate", "dice", "false_positives_per_participant"), n_boot)


def choose_voxel_threshold(prob_maps: Sequence[np.ndarray], lesions: Sequence[np.ndarray], min_voxels: int,
                           max_false_positives: float = MAX_FP_PER_PARTICIPANT) -> float:
    """The voxel threshold of `VOXEL_THRESHOLD_RULE`.

    Why not maximal Dice: on out-of-fold maps it picked the lowest threshold on the grid and doubled the false
    candidates a reader must dismiss; detection within a false-positive budget is what the detector's targets ask.

    Args:
        prob_maps: (X, Y, Z) probability maps of participants whose lesion is known (compared in float32, as
            the predictions table counts them).
        lesions: their lesion masks on the same grid (>= 0.5 is lesion; all zero for a control).
        min_voxels: smallest kept cluster, as the participant level cuts them.
        max_false_positives: bound on the mean false-positive clusters per participant.
    """
    if not prob_maps:
        raise ValueError("no participant with a known lesion status to tune the voxel threshold on")
    mean_false_positives = []
    for threshold in VOXEL_THRESHOLDS:
        cases = [lesion_case(np.asarray(prob, dtype=np.float32), lesion, threshold, min_voxels)
                 for prob, lesion in zip(prob_maps, lesions)]
        mean_false_positives.append(float(np.mean([case["n_false_positive"] for case in cases])))
        if mean_false_positives[-1] <= max_false_positives:
            return threshold
    fewest = np.flatnonzero(np.isclose(mean_false_positives, min(mean_false_positives)))
    return VOXEL_THRESHOLDS[fewest[-1]]


def detector_figures(labels: Sequence[int], probabilities: Sequence[float], cases: Sequence[dict],
                     threshold: float) -> dict:
    """The detector's headline figures on one test set: subject AUROC, sensitivity and specificity at
    `threshold`, lesion detection, Dice, and false-positive candidate clusters per control (`cases` from
    `lesion_case`, in the order of `labels`)."""
    subject = subject_metrics(np.asarray(labels), np.asarray(probabilities), threshold)
    lesions = lesion_summary(cases)
    controls = [case["n_clusters"] for label, case in zip(labels, cases) if label == 0]
    return {"auroc": subject["auroc"], "sensitivity": subject["sensitivity"],
            "specificity": subject["specificity"], "detection_rate": lesions["detection_rate"],
            "dice": lesions["dice"],
            "false_positive_clusters_per_control": float(np.mean(controls)) if controls else None}


def detector_figures_ci(labels: Sequence[int], probabilities: Sequence[float], cases: Sequence[dict],
                        threshold: float, groups: Sequence[str] | None = None, n_boot: int = 1000,
                        seed: int = 0) -> dict[str, list[float] | None]:
    """95 % percentile-bootstrap interval of each of `detector_figures` (None where undefined).

    Test sets here are small (tens of participants): the interval says how far a figure could move on another
    draw of the same size. `groups` resamples related rows together (several implants in one real brain, two
    sessions of one person), so that they do not count as independent evidence.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    cases = np.asarray(list(cases), dtype=object)
    samples = bootstrap_samples(lambda y, p, c: detector_figures(y, p, list(c), threshold), labels, probabilities,
                                cases, n_boot=n_boot, seed=seed,
                                groups=None if groups is None else np.asarray(groups))
    point = detector_figures(labels, probabilities, list(cases), threshold)
    return {key: entry["ci95"] for key, entry in _with_ci(point, samples, list(point), n_boot).items()}


def froc_case(prob: np.ndarray, lesion: np.ndarray, min_voxels: int,
              thresholds: Sequence[float] = VOXEL_THRESHOLDS) -> dict[str, list]:
    """One participant's outcome at every voxel threshold: {"detected": [...], "n_clusters": [...]} (detected
    None for a control), the raw material of `froc`. `lesion` is known here: all zero for a control."""
    cases = [lesion_case(prob, lesion, threshold, min_voxels) for threshold in thresholds]
    return {"detected": [case["detected"] for case in cases], "n_clusters": [case["n_clusters"] for case in cases]}


def froc(labels: Sequence[int], froc_cases: Sequence[dict], thresholds: Sequence[float] = VOXEL_THRESHOLDS,
         fp_budgets: Sequence[float] = FROC_FP_BUDGETS) -> dict:
    """Free-response operating characteristic: lesion detection against false-positive clusters per control at
    each voxel threshold, and the best detection any threshold gives within each budget of false positives.

    Why: one voxel threshold shows one operating point; a reader choosing how many false candidates to dismiss, or
    an engineer asking whether a missed lesion is a threshold question or a model question, needs the curve. A
    flat curve (no threshold finds more) means the model does not see the lesions.

    Args:
        labels: 1 for a participant with a lesion, 0 for a control, in the order of `froc_cases`.
        froc_cases: from `froc_case` at `thresholds`.

    Returns:
        points: [{voxel_threshold, detection_rate, false_positive_clusters_per_control}] (rates None where the
        test set has no lesion or no control); detection_within_fp: {budget: best detection_rate of the points
        whose false positives per control are <= budget, None where no point is}.
    """
    patients = [case for label, case in zip(labels, froc_cases) if label == 1]
    controls = [case for label, case in zip(labels, froc_cases) if label == 0]
    points = []
    for index, threshold in enumerate(thresholds):
        points.append({
            "voxel_threshold": float(threshold),
            "detection_rate": float(np.mean([bool(c["detected"][index]) for c in patients])) if patients else None,
            "false_positive_clusters_per_control": (float(np.mean([c["n_clusters"][index] for c in controls]))
                                                    if controls else None),
        })
    within = {}
    for budget in fp_budgets:
        rates = [p["detection_rate"] for p in points if p["detection_rate"] is not None
                 and p["false_positive_clusters_per_control"] is not None
                 and p["false_positive_clusters_per_control"] <= budget]
        within[f"{budget:g}"] = max(rates) if rates else None
    return {"points": points, "detection_within_fp": within}


def missed_lesions(detected: Sequence[bool], peaks: Sequence[float]) -> dict:
    """The missed lesions split by why: `unseen` (map peak inside the lesion under `UNSEEN_PEAK`: a model
    question) and `under_the_cut` (a higher peak, but no kept cluster there: a threshold or cluster-size question)."""
    missed = [peak for found, peak in zip(detected, peaks) if not found]
    unseen = int(sum(peak < UNSEEN_PEAK for peak in missed))
    return {"n": len(missed), "unseen": unseen, "under_the_cut": len(missed) - unseen}


def band_labels(edges: Sequence[float], unit: str) -> list[str]:
    """The names of the bands that ascending `edges` cut: "< 1 mL", "1-3 mL", ">= 3 mL"."""
    return [f"< {edges[0]:g} {unit}", *(f"{low:g}-{high:g} {unit}" for low, high in itertools.pairwise(edges)),
            f">= {edges[-1]:g} {unit}"]


def band_label(value: float, edges: Sequence[float], unit: str) -> str:
    """The name of the band that holds `value` (a value on an edge belongs to the band above it)."""
    return band_labels(edges, unit)[bisect.bisect_right(edges, value)]


def band_members(values: Sequence[float | None], edges: Sequence[float], unit: str) -> dict[str, list[int]]:
    """{band name: indices of the values in it}, every band present, smallest first; None values in none."""
    members: dict[str, list[int]] = {band: [] for band in band_labels(edges, unit)}
    for index, value in enumerate(values):
        if value is not None:
            members[band_label(value, edges, unit)].append(index)
    return members


def detection_by_band(values: Sequence[float], detected: Sequence[bool], edges: Sequence[float],
                      unit: str) -> dict:
    """Lesion detection rate per band of a lesion measure ({band: {"n", "detection_rate"}}), e.g. volume
    (`LESION_VOLUME_EDGES_ML`): small lesions are the ones a detector misses first, and a single rate hides it."""
    return {band: {"n": len(indices),
                   "detection_rate": float(np.mean([bool(detected[i]) for i in indices])) if indices else None}
            for band, indices in band_members(values, edges, unit).items()}


def by_group(groups: np.ndarray, compute: Callable[[np.ndarray], dict], min_size: int = 2) -> dict:
    """`compute(row_mask)` for every level of `groups` (sites, acquisitions) with at least `min_size` rows."""
    groups = np.asarray(groups).astype(str)
    levels, counts = np.unique(groups, return_counts=True)
    return {str(level): compute(groups == level) for level, count in zip(levels, counts) if count >= min_size}


def lesion_conspicuity(flair: np.ndarray | None, lesion: np.ndarray, brain: np.ndarray, spacing_mm: float) -> dict:
    """How large and how bright a lesion is as the model sees it, so that misses can be told apart by cause.

    The template (`MNI152NLin2009aSym`) is symmetric and the model grid is centred on its midline, so the
    lesion's mirror across the midline (axis 0 flipped) is its healthy homologue: the FLAIR contrast is the
    median FLAIR in the lesion minus the median FLAIR in that homologue, in robust SDs of the brain's FLAIR.
    FCD type II is FLAIR-bright, so a faint lesion scores near 0.

    Args:
        flair: (X, Y, Z) normalised FLAIR on the model grid; None for a model without FLAIR (no contrast).
        lesion: (X, Y, Z) lesion mask (>= 0.5 counts), not empty.
        brain: (X, Y, Z) brain mask.
        spacing_mm: isotropic voxel size of the grid.

    Returns:
        volume_ml; flair_contrast (None without FLAIR or when the mirrored region falls outside the brain);
        edge_distance_mm, how deep the lesion's shallowest voxel lies inside the brain mask (0 where the lesion
        crosses the mask's edge, as a lesion of the convexity's cortex may): on a calibration cohort the shipped
        model's map was silent on lesions at the poles (crossing it) and on the medial surface (deep in it), large
        and bright ones among them.
    """
    target = np.asarray(lesion) >= 0.5
    brain = np.asarray(brain) > 0
    if not target.any():
        raise ValueError("lesion_conspicuity needs a non-empty lesion mask")
    volume_ml = float(target.sum() * spacing_mm ** 3 / 1000.0)
    edge_distance_mm = float(ndimage.distance_transform_edt(brain)[target].min() * spacing_mm)
    mirror = np.flip(target, axis=0) & brain & ~target
    if flair is None or not mirror.any():
        return {"volume_ml": volume_ml, "flair_contrast": None, "edge_distance_mm": edge_distance_mm}
    spread = float(median_abs_deviation(flair[brain], scale="normal"))
    contrast = float(np.median(flair[target])) - float(np.median(flair[mirror]))
    return {"volume_ml": volume_ml, "flair_contrast": contrast / spread if spread > 0 else None,
            "edge_distance_mm": edge_distance_mm}
