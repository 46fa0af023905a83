"""What a group run's models do on its test split: its final model, each fold's best model, the fold
models' soft-voting ensemble, and the shipped default model.

The group level's final model (`group/model.pt`) is by default one network refit on every cross-validation
participant, or with `--final_model fold_ensemble` the folds' ensemble; this measures both from one refit run (the
ensemble is `models.ensemble_of` the fold checkpoints, logits averaged, as `--final_model fold_ensemble` writes it),
and what fine-tuning added over the shipped model. Everything is scored at the group model's thresholds
(out-of-fold Youden's J and voxel rule), the shipped model also at its own, on the participants that
participants.tsv marks `split = test`, from the group run's preprocessing cache. A test split of tens of
participants separates models poorly, so each figure carries a 95 % bootstrap interval, and the ensemble's gain over
the refit model a paired one (the same resampled participants score both).

    python benchmarks/group_test_split.py BIDS_DIR OUTPUT_DIR [--out FILE]

OUTPUT_DIR is the group run's output directory (it holds cache/ and group/).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from bids_fcd.cache import load_or_preprocess
from bids_fcd.evaluate import (
    bootstrap_samples,
    detector_figures,
    detector_figures_ci,
    lesion_case,
    percentile_ci,
)
from bids_fcd.infer import predict
from bids_fcd.inputs import discover
from bids_fcd.models import ensemble_of, load_checkpoint
from bids_fcd.preprocess import mask_to_template
from bids_fcd.template import model_grid

SHIPPED = Path(__file__).resolve().parents[1] / "bids_fcd" / "weights" / "model.pt"


def paired_gain(labels: list[int], probabilities: dict[str, list[float]], cases: dict[str, list[dict]],
                threshold: float, n_boot: int = 1000) -> dict:
    """Figure of the first model in `cases` minus that of the second, with a 95 % paired bootstrap interval."""
    (name, other) = cases
    rows = np.arange(len(labels))

    def gain(index: np.ndarray) -> dict:
        def figures(model: str) -> dict:
            return detector_figures([labels[i] for i in index], [probabilities[model][i] for i in index],
                                    [cases[model][i] for i in index], threshold)
        first, second = figures(name), figures(other)
        return {key: None if first[key] is None or second[key] is None else first[key] - second[key]
                for key in ("auroc", "detection_rate", "dice")}

    samples = bootstrap_samples(gain, rows, n_boot=n_boot)
    point = gain(rows)
    return {key: {"value": point[key], "ci95": percentile_ci([s[key] for s in samples], n_boot)}
            for key in point}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--n_cpus", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/group_test_split.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.n_cpus)
    group = args.output_dir / "group"
    final, config = load_checkpoint(group / "model.pt")
    fold_paths = sorted(group.glob("fold-*/checkpoint_best.pt"))
    folds = {path.parent.name: load_checkpoint(path)[0] for path in fold_paths}
    final_name = "final (refit)" if config.ensemble_size == 1 else "final (fold ensemble)"
    shipped, shipped_config = load_checkpoint(SHIPPED)
    if shipped_config.grid_shape != config.grid_shape or shipped_config.grid_spacing_mm != config.grid_spacing_mm:
        raise SystemExit("the shipped model's grid differs from the group model's: compare on one grid only")
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    units = [unit for unit in discover(args.bids_dir) if unit.split == "test"]
    if not units:
        raise SystemExit(f"{args.bids_dir / 'participants.tsv'}: no participant with split = test")
    device = torch.device(args.device)
    models = {final_name: final, **folds, "shipped": shipped}
    if config.ensemble_size == 1:
        models["ensemble of folds"] = ensemble_of(fold_paths)[0]
    labels, probabilities, maps = [], {name: [] for name in models}, {name: [] for name in models}
    lesions = []
    for unit in units:
        pre = load_or_preprocess(args.output_dir / "cache", unit.t1w, unit.flair, grid)
        image = np.stack([pre.t1w, pre.flair])
        labels.append(unit.label)
        lesions.append(mask_to_template(unit.lesion_mask, unit.lesion_mask_space, pre, unit.t1w, unit.flair)
                       if unit.lesion_mask else np.zeros(grid.shape, dtype=bool))
        for name, model in models.items():
            prediction = predict(model, config, image, pre.brain_mask, device)
            probabilities[name].append(prediction.fcd_probability)
            maps[name].append(prediction.prob_template)

    def cases_of(name: str, voxel_threshold: float) -> list[dict]:
        return [lesion_case(prob, lesion, voxel_threshold, config.min_cluster_voxels)
                for prob, lesion in zip(maps[name], lesions)]

    def scored(name: str, subject_threshold: float, voxel_threshold: float) -> dict:
        cases = cases_of(name, voxel_threshold)
        return {**detector_figures(labels, probabilities[name], cases, subject_threshold),
                "ci95": detector_figures_ci(labels, probabilities[name], cases, subject_threshold)}

    result = {name: scored(name, config.subject_threshold, config.voxel_threshold) for name in probabilities}
    result["shipped at its own thresholds"] = scored("shipped", shipped_config.subject_threshold,
                                                     shipped_config.voxel_threshold)
    ensemble_gain = {} if config.ensemble_size > 1 else paired_gain(
        labels, probabilities, {name: cases_of(name, config.voxel_threshold)
                                for name in ("ensemble of folds", "final (refit)")}, config.subject_threshold)
    record = {"group_run": str(args.output_dir), "n_test": len(units), "n_fcd": int(sum(labels)),
              "group_thresholds": [config.subject_threshold, config.voxel_threshold],
              "shipped_thresholds": [shipped_config.subject_threshold, shipped_config.voxel_threshold],
              "models": result, "ensemble_minus_refit": ensemble_gain,
              "machine": {"platform": platform.platform(), "cpus": args.n_cpus, "device": args.device,
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'model':<30} AUROC  sens  spec  detect  Dice  FP/control")
    for name, m in result.items():
        print(f"{name:<30} " + "  ".join("  n/a" if m[k] is None else f"{m[k]:.2f}" for k in
                                         ("auroc", "sensitivity", "specificity", "detection_rate", "dice",
                                          "false_positive_clusters_per_control")))
    if ensemble_gain:
        print("ensemble minus refit, 95 % paired intervals: " + ", ".join(
            f"{key} {gain['value']:+.2f} ({gain['ci95'][0]:+.2f} to {gain['ci95'][1]:+.2f})"
            for key, gain in ensemble_gain.items() if gain["ci95"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
