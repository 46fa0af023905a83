"""Which lesions a group run's fold models miss out-of-fold, and why: was the lesion unseen, or just under the cut?

For every cross-validation patient with a lesion mask, its fold's best model (the model that did not train on it,
at the group's voxel threshold) and, for comparison, another model (default: the shipped one, which never saw the
cohort; at its own threshold) are run as the participant level runs them; each lesion gets its depth band
(`evaluate.lesion_conspicuity`), whether a candidate cluster touches it, and the map's peak inside it. A miss
whose peak is under `evaluate.UNSEEN_PEAK` was unseen: no voxel threshold or cluster size recovers it; one with a
higher peak is a cut or cluster-size question. Summary per depth band.
(The group level's predictions.tsv carries the fold models' peak too, since 2026-12-04, as
`lesion_peak_probability`; this adds the other model and works on runs from before.)

    python benchmarks/group_misses.py BIDS_DIR OUTPUT_DIR [--compare MODEL] [--out FILE]

OUTPUT_DIR is the group run's output directory (it holds cache/, group/fold-K/ and group/predictions.tsv).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_fcd.cache import load_or_preprocess
from bids_fcd.evaluate import (
    LESION_EDGE_DISTANCE_EDGES_MM,
    UNSEEN_PEAK,
    band_label,
    band_labels,
    lesion_case,
    lesion_conspicuity,
    missed_lesions,
)
from bids_fcd.infer import predict
from bids_fcd.inputs import discover
from bids_fcd.models import load_checkpoint
from bids_fcd.preprocess import mask_to_template
from bids_fcd.template import model_grid

SHIPPED = Path(__file__).resolve().parents[1] / "bids_fcd" / "weights" / "model.pt"


def lesion_outcome(model: torch.nn.Module, config, voxel_threshold: float, image: np.ndarray, brain: np.ndarray,
                   lesion: np.ndarray, device: torch.device) -> dict:
    """Detected (clusters cut at `voxel_threshold`) and the map's peak inside the lesion."""
    prob = predict(model, config, image, brain, device).prob_template
    case = lesion_case(prob, lesion, voxel_threshold, config.min_cluster_voxels)
    return {"detected": case["detected"], "peak_in_lesion": round(float(prob[lesion >= 0.5].max()), 4)}


def summary(rows: list[dict], key: str) -> dict:
    """Per depth band: lesions, detected, and the misses split into unseen and under the cut."""
    bands = {}
    for band in band_labels(LESION_EDGE_DISTANCE_EDGES_MM, "mm"):
        members = [row[key] for row in rows if row["depth_band"] == band]
        if members:
            missed = missed_lesions([m["detected"] for m in members], [m["peak_in_lesion"] for m in members])
            bands[band] = {"n": len(members), "detected": len(members) - missed["n"],
                           "missed_unseen": missed["unseen"], "missed_under_the_cut": missed["under_the_cut"]}
    return bands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--compare", type=Path, default=SHIPPED, help="another model (default: the shipped one)")
    parser.add_argument("--n_cpus", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/group_misses.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.n_cpus)
    device = torch.device(args.device)
    group = args.output_dir / "group"
    table = pd.read_csv(group / "predictions.tsv", sep="\t", dtype=str, keep_default_na=False)
    patients = table[(table["split"] != "test") & (table["has_lesion_mask"] == "True") & (table["label"] == "fcd")]
    fold_models = {fold: load_checkpoint(group / f"fold-{fold}" / "checkpoint_best.pt", device)
                   for fold in sorted(patients["fold"].astype(int).unique())}
    other, other_config = load_checkpoint(args.compare, device)
    # The group's cut, which its fold models share (checkpoints of runs before 2026-12-04 still carry the
    # starting model's thresholds).
    config = load_checkpoint(group / "model.pt")[1]
    if (other_config.grid_shape, other_config.grid_spacing_mm) != (config.grid_shape, config.grid_spacing_mm):
        raise SystemExit(f"{args.compare}: its grid differs from the group run's: compare on one grid only")
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    units = {(f"sub-{unit.subject}", unit.session or "n/a"): unit for unit in discover(args.bids_dir)}
    rows = []
    for _, row in patients.iterrows():
        unit = units[(row["participant_id"], row["session"])]
        pre = load_or_preprocess(args.output_dir / "cache", unit.t1w, unit.flair, grid)
        lesion = mask_to_template(unit.lesion_mask, unit.lesion_mask_space, pre, unit.t1w, unit.flair)
        image = np.stack([pre.t1w, pre.flair])
        fold_model, fold_config = fold_models[int(row["fold"])]
        conspicuity = lesion_conspicuity(pre.flair, lesion, pre.brain_mask, grid.spacing_mm)
        rows.append({"participant_id": row["participant_id"], "session": row["session"], "fold": int(row["fold"]),
                     **{key: None if value is None else round(value, 3) for key, value in conspicuity.items()},
                     "depth_band": band_label(conspicuity["edge_distance_mm"], LESION_EDGE_DISTANCE_EDGES_MM, "mm"),
                     "fold_model": lesion_outcome(fold_model, fold_config, config.voxel_threshold, image,
                                                  pre.brain_mask, lesion, device),
                     "compared": lesion_outcome(other, other_config, other_config.voxel_threshold, image,
                                                pre.brain_mask, lesion, device)})
    record = {"group_run": str(args.output_dir), "compared_model": str(args.compare),
              "unseen_below": UNSEEN_PEAK, "n_lesions": len(rows), "fold_models": summary(rows, "fold_model"),
              "compared": summary(rows, "compared"),
              "missed_by_both": sum(not r["fold_model"]["detected"] and not r["compared"]["detected"] for r in rows),
              "missed_by_fold_models_only": sum(not r["fold_model"]["detected"] and r["compared"]["detected"]
                                                for r in rows),
              "lesions": rows,
              "machine": {"platform": platform.platform(), "cpus": args.n_cpus, "device": args.device,
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'depth band':<12} {'model':<12} lesions detected missed: unseen / under the cut")
    for name in ("fold_models", "compared"):
        for band, figures in record[name].items():
            print(f"{band:<12} {name:<12} {figures['n']:>7} {figures['detected']:>8} "
                  f"{figures['missed_unseen']:>14} / {figures['missed_under_the_cut']}")
    print(f"missed by both: {record['missed_by_both']}; by the fold models only: "
          f"{record['missed_by_fold_models_only']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
