"""Does the group level's `--mimic_fraction` keep a fine-tune from calling non-FCD lesions FCD?

The shipped model, fine-tuned by the group level on 120 synthetic participants with no non-FCD lesion in its
training set (candidate 10 in model_candidates.md), called the real stroke, an MS session and three gliomas FCD.
This fine-tunes the shipped model twice on the same cohort, for the same fixed number of epochs (the group
level's refit, no early stopping, so that both arms get the same dose), once without and once with mimic copies
(`data.mimic_copies`), and scores both, and the shipped model, on the unseen real brains of
`evaluate_default_model.py` (the 8 non-FCD brains as they are, and with implanted FCD-like lesions), all at the
shipped model's thresholds so that only the weights differ.

    python benchmarks/group_mimics.py BIDS_DIR OUTPUT_DIR [--epochs 16] [--fractions 0 0.5] [--out FILE]

OUTPUT_DIR is a group run's output directory on that cohort (its cache/ holds the preprocessed participants; any
missing are preprocessed). Trains on the participants participants.tsv marks `train` (all, without a split column).
Needs ../shared/data/real, as `evaluate_default_model.py` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch
from evaluate_default_model import evaluate_real, summarise  # the benchmark beside this one

from bids_fcd.data import mimic_copies, prepare_samples, with_copies
from bids_fcd.engine import DistContext, TrainOptions, fit
from bids_fcd.inputs import discover
from bids_fcd.models import load_checkpoint, save_checkpoint
from bids_fcd.template import model_grid
from bids_fcd.train import FINE_TUNE_LEARNING_RATE, fresh_model

SHIPPED = Path(__file__).resolve().parents[1] / "bids_fcd" / "weights" / "model.pt"


def real_brains(model_path: Path, work_dir: Path, threshold: float) -> dict:
    """Real-anatomy figures of `evaluate_default_model` and the non-FCD brains' probabilities, at `threshold`."""
    rows = evaluate_real(model_path, work_dir, implants=3, seed=2026)
    return {"summary": {k: v for k, v in summarise(rows, threshold).items() if k != "by_lesion"},
            "non_fcd_brains": {r["case"]: round(r["fcd_probability"], 3) for r in rows if r["label"] == 0},
            "called_control": sum(r["fcd_probability"] < threshold for r in rows if r["label"] == 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--n_cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--work_dir", type=Path, default=Path("work/evaluate_default_model"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/group_mimics.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.n_cpus)
    started = time.time()
    shipped, config = load_checkpoint(SHIPPED)
    state = shipped.state_dict()
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    units = [u for u in discover(args.bids_dir) if u.split in ("train", None)]
    samples, failed = prepare_samples(units, args.output_dir / "cache", grid, config.channels, args.n_cpus)
    indices = np.arange(len(samples))
    arms = {"shipped": real_brains(SHIPPED, args.work_dir, config.subject_threshold)}
    for fraction in args.fractions:
        copies = mimic_copies(samples, indices, fraction, args.seed, grid, config.channels)
        options = TrainOptions(epochs=args.epochs, learning_rate=FINE_TUNE_LEARNING_RATE, seed=args.seed,
                               mimic_fraction=fraction)
        model = fresh_model(config, state, args.seed)
        out_dir = args.output_dir / "mimics_benchmark" / f"fraction-{fraction:g}"
        fit(model, config, with_copies(samples, indices, copies), [], options, out_dir, 0, DistContext(),
            epochs=args.epochs)
        save_checkpoint(model.cpu(), config, out_dir / "model.pt")  # the shipped thresholds, on purpose
        arms[f"fraction {fraction:g}"] = {"n_train": len(samples), "n_copies": len(copies),
                                          **real_brains(out_dir / "model.pt", args.work_dir,
                                                        config.subject_threshold)}
    record = {"bids_dir": str(args.bids_dir), "epochs": args.epochs, "seed": args.seed, "failed": list(failed),
              "thresholds": [config.subject_threshold, config.voxel_threshold], "arms": arms,
              "machine": {"platform": platform.platform(), "cpus": args.n_cpus, "torch": torch.__version__},
              "seconds": round(time.time() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    for name, arm in arms.items():
        s = arm["summary"]
        print(f"{name:14s} called control {arm['called_control']}/8  AUROC {s['auroc']:.2f}  detection "
              f"{s['detection_rate']:.2f}  FP/brain {s['false_positive_clusters_per_control']:.2f}  "
              + " ".join(f"{p:.2f}" for p in arm["non_fcd_brains"].values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
