"""Registration accuracy under known head motion, on the real volumes in ../shared/data/real.

1. FLAIR -> T1w (`register_flair_to_t1w`) on the real pairs stored co-registered on one grid (two
   glioma-brainlesion brains, the stroke brain, the five glioma-brats2013 brains): the FLAIR is moved by each of
   `MOTIONS` (up to 30 degrees and 8 mm), so the true transform is that motion; the error is how far the fit
   puts the T1w's brain voxels from where the truth puts them.
2. T1w -> template (`register_t1w_to_template`): no truth exists, so consistency: the fit of a moved head
   must equal the upright head's fit, moved.

Prints a row per case and a summary, and writes benchmarks/results/registration.json.

    python benchmarks/bench_registration.py [--random_sampling 0.1] [--out FILE]

`--random_sampling F` measures the metric sampling used before 2026-12-04 (F of the voxels at random) in place of
`preprocess.REGISTRATION_SAMPLING` on a jittered grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bids_fcd import preprocess as P
from tests.fixtures_real import distances_mm, write_moved_about_centre

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
BRATS2013 = [(f"glioma-brats2013/sub-brats2013pat000{i}_ce-gd_desc-zscore_T1w.nii.gz",
              f"glioma-brats2013/sub-brats2013pat000{i}_desc-zscore_FLAIR.nii.gz") for i in range(1, 6)]
CO_REGISTERED_PAIRS = [
    ("glioma-brainlesion/sub-bratsgli00001_T1w.nii.gz", "glioma-brainlesion/sub-bratsgli00001_FLAIR.nii.gz"),
    ("glioma-brainlesion/sub-tcgadu7294_T1w.nii.gz", "glioma-brainlesion/sub-tcgadu7294_FLAIR.nii.gz"),
    ("stroke-cstar01/sub-cstar01_T1w.nii.gz", "stroke-cstar01/sub-cstar01_FLAIR.nii.gz"),
    *BRATS2013,
]
TEMPLATE_CASES = [t1w for t1w, _ in CO_REGISTERED_PAIRS[:3]] + [BRATS2013[i][0] for i in (0, 2, 4)]
# (x, y, z Euler degrees, shift mm) about the image centre, as a head moves between or before scans
MOTIONS = [((25, 12.5, 0), (5, -5, 5)), ((-25, 0, 10), (-4, 6, 0)), ((0, 25, -10), (3, 3, -6)),
           ((20, -20, 0), (0, -8, 4)), ((10, 5, 0), (2, 2, 2)), ((30, 0, 15), (-5, 0, 5))]


def errors_mm(found: np.ndarray, expected: np.ndarray, points_lps: np.ndarray) -> dict:
    """Max and median distance (mm) between two 4x4 LPS transforms' images of (4, n) homogeneous points."""
    distance = distances_mm(found, expected, points_lps)
    return {"max_mm": round(float(distance.max()), 2), "median_mm": round(float(np.median(distance)), 2)}


def brain_points(image: sitk.Image, mask: sitk.Image, every: int) -> np.ndarray:
    """(4, n) homogeneous LPS mm points of every `every`-th voxel of `mask` on `image`'s grid."""
    index = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[::every][:, ::-1]  # (n, 3) x, y, z
    points = np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in i]) for i in index])
    return np.c_[points, np.ones(len(points))].T


def load_brain(path: Path) -> tuple[sitk.Image, sitk.Image]:
    """(bias-corrected T1w, its brain mask), as preprocessing makes them."""
    t1w = P.n4_bias_correct(P._to_sitk(*P.load_ras(path)))
    mask, _ = P.extract_brain(t1w)
    return t1w, mask


def flair_rows(folder: Path) -> list[dict]:
    rows = []
    for t1w_name, flair_name in CO_REGISTERED_PAIRS:
        t1w, mask = load_brain(REAL / t1w_name)
        points = brain_points(t1w, mask, every=500)
        for degrees, shift_mm in [((0, 0, 0), (0, 0, 0)), *MOTIONS]:
            moved, motion = write_moved_about_centre(REAL / flair_name, degrees, shift_mm,
                                                     folder / Path(flair_name).name)
            flair = P.n4_bias_correct(P._to_sitk(*P.load_ras(moved)))
            start = time.perf_counter()
            found = P.transform_matrix(P.register_flair_to_t1w(t1w, flair, mask))
            seconds = time.perf_counter() - start
            truth = P.LPS_FROM_RAS @ motion @ P.LPS_FROM_RAS  # T1w LPS -> moved FLAIR LPS
            rows.append({"pair": flair_name, "motion": [degrees, shift_mm], "seconds": round(seconds, 2),
                         **errors_mm(found, truth, points)})
            print(rows[-1], flush=True)
    return rows


def template_rows(folder: Path) -> list[dict]:
    rows = []
    target = P._template_registration_target()
    points = brain_points(target, sitk.Cast(target > 0, sitk.sitkUInt8), every=200)
    for t1w_name in TEMPLATE_CASES:
        upright = None
        for degrees, shift_mm in [((0, 0, 0), (0, 0, 0)), *MOTIONS[:3]]:
            moved, motion = write_moved_about_centre(REAL / t1w_name, degrees, shift_mm, folder / Path(t1w_name).name)
            t1w, mask = load_brain(moved)
            start = time.perf_counter()
            found = P.transform_matrix(P.register_t1w_to_template(sitk.Mask(t1w, mask)))
            seconds = time.perf_counter() - start
            if upright is None:
                upright = found
                continue
            expected = P.LPS_FROM_RAS @ motion @ P.LPS_FROM_RAS @ upright  # template LPS -> moved T1w LPS
            rows.append({"t1w": t1w_name, "motion": [degrees, shift_mm], "seconds": round(seconds, 2),
                         **errors_mm(found, expected, points)})
            print(rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    maxima = [row["max_mm"] for row in rows]
    return {"n": len(rows), "worst_max_mm": max(maxima), "median_of_max_mm": round(statistics.median(maxima), 2),
            "n_over_1mm": sum(m > 1.0 for m in maxima),
            "mean_seconds": round(statistics.mean(row["seconds"] for row in rows), 2)}


def with_random_sampling(fraction: float) -> None:
    """Swap the registrations' metric sampling for `fraction` of the voxels at random (the earlier rule)."""
    grid_sampled = P._registration_method

    def random_sampled(shrink, sigmas_mm):
        method = grid_sampled(shrink, sigmas_mm)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(fraction, P.REGISTRATION_SEED)
        return method

    P._registration_method = random_sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random_sampling", type=float, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "registration.json")
    args = parser.parse_args()
    if args.random_sampling is not None:
        with_random_sampling(args.random_sampling)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # as preprocessing registers
    with tempfile.TemporaryDirectory() as folder:
        flair, template = flair_rows(Path(folder)), template_rows(Path(folder))
    sampling = (f"{args.random_sampling} random" if args.random_sampling is not None
                else f"{P.REGISTRATION_SAMPLING} regular")
    result = {"metric_sampling": sampling, "machine": f"{platform.processor() or platform.machine()}, 1 thread",
              "flair_to_t1w_vs_truth": summary(flair), "t1w_to_template_moved_vs_upright": summary(template),
              "flair_rows": flair, "template_rows": template}
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("rows")}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
