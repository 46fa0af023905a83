"""Recompute the shipped model's figures for bids_fcd/weights/MODEL_CARD.md.

    python benchmarks/evaluate_default_model.py [--model bids_fcd/weights/model.pt] [--n_synthetic 10]

Two test sets, neither seen in training:
1. A held-out synthetic cohort (`bids_fcd synth`, another seed) run through the whole participant level
   (`run.py ... participant`: preprocessing from raw native-space images included).
2. Real brains the model never trained on (stroke-cstar01, both ms-longitudinal-raw sessions, the five
   glioma-brats2013 brains): preprocessed by the pipeline, predicted as they are (their real stroke, MS and
   glioma lesions are not FCD: they must be called control), and again with FCD-like lesions implanted in
   template space away from their own lesions, for detection on real anatomy.

Metrics (bids_fcd.evaluate): subject AUROC, sensitivity and specificity at the model's threshold, lesion
detection rate (a candidate cluster overlapping the lesion), false-positive clusters per control, Dice, and how
often the saliency peak lands in the lesion (within 1 voxel). Results go to benchmarks/results/model_card.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from bids_fcd.cache import load_or_preprocess
from bids_fcd.cli import main as run_app
from bids_fcd.evaluate import lesion_case, lesion_summary, subject_metrics
from bids_fcd.infer import predict
from bids_fcd.inputs import discover
from bids_fcd.lesions import bright_lesion_region, implant_fcd, sample_lesion_params, tissue_probabilities
from bids_fcd.models import load_checkpoint
from bids_fcd.preprocess import mask_to_template
from bids_fcd.synth import make_cohort, neocortical_territory
from bids_fcd.template import model_grid

log = logging.getLogger("evaluate_default_model")
REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
UNSEEN_REAL = [
    ("stroke-cstar01", "sub-cstar01_T1w.nii.gz", "sub-cstar01_FLAIR.nii.gz"),
    ("ms-longitudinal-raw", "sub-msl12_ses-study1_T1w.nii.gz", "sub-msl12_ses-study1_FLAIR.nii.gz"),
    ("ms-longitudinal-raw", "sub-msl12_ses-study2_T1w.nii.gz", "sub-msl12_ses-study2_FLAIR.nii.gz"),
    *[("glioma-brats2013", f"sub-brats2013pat000{i}_ce-gd_desc-zscore_T1w.nii.gz",
       f"sub-brats2013pat000{i}_desc-zscore_FLAIR.nii.gz") for i in range(1, 6)],
]


def saliency_in_lesion(saliency: np.ndarray, lesion: np.ndarray) -> bool:
    """Whether the saliency maximum lies in the lesion grown by one voxel."""
    peak = np.unravel_index(np.argmax(saliency), saliency.shape)
    return bool(ndimage.binary_dilation(lesion >= 0.5)[peak])


def summarise(rows: list[dict], threshold: float) -> dict:
    labels = np.array([r["label"] for r in rows])
    probs = np.array([r["fcd_probability"] for r in rows])
    subject = subject_metrics(labels, probs, threshold)
    lesions = lesion_summary([r["lesion_case"] for r in rows])
    patients = [r for r in rows if r["label"] == 1]
    controls = [r for r in rows if r["label"] == 0]
    return {
        "n": len(rows), "n_fcd": len(patients), "n_control": len(controls),
        "auroc": subject["auroc"], "sensitivity": subject["sensitivity"], "specificity": subject["specificity"],
        "detection_rate": lesions["detection_rate"], "dice": lesions["dice"],
        "false_positive_clusters_per_control": (float(np.mean([r["lesion_case"]["n_clusters"] for r in controls]))
                                                if controls else None),
        "saliency_peak_in_lesion": (float(np.mean([r["saliency_in_lesion"] for r in patients]))
                                    if patients else None),
    }


def evaluate_synthetic(model_path: Path, work: Path, n: int, seed: int, n_cpus: int) -> list[dict]:
    """The whole participant level on a fresh synthetic cohort; metrics read back from its outputs."""
    bids_dir, out = work / "synthetic_bids", work / "synthetic_out"
    if not bids_dir.exists():
        make_cohort(bids_dir, n=n, seed=seed)
    code = run_app([str(bids_dir), str(out), "participant", "--model", str(model_path), "--n_cpus", str(n_cpus)])
    if code != 0:
        raise RuntimeError(f"participant level exited {code}")
    _, config = load_checkpoint(model_path)
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    min_voxels = max(1, int(np.ceil(config.min_cluster_mm3 / grid.voxel_volume_mm3)))
    rows = []
    for unit in discover(bids_dir):
        pre = load_or_preprocess(out / "cache", unit.t1w, unit.flair, grid)
        anat = out / f"sub-{unit.subject}" / "anat"
        prediction = json.loads(next(anat.glob("*_desc-fcd_prediction.json")).read_text())
        prob = nib.load(next(anat.glob("*_space-MNI152NLin2009aSym_label-FCD_probseg.nii.gz"))).get_fdata()
        saliency = nib.load(next(anat.glob("*_space-*_desc-saliency_probseg.nii.gz"))).get_fdata()
        lesion = (mask_to_template(unit.lesion_mask, unit.lesion_mask_space, pre, unit.t1w, unit.flair)
                  if unit.lesion_mask else np.zeros(grid.shape))
        rows.append({"case": unit.name, "label": unit.label, "fcd_probability": prediction["fcd_probability"],
                     "lesion_case": lesion_case(prob, lesion, config.voxel_threshold, min_voxels),
                     "saliency_in_lesion": saliency_in_lesion(saliency, lesion) if unit.label else None})
    return rows


def evaluate_real(model_path: Path, work: Path, implants: int, seed: int) -> list[dict]:
    """Unseen real brains as they are (controls) and with implanted FCD-like lesions (patients)."""
    model, config = load_checkpoint(model_path)
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    min_voxels = max(1, int(np.ceil(config.min_cluster_mm3 / grid.voxel_volume_mm3)))
    territory = neocortical_territory(grid)
    rng = np.random.default_rng(seed)
    device = torch.device("cpu")
    rows = []
    for folder, t1w_name, flair_name in UNSEEN_REAL:
        pre = load_or_preprocess(work / "real_cache", REAL / folder / t1w_name, REAL / folder / flair_name, grid,
                                 n_threads=2)
        brain = pre.brain_mask.astype(bool)
        gm, wm = tissue_probabilities(pre.t1w, brain, seed=0)
        own_lesion = bright_lesion_region(pre.flair, brain, grid.spacing_mm)
        cases = [("as is", pre.t1w, pre.flair, np.zeros(grid.shape, np.uint8), 0)]
        for index in range(implants):
            params = sample_lesion_params(rng, gm, wm, grid.spacing_mm, exclude_mask=own_lesion,
                                          territory_mask=territory)
            t1w, flair, lesion = implant_fcd(pre.t1w, pre.flair, gm, wm, params, grid.spacing_mm)
            cases.append((f"implant {index + 1}", t1w, flair, lesion, 1))
        for what, t1w, flair, lesion, label in cases:
            prediction = predict(model, config, np.stack([t1w, flair]), brain, device, n_passes=2, seed=seed)
            rows.append({"case": f"{folder}/{t1w_name.split('_T1w')[0]} {what}", "label": label,
                         "fcd_probability": prediction.fcd_probability,
                         "lesion_case": lesion_case(prediction.prob_template, lesion, config.voxel_threshold,
                                                    min_voxels),
                         "saliency_in_lesion": (saliency_in_lesion(prediction.saliency_template, lesion)
                                                if label else None)})
            log.info("%s: p=%.3f clusters=%d", rows[-1]["case"], prediction.fcd_probability,
                     rows[-1]["lesion_case"]["n_clusters"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "bids_fcd" / "weights" / "model.pt")
    parser.add_argument("--work_dir", type=Path, default=REPO / "work" / "evaluate_default_model")
    parser.add_argument("--n_synthetic", type=int, default=10)
    parser.add_argument("--implants", type=int, default=3, help="implanted lesions per unseen real brain")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--n_cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model_card.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.n_cpus)
    started = time.time()
    _, config = load_checkpoint(args.model)
    real_rows = evaluate_real(args.model, args.work_dir, args.implants, args.seed)
    synthetic_rows = evaluate_synthetic(args.model, args.work_dir, args.n_synthetic, args.seed, args.n_cpus)
    real_controls = [r for r in real_rows if r["label"] == 0]
    result = {
        "model": str(args.model), "model_name": config.name, "model_version": config.model_version,
        "subject_threshold": config.subject_threshold, "voxel_threshold": config.voxel_threshold,
        "synthetic_full_pipeline": summarise(synthetic_rows, config.subject_threshold),
        "real_anatomy_with_implants": summarise(real_rows, config.subject_threshold),
        "real_non_fcd_brains": {r["case"]: {"fcd_probability": round(r["fcd_probability"], 3),
                                            "called": ("fcd" if r["fcd_probability"] >= config.subject_threshold
                                                       else "control"),
                                            "candidate_clusters": r["lesion_case"]["n_clusters"]}
                                for r in real_controls},
        "cases": [{k: v for k, v in r.items()} for r in synthetic_rows + real_rows],
        "machine": {"platform": platform.platform(), "cpus": args.n_cpus, "torch": torch.__version__},
        "seconds": round(time.time() - started),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("synthetic_full_pipeline", "real_anatomy_with_implants",
                                             "real_non_fcd_brains")}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
