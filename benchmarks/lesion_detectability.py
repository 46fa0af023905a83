"""How well could the simulated lesions be found at all? A known-shape reference detector beside the model card.

    PYTHONPATH=. python benchmarks/lesion_detectability.py [--n_synthetic_heads 8] [--out F]

The model card's real-anatomy column puts 3 FCD-like implants into each of 8 unseen real brains (the same draws
here: `evaluate_default_model.evaluate_real`'s seed and order); the synthetic reference puts 3 into each of the
first `--n_synthetic_heads` controls of the card's synthetic cohort (its preprocessed inputs, from that benchmark's
cache). For each implant, a matched filter that is told the lesion's exact shape and contrast (the implanted
change itself) scores every position of the brain without the lesion, and the lesion's own position with it:

- both channels high-passed inside the brain (a Gaussian of `--background_sigma_vox` removed), so the filter sees
  local contrast, not whether it sits in grey or white matter; each channel weighted by 1 / its noise variance
  (robust SD of the high-passed brain);
- the scores are z-scored over the positions a lesion may lie at (the neocortical territory, inside the brain);
  the lesion is found at threshold t when its own score reaches t; false positives at t are the clusters of the
  lesion-free brain's score map at or above t.

Its free-response curve (`bids_fcd.evaluate.froc`) is read against the card's. It is a reference, not a bound: it
knows what no detector knows (the lesion's exact shape and where to look for its own score), but a linear filter is
not the best detector in anatomy's non-Gaussian background. Read it as: where even this filter finds an implant
only among many false positives, the image holds little that sets it apart at that budget, and a target there asks
for more than the image gives; where it finds the implants and the model does not, the model is the limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.stats import median_abs_deviation

from bids_fcd.cache import load_or_preprocess
from bids_fcd.config import DEFAULT_N_PASSES
from bids_fcd.evaluate import CONNECTIVITY, FROC_FP_BUDGETS, VOXEL_THRESHOLDS, froc, froc_case
from bids_fcd.infer import predict
from bids_fcd.inputs import discover
from bids_fcd.models import load_checkpoint
from bids_fcd.synth import neocortical_territory
from bids_fcd.template import model_grid

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_default_model",
                                               REPO / "benchmarks" / "evaluate_default_model.py")
card_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(card_benchmark)

Z_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(2.0, 12.01, 0.25), 2))


def high_pass(volume: np.ndarray, brain: np.ndarray, sigma_vox: float) -> np.ndarray:
    """`volume` minus its local mean inside the brain (normalised convolution, so the brain's edge adds nothing)."""
    inside = brain.astype(np.float32)
    local = ndimage.gaussian_filter(volume * inside, sigma_vox) / np.maximum(ndimage.gaussian_filter(inside, sigma_vox),
                                                                            1e-3)
    return ((volume - local) * inside).astype(np.float32)


def filter_outcome(before: np.ndarray, after: np.ndarray, brain: np.ndarray, candidates: np.ndarray,
                   sigma_vox: float) -> tuple[float, list[int]]:
    """(the lesion's z-score, false-positive clusters of the lesion-free score map at each of Z_THRESHOLDS).

    before, after: (C, X, Y, Z) channels without and with the implant; candidates: where scores are z-scored and
    false positives counted.
    """
    high_before = np.stack([high_pass(channel, brain, sigma_vox) for channel in before])
    high_after = np.stack([high_pass(channel, brain, sigma_vox) for channel in after])
    signal = high_after - high_before  # the implant as the high-passed image shows it (high_pass is linear)
    changed = np.abs(after - before).sum(axis=0) > 1e-6
    box = ndimage.find_objects(changed.astype(np.int8))[0]
    weights = [1.0 / float(median_abs_deviation(channel[brain], scale="normal")) ** 2 for channel in high_before]
    score_map = np.zeros(brain.shape, np.float32)
    lesion_score = lesion_site_score = 0.0
    for template, image, image_after, weight in zip(signal[(slice(None), *box)], high_before, high_after, weights):
        score_map += weight * fftconvolve(image, template[::-1, ::-1, ::-1], mode="same").astype(np.float32)
        lesion_score += weight * float((template * image_after[box]).sum())
        lesion_site_score += weight * float((template * image[box]).sum())
    centre = tuple(s.start + (s.stop - s.start) // 2 for s in box)  # where "same" mode aligns the template
    if not np.isclose(score_map[centre], lesion_site_score, rtol=1e-3, atol=1e-6 * abs(lesion_score)):
        raise RuntimeError("the score map and the lesion's own score are not aligned")
    null = score_map[candidates]
    location, spread = float(np.median(null)), float(median_abs_deviation(null, scale="normal"))
    z_map = np.where(candidates, (score_map - location) / spread, -np.inf)
    false_positives = [int(ndimage.label(z_map >= t, structure=CONNECTIVITY)[1]) for t in Z_THRESHOLDS]
    lesion_z = (lesion_score - location) / spread
    return float(lesion_z), false_positives


def model_froc_case(model, config, channels: np.ndarray, brain: np.ndarray, lesion: np.ndarray, seed: int) -> dict:
    """The model's outcome at every voxel threshold, its map made as the participant level makes it (the card's
    benchmark seeds the dropout passes with its seed)."""
    prediction = predict(model, config, channels, brain, torch.device("cpu"), n_passes=DEFAULT_N_PASSES, seed=seed)
    return froc_case(prediction.prob_template, lesion, config.min_cluster_voxels)


def measure(name: str, pre, grid, rng, n: int, exclude: bool, sigma_vox: float, model, config,
            seed: int) -> list[dict]:
    """The head as it is (label 0: the model's false positives) and `n` implants (label 1), each judged by the
    model and by the known-shape filter."""
    brain = pre.brain_mask.astype(bool)
    candidates = neocortical_territory(grid) & ndimage.binary_erosion(brain, iterations=2)
    before = np.stack([pre.t1w, pre.flair])
    rows = [{"case": f"{name} as is", "label": 0,
             "model": model_froc_case(model, config, before, brain, np.zeros(grid.shape, np.uint8), seed)}]
    for index, (params, t1w, flair, lesion) in enumerate(card_benchmark.head_implants(pre, grid, rng, n, exclude)):
        after = np.stack([t1w, flair])
        lesion_z, false_positives = filter_outcome(before, after, brain, candidates, sigma_vox)
        rows.append({"case": f"{name} implant {index + 1}", "label": 1, "flair_gain": round(params.flair_gain, 3),
                     "volume_ml": round(params.volume_ml, 2), "lesion_z": round(lesion_z, 2),
                     "filter_false_positives": false_positives,
                     "model": model_froc_case(model, config, after, brain, lesion, seed)})
        print(f"{rows[-1]['case']}: gain {params.flair_gain:.2f}, {params.volume_ml:.1f} mL, filter z {lesion_z:.1f}",
              flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Both free-response curves' best detection within each false-positive budget, on the same implants."""
    implants = [r for r in rows if r["label"] == 1]
    found = [{"detected": [r["lesion_z"] >= t for t in Z_THRESHOLDS], "n_clusters": [0] * len(Z_THRESHOLDS)}
             for r in implants]
    nulls = [{"detected": [None] * len(Z_THRESHOLDS), "n_clusters": r["filter_false_positives"]} for r in implants]
    known_shape_filter = froc([1] * len(found) + [0] * len(nulls), found + nulls, thresholds=Z_THRESHOLDS)
    model = froc([r["label"] for r in rows], [r["model"] for r in rows])
    return {"n_implants": len(implants), "n_controls": len(rows) - len(implants),
            "known_shape_filter_detection_within_fp": known_shape_filter["detection_within_fp"],
            "model_detection_within_fp": model["detection_within_fp"],
            "median_lesion_z": float(np.median([r["lesion_z"] for r in implants]))}


def at_threshold(row: dict, config) -> dict:
    """A case as written out: the model's outcome at its own voxel threshold, no per-threshold lists."""
    index = VOXEL_THRESHOLDS.index(config.voxel_threshold)
    compact = {k: v for k, v in row.items() if k not in ("model", "filter_false_positives")}
    return {**compact, "model_detected": row["model"]["detected"][index],
            "model_clusters": row["model"]["n_clusters"][index]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "bids_fcd" / "weights" / "model.pt")
    parser.add_argument("--seed", type=int, default=2026, help="the model card benchmark's seed: its implants")
    parser.add_argument("--work_dir", type=Path, default=REPO / "work" / "evaluate_default_model",
                        help="the model card benchmark's work folder (its preprocessing caches)")
    parser.add_argument("--n_synthetic_heads", type=int, default=8)
    parser.add_argument("--background_sigma_vox", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lesion_detectability.json")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(2)
    model, config = load_checkpoint(args.model)
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    real_rng = np.random.default_rng(args.seed)  # evaluate_real's stream: the card's very implants
    real = []
    for folder, t1w_name, flair_name in card_benchmark.UNSEEN_REAL:
        pre = load_or_preprocess(args.work_dir / "real_cache", card_benchmark.REAL / folder / t1w_name,
                                 card_benchmark.REAL / folder / flair_name, grid, n_threads=2)
        real += measure(f"{folder}/{t1w_name.split('_T1w')[0]}", pre, grid, real_rng, 3, True,
                        args.background_sigma_vox, model, config, args.seed)

    bids_dir = args.work_dir / f"synthetic_n100_seed{args.seed}_bids"
    out_dir = args.work_dir / f"synthetic_n100_seed{args.seed}_out"
    synthetic_rng = np.random.default_rng(args.seed + 1)
    synthetic = []
    for unit in [u for u in discover(bids_dir) if u.label == 0][:args.n_synthetic_heads]:
        pre = load_or_preprocess(out_dir / "cache", unit.t1w, unit.flair, grid)
        synthetic += measure(unit.name, pre, grid, synthetic_rng, 3, False, args.background_sigma_vox, model, config,
                             args.seed)

    result = {"model": str(args.model), "z_thresholds": list(Z_THRESHOLDS), "fp_budgets": list(FROC_FP_BUDGETS),
              "background_sigma_vox": args.background_sigma_vox,
              "real_anatomy": summary(real), "synthetic_heads": summary(synthetic),
              "cases": {"real_anatomy": [at_threshold(r, config) for r in real],
                        "synthetic_heads": [at_threshold(r, config) for r in synthetic]},
              "machine": {"platform": platform.platform(), "cpus": 2, "torch": torch.__version__},
              "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("real_anatomy", "synthetic_heads", "seconds")},
                     indent=2))


if __name__ == "__main__":
    main()
