"""Do models find FCD-like implants in the real anatomy they trained on, and how bright must an implant be?

    PYTHONPATH=. python benchmarks/seen_anatomy.py --model M [--model M2 ...] [--flair_gain_scale 1 2] [--out F]

Fresh implants (a random stream no training run draws: `--seed`) in the two real glioma-brainlesion heads that
`tools/train_default_model.py` trains on, each implant also made again with its FLAIR gain multiplied by every
`--flair_gain_scale` (all else the same), predicted as the participant level does (`predict`) at each model's own
thresholds. Read it beside the model card's real-anatomy column (implants in 8 unseen heads): detection near the
synthetic figure here and low there would mean the model learnt the two training anatomies rather than FCD in real
tissue; low here too, rising with the gain, means the implants are too faint against real tissue for the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from bids_fcd.config import DEFAULT_N_PASSES, ModelConfig
from bids_fcd.evaluate import lesion_case
from bids_fcd.infer import predict
from bids_fcd.lesions import implant_fcd, sample_lesion_params
from bids_fcd.models import load_checkpoint
from bids_fcd.template import model_grid

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_default_model", REPO / "tools" / "train_default_model.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def implants(grid, cache_dir: Path, rng: np.random.Generator, per_head: int, gain_scales: list[float]):
    """(head, implant index, gain scale, lesion params, image, brain, lesion) for each training head's implants."""
    territory = tool.neocortical_territory(grid)
    for head in tool.real_heads(grid, cache_dir):
        for index in range(per_head):
            params = sample_lesion_params(rng, head.gm, head.wm, grid.spacing_mm, exclude_mask=head.exclude,
                                          territory_mask=territory)
            for scale in gain_scales:
                scaled = dataclasses.replace(params, flair_gain=params.flair_gain * scale)
                t1w, flair, lesion = implant_fcd(head.pre.t1w, head.pre.flair, head.gm, head.wm, scaled,
                                                 grid.spacing_mm)
                yield head.subject, index, scale, scaled, np.stack([t1w, flair]), head.brain, lesion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True)
    parser.add_argument("--implants", type=int, default=12, help="fresh implants per training head")
    parser.add_argument("--flair_gain_scale", type=float, nargs="+", default=[1.0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--work_dir", type=Path, default=REPO / "work" / "seen_anatomy")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    grid = model_grid(ModelConfig().grid_spacing_mm, ModelConfig().grid_shape)
    models = {str(path): load_checkpoint(path) for path in args.model}
    rows = []
    for subject, index, scale, params, image, brain, lesion in implants(
            grid, args.work_dir / "cache", np.random.default_rng([args.seed, 77]), args.implants,
            args.flair_gain_scale):
        row = {"head": subject, "implant": index, "gain_scale": scale, "severity": round(params.severity, 3),
               "flair_gain": round(params.flair_gain, 3), "volume_ml": round(params.volume_ml, 2)}
        for name, (model, config) in models.items():
            prediction = predict(model, config, image, brain, torch.device("cpu"), n_passes=DEFAULT_N_PASSES)
            case = lesion_case(prediction.prob_template, lesion, config.voxel_threshold, config.min_cluster_voxels)
            row[name] = {"detected": case["detected"], "dice": round(case["dice"], 3),
                         "lesion_peak": round(float(prediction.prob_template[lesion >= 0.5].max()), 3),
                         "called_fcd": prediction.fcd_probability >= config.subject_threshold}
        rows.append(row)
    summary = {name: {str(scale): {key: float(np.mean([r[name][key] for r in rows if r["gain_scale"] == scale]))
                                   for key in ("detected", "dice", "called_fcd")}
                      for scale in args.flair_gain_scale} for name in models}
    text = json.dumps({"summary": summary, "implants": rows}, indent=1)
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
