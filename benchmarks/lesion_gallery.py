"""Gallery of simulated FCD type II, subtle to obvious, of the non-FCD mimics, and the cost of implanting one.

Implants lesions of increasing severity into one lesion-free synthetic brain on the default model grid (already
normalised, as the training code will do with real brains), and draws T1w and FLAIR crops through each lesion,
with and without the mask's outline. A second figure shows one of each non-FCD mimic (`bids_fcd.mimics`) that
the shipped model is taught not to call FCD. Also times `implant_fcd` (8 mL lesions, the largest) and the generation of a
4-participant cohort.

    PYTHONPATH=. python benchmarks/lesion_gallery.py [--figure docs/figures/synthetic_lesions.png]
        [--mimic_figure docs/figures/lesion_mimics.png]

Prints and saves timings as JSON (benchmarks/results/lesion_gallery.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib import pyplot as plt

from bids_fcd.config import ModelConfig
from bids_fcd.lesions import LesionParams, implant_fcd, sample_lesion_params
from bids_fcd.mimics import MIMIC_KINDS, implant_mimic
from bids_fcd.preprocess import normalise_intensity
from bids_fcd.synth import make_cohort, neocortical_territory, synth_template_sample, template_tissue_maps
from bids_fcd.template import model_grid

SEVERITIES = (0.1, 0.35, 0.65, 1.0)
CROP_MM = 72.0
# Display windows on the normalised intensities (brain 1st..99th percentile -> 0..1), narrow as a reader sets them.
WINDOWS = ((0.1, 1.1), (0.2, 1.3))
ROOT = Path(__file__).resolve().parents[1]


def _tail_in_plane(params: LesionParams) -> bool:
    if not params.transmantle or params.transmantle_target_vox is None:
        return False
    return int(np.abs(np.subtract(params.transmantle_target_vox, params.centre_vox)).min()) <= 2


def _best_view(mask: np.ndarray, params: LesionParams) -> tuple[tuple[int, int, int], int]:
    """Where to cut: through a transmantle tail's plane when there is one, else through the lesion's centroid
    along the axis whose slice holds the most lesion voxels. Returns the voxel the crop is centred on and the axis."""
    if params.transmantle and params.transmantle_target_vox is not None:
        direction = np.subtract(params.transmantle_target_vox, params.centre_vox)
        midpoint = np.add(params.transmantle_target_vox, params.centre_vox) // 2
        axis = int(np.argmin(np.abs(direction)))
        centre = tuple(int(m) if a != axis else params.centre_vox[a] for a, m in enumerate(midpoint))
        return centre, axis
    centre = tuple(round(float(c)) for c in np.argwhere(mask).mean(axis=0))
    areas = [np.take(mask, centre[axis], axis=axis).sum() for axis in range(3)]
    return centre, int(np.argmax(areas))


def _crop(volume: np.ndarray, centre: tuple[int, int, int], axis: int, half_vox: int) -> np.ndarray:
    plane = np.take(volume, centre[axis], axis=axis)
    in_plane = [c for a, c in enumerate(centre) if a != axis]
    padded = np.pad(plane, half_vox)
    return padded[in_plane[0] : in_plane[0] + 2 * half_vox, in_plane[1] : in_plane[1] + 2 * half_vox]


def draw_mimics(rng: np.random.Generator, grid, tissue: tuple[np.ndarray, ...], brain: np.ndarray,
                gm: np.ndarray, wm: np.ndarray, path: Path) -> None:
    """One of each mimic kind, renormalised as the pipeline would, cut where its mask is largest."""
    half = round(CROP_MM / grid.spacing_mm)  # mimics are larger: twice the FCD crop
    figure, axes = plt.subplots(len(MIMIC_KINDS), 4, figsize=(11, 2.9 * len(MIMIC_KINDS)))
    for row, kind in zip(axes, MIMIC_KINDS):
        t1w, flair, mask = implant_mimic(rng, *tissue, gm, wm, grid.spacing_mm, kind, avoid=~brain)
        t1w, flair = normalise_intensity(t1w, brain), normalise_intensity(flair, brain)
        axis = 2
        centre = (*np.argwhere(mask).mean(axis=0).round().astype(int)[:2], int(np.argmax(mask.sum(axis=(0, 1)))))
        views = [_crop(v, centre, axis, half) for v in (t1w, flair, mask)]
        for column, (image, outlined) in enumerate(((0, False), (0, True), (1, False), (1, True))):
            ax = row[column]
            ax.imshow(views[image].T, origin="lower", cmap="gray", vmin=WINDOWS[image][0], vmax=WINDOWS[image][1])
            if outlined:
                ax.contour(views[2].T, [0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{kind}\n{mask.sum() * grid.spacing_mm ** 3 / 1000:.1f} mL", fontsize=9)
    for ax, title in zip(axes[0], ("T1w", "T1w + mask", "FLAIR", "FLAIR + mask")):
        ax.set_title(title, fontsize=10)
    figure.suptitle(f"Non-FCD mimics, labelled control in training ({2 * CROP_MM:.0f} mm crops)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "synthetic_lesions.png")
    parser.add_argument("--mimic_figure", type=Path, default=ROOT / "docs" / "figures" / "lesion_mimics.png")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "lesion_gallery.json")
    args = parser.parse_args()

    config = ModelConfig()
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    rng = np.random.default_rng(4)
    t1w, flair, brain, _ = synth_template_sample(rng, grid, with_lesion=False)
    gm, wm, _ = template_tissue_maps(grid)
    territory = neocortical_territory(grid)

    rows, implant_seconds = [], []
    for severity in SEVERITIES:
        # Mid-sized lesions, so that rows differ by severity rather than size; on the last, a transmantle tail
        # that runs within one slice plane, so that the figure can show it.
        while True:
            params = sample_lesion_params(rng, gm, wm, grid.spacing_mm, territory_mask=territory, severity=severity)
            if 1.5 <= params.volume_ml <= 5.0 and (severity < max(SEVERITIES) or _tail_in_plane(params)):
                break
        start = time.perf_counter()
        lesioned = implant_fcd(t1w, flair, gm, wm, params, grid.spacing_mm)
        implant_seconds.append(time.perf_counter() - start)
        rows.append((params, *lesioned))
    for _ in range(10):  # more calls for a steadier timing
        params = replace(sample_lesion_params(rng, gm, wm, grid.spacing_mm, territory_mask=territory), volume_ml=8.0)
        start = time.perf_counter()
        implant_fcd(t1w, flair, gm, wm, params, grid.spacing_mm)
        implant_seconds.append(time.perf_counter() - start)

    half = round(CROP_MM / 2 / grid.spacing_mm)
    figure, axes = plt.subplots(len(rows), 4, figsize=(11, 2.9 * len(rows)))
    for row, (params, t1w_lesion, flair_lesion, mask) in zip(axes, rows):
        centre, axis = _best_view(mask, params)
        views = [_crop(v, centre, axis, half) for v in (t1w_lesion, flair_lesion, mask)]
        for column, (image, outlined) in enumerate(((0, False), (0, True), (1, False), (1, True))):
            ax = row[column]
            low, high = WINDOWS[image]
            ax.imshow(views[image].T, origin="lower", cmap="gray", vmin=low, vmax=high)
            if outlined:
                ax.contour(views[2].T, [0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        tail = ", transmantle" if params.transmantle else ""
        row[0].set_ylabel(f"severity {params.severity:.2f}\n{params.volume_ml:.1f} mL{tail}", fontsize=9)
    for ax, title in zip(axes[0], ("T1w", "T1w + mask", "FLAIR", "FLAIR + mask")):
        ax.set_title(title, fontsize=10)
    figure.suptitle(f"Simulated FCD type II on the {grid.spacing_mm} mm model grid ({CROP_MM:.0f} mm crops)")
    figure.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=80)
    draw_mimics(rng, grid, (t1w, flair), brain.astype(bool), gm, wm, args.mimic_figure)

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        make_cohort(Path(scratch) / "cohort", n=4, seed=0)
        cohort_seconds = time.perf_counter() - start
    results = {
        "implant_fcd_seconds": {"median": float(np.median(implant_seconds)), "max": float(np.max(implant_seconds)),
                                "grid_shape": list(grid.shape), "calls": len(implant_seconds)},
        "cohort_seconds_per_participant": cohort_seconds / 4,
        "cpu_count": os.cpu_count(),
        "figure": str(args.figure.resolve().relative_to(ROOT) if args.figure.resolve().is_relative_to(ROOT) else args.figure),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
