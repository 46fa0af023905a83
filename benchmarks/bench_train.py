"""Training throughput: the bare model step versus the whole pipeline (data loading + augmentation + step).

Volumes per second for
- `bare_step`: forward + backward + AdamW on one batch already on the device (the ceiling);
- `pipeline_torchio`: `engine.EpochRunner.train_epoch` with TorchIO augmentation per volume in DataLoader
  workers (the CPU path);
- `pipeline_batch_augmentation`: the same epoch with batched augmentation on the device (the GPU path);
- `augmentation_only_*`: the augmentation alone, per volume.
Samples are synthetic model-grid volumes (`synth.synth_template_sample`), held in memory as the group level
holds the cache. Runs on the CPU, and on CUDA as well when a GPU is present. Prints a table and writes
benchmarks/results/train.json.

    python benchmarks/bench_train.py [--grid_spacing_mm 1.5 --grid_shape 112x128x112] [--width 1.0]
        [--batch_size 4] [--steps 8] [--n_cpus 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.data import BatchAugmentation, PreparedArrays, ResidentSamples, Sample, TorchIOAugmentation
from bids_fcd.engine import DistContext, EpochRunner, TrainOptions, fcd_loss, make_optimizer
from bids_fcd.inputs import Participant
from bids_fcd.models import build_model, count_parameters
from bids_fcd.template import model_grid

REPO = Path(__file__).resolve().parents[1]


def make_samples(config: ModelConfig, n: int) -> list[Sample]:
    """`n` synthetic participants (half with a lesion) on the config's grid."""
    from bids_fcd.synth import synth_template_sample

    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    samples = []
    for i in range(n):
        t1w, flair, brain, lesion = synth_template_sample(np.random.default_rng(i), grid,
                                                          with_lesion=bool(i % 2))
        arrays = PreparedArrays(np.stack([t1w, flair]), brain.astype(bool),
                                lesion.astype(np.float16) if i % 2 else None)
        unit = Participant(f"{i:03d}", None, None, None, label=i % 2)
        samples.append(Sample(unit, arrays.image, arrays.brain_mask, arrays.lesion, "synthetic"))
    return samples


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(config: ModelConfig, samples: list[Sample], batch_size: int, steps: int,
              device: torch.device) -> float:
    """Volumes/s of forward + loss + backward + AdamW step on one resident batch (after 2 warm-up steps)."""
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    optimizer = make_optimizer(model, TrainOptions())
    batch = ResidentSamples(samples, device).batch([i % len(samples) for i in range(batch_size)])
    for step in range(steps + 2):
        if step == 2:
            synchronise(device)
            start = time.perf_counter()
        outputs = model(batch["image"], batch["brain_mask"] > 0.5)
        loss = fcd_loss(outputs, batch, 1.0, 1.0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronise(device)
    return steps * batch_size / (time.perf_counter() - start)


def pipeline(config: ModelConfig, samples: list[Sample], options: TrainOptions,
             device: torch.device) -> float:
    """Volumes/s of a whole training epoch (after a warm-up epoch), as `engine.fit` runs it."""
    torch.manual_seed(0)
    runner = EpochRunner(build_model(config), samples, options, DistContext(0, 1, device),
                         config.grid_spacing_mm,
                         0, epochs=2)
    runner.train_epoch(1, "warm-up")
    synchronise(device)
    start = time.perf_counter()
    runner.train_epoch(2, "timed")
    synchronise(device)
    return len(samples) / (time.perf_counter() - start)


def augmentation_only(config: ModelConfig, samples: list[Sample], batch_size: int,
                      device: torch.device) -> dict[str, float]:
    """Seconds per volume of TorchIO (CPU, one volume at a time) and of the batched augmentation on
    `device`."""
    torchio = TorchIOAugmentation(config.grid_spacing_mm)
    image = torch.from_numpy(samples[0].image)
    mask = torch.from_numpy(samples[0].brain_mask.astype(np.float32))[None]
    start = time.perf_counter()
    for seed in range(4):
        torch.manual_seed(seed)
        torchio(image, mask, torch.zeros_like(mask))
    result = {"augmentation_only_torchio_s_per_volume": (time.perf_counter() - start) / 4}
    batch_aug = BatchAugmentation(config.grid_spacing_mm)
    images = image[None].repeat(batch_size, 1, 1, 1, 1).to(device)
    masks = mask[None].repeat(batch_size, 1, 1, 1, 1).to(device)
    batch_aug.apply(images, masks, masks, batch_aug.sample(torch.Generator().manual_seed(0), batch_size, 2))
    synchronise(device)
    start = time.perf_counter()
    for seed in range(4):
        params = batch_aug.sample(torch.Generator().manual_seed(seed), batch_size, 2)
        params["affine"][:] = True  # time the most expensive case: every volume resampled
        batch_aug.apply(images, masks, masks, params)
    synchronise(device)
    result["augmentation_only_batch_s_per_volume"] = (time.perf_counter() - start) / (4 * batch_size)
    return result


def run(device: torch.device, config: ModelConfig, samples: list[Sample], args: argparse.Namespace) -> dict:
    workers = min(4, args.n_cpus // 2) if device.type == "cpu" else min(4, max(0, args.n_cpus - 1))
    options = TrainOptions(batch_size=args.batch_size, seed=0, n_workers=workers)
    result = {"device": str(device), "bare_step_volumes_per_s": bare_step(config, samples, args.batch_size,
                                                                         args.steps, device)}
    torchio_samples = samples if device.type == "cpu" else samples[: args.batch_size * 2]
    torch.set_num_threads(max(1, args.n_cpus - workers))  # as run_group: workers and threads share --n_cpus
    torchio_options = replace(options, augmentation="cpu")
    result["pipeline_torchio_volumes_per_s"] = pipeline(config, torchio_samples, torchio_options, device)
    torch.set_num_threads(args.n_cpus)
    result["pipeline_batch_augmentation_volumes_per_s"] = pipeline(
        config, samples, replace(options, augmentation="gpu", n_workers=0), device)
    result.update(augmentation_only(config, samples, args.batch_size, device))
    result["dataloader_workers_for_torchio"] = workers
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid_spacing_mm", type=float, default=ModelConfig().grid_spacing_mm)
    parser.add_argument("--grid_shape", default="x".join(map(str, ModelConfig().grid_shape)))
    parser.add_argument("--width", type=float, default=1.0, help="MobileNet width multiplier")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed bare steps")
    parser.add_argument("--samples", type=int, default=8, help="volumes per timed pipeline epoch")
    parser.add_argument("--n_cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.grid_shape.split("x"))
    config = ModelConfig(grid_spacing_mm=args.grid_spacing_mm, grid_shape=shape,
                         arch_params={"width": args.width})
    torch.set_num_threads(args.n_cpus)
    samples = make_samples(config, args.samples)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = [run(device, config, samples, args) for device in devices]
    report = {
        "benchmark": "training throughput, volumes per second (higher is better)",
        "config": {"architecture": config.architecture, "grid_shape": list(shape),
                   "grid_spacing_mm": config.grid_spacing_mm, "width": args.width,
                   "parameters": count_parameters(build_model(config)), "batch_size": args.batch_size},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": args.n_cpus,
                    "load_average_1min": os.getloadavg()[0], "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": results,
    }
    for row in results:
        print(f"{row['device']:>5}: bare step {row['bare_step_volumes_per_s']:.2f} vol/s | pipeline TorchIO "
              f"{row['pipeline_torchio_volumes_per_s']:.2f} vol/s | pipeline batch augmentation "
              f"{row['pipeline_batch_augmentation_volumes_per_s']:.2f} vol/s | augmentation alone: TorchIO "
              f"{row['augmentation_only_torchio_s_per_volume']:.3f} s/vol, batched "
              f"{row['augmentation_only_batch_s_per_volume']:.4f} s/vol")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
