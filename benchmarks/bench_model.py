"""Model speed on the default grid (2 x 112 x 128 x 112): forward, forward + backward, saliency (HiResCAM), predict().

For each architecture in the registry: parameters; forward (batch 1, eval, no grad); forward + backward
(batch 2, train mode, subject + voxel BCE); Grad-CAM (batch 1); `infer.predict` with 4 passes (Grad-CAM pass +
3 flipped / MC-dropout passes). Each is timed `--repeats` times after one warm-up call, whose time is reported
separately (oneDNN / cuDNN set-up, paid once per process). On CUDA the forward is also timed under bf16
autocast, the measurement behind `infer.predict` staying in fp32. Prints a table and writes
benchmarks/results/model.json.

    python benchmarks/bench_model.py [--device cpu] [--threads 1 2] [--repeats 3] [--archs mobilenet3d_small ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bids_fcd.config import ModelConfig
from bids_fcd.explain import grad_cam
from bids_fcd.infer import predict, select_device
from bids_fcd.models import REGISTRY, build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> dict:
    """Wall seconds of one warm-up call and of `repeats` further calls (median, min), and this process's CPU
    seconds per call (median): on a shared CPU, wall time also counts waiting for other processes."""
    def once() -> tuple[float, float]:
        cpu, start = time.process_time(), time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu

    first = once()[0]
    runs = [once() for _ in range(repeats)]
    wall = [w for w, _ in runs]
    return {"first_call_s": round(first, 3), "median_s": round(statistics.median(wall), 3),
            "min_s": round(min(wall), 3), "cpu_median_s": round(statistics.median(c for _, c in runs), 3)}


def bench(architecture: str, device: torch.device, repeats: int) -> dict:
    config = ModelConfig(architecture=architecture)
    shape = config.grid_shape
    model = build_model(config).to(device)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(len(config.channels), *shape)).astype(np.float32)
    brain = np.zeros(shape, dtype=bool)
    brain[8:-8, 8:-8, 8:-8] = True
    x1 = torch.from_numpy(image)[None].to(device)  # (1, C, X, Y, Z)
    x2 = torch.cat([x1, x1.flip(2)])  # (2, C, X, Y, Z)
    mask1 = torch.from_numpy(brain)[None, None].to(device)
    mask2 = mask1.expand(2, -1, -1, -1, -1)
    lesion = torch.zeros(2, 1, *shape, device=device)
    labels = torch.tensor([0.0, 1.0], device=device)

    def forward() -> None:
        with torch.no_grad():
            model(x1, mask1)

    def forward_bf16() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x1, mask1)

    def forward_backward() -> None:
        out = model(x2, mask2)
        loss = (F.binary_cross_entropy_with_logits(out["subject_logits"], labels)
                + F.binary_cross_entropy_with_logits(out["voxel_logits"], lesion))
        model.zero_grad(set_to_none=True)
        loss.backward()

    result = {"parameters": count_parameters(model)}
    model.eval()
    result["forward_b1"] = timed(forward, repeats, device)
    if device.type == "cuda":
        result["forward_b1_bf16_autocast"] = timed(forward_bf16, repeats, device)
    model.train()
    result["forward_backward_b2"] = timed(forward_backward, repeats, device)
    model.zero_grad(set_to_none=True)
    model.eval()
    result["saliency_b1"] = timed(lambda: grad_cam(model, x1, brain), repeats, device)
    result["predict_4_passes"] = timed(lambda: predict(model, config, image, brain, device, n_passes=4),
                                       repeats, device)
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch CPU threads (each is a run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=sorted(REGISTRY), choices=sorted(REGISTRY))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model.json")
    args = parser.parse_args()

    device = select_device(args.device)
    load_at_start = os.getloadavg()[0]
    runs = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runs[f"{threads}_threads"] = results = {}
        for architecture in args.archs:
            results[architecture] = bench(architecture, device, args.repeats)
            print(f"{threads} thread(s)", architecture, json.dumps(results[architecture]), flush=True)
    report = {
        "grid": [len(ModelConfig().channels), *ModelConfig().grid_shape],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        # Other processes on the same cores slow the wall times (and, with 2 threads, make OpenMP spin).
        "load_average_1min_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'threads':<8}{'architecture':<20}{'params':>12}{'fwd b1':>9}{'fwd+bwd b2':>12}{'saliency':>10}"
          f"{'predict x4':>12}  (median wall s; CPU s in the JSON)")
    for run, results in runs.items():
        for name, r in results.items():
            print(f"{run.split('_')[0]:<8}{name:<20}{r['parameters']:>12,}{r['forward_b1']['median_s']:>9}"
                  f"{r['forward_backward_b2']['median_s']:>12}{r['saliency_b1']['median_s']:>10}"
                  f"{r['predict_4_passes']['median_s']:>12}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
