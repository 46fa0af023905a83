"""Preprocessing speed and registration quality on the real volumes in ../shared/data/real.

Times each step of `bids_fcd.preprocess.preprocess` per participant (after one warm-up that loads deepbet and
the template), then the throughput of the same participants run by 1 process with all threads versus
several processes sharing them. Prints a table and writes benchmarks/results/preprocess.json.

    python benchmarks/bench_preprocess.py [--n_threads 2] [--processes 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bids_fcd.config import ModelConfig
from bids_fcd.preprocess import preprocess
from bids_fcd.template import model_grid

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
CASES = {
    "stroke-cstar01": ("stroke-cstar01/sub-cstar01_T1w.nii.gz", "stroke-cstar01/sub-cstar01_FLAIR.nii.gz"),
    "chris-t1": ("chris-t1/chris_T1w.nii.gz", None),
    "ms-study1": ("ms-longitudinal-raw/sub-msl12_ses-study1_T1w.nii.gz",
                  "ms-longitudinal-raw/sub-msl12_ses-study1_FLAIR.nii.gz"),
    "ms-study2": ("ms-longitudinal-raw/sub-msl12_ses-study2_T1w.nii.gz",
                  "ms-longitudinal-raw/sub-msl12_ses-study2_FLAIR.nii.gz"),
    "myconnectome": ("healthy-myconnectome/sub-myconnectome01_T1w.nii.gz", None),
    "glioma-bratsgli00001": ("glioma-brainlesion/sub-bratsgli00001_T1w.nii.gz",
                             "glioma-brainlesion/sub-bratsgli00001_FLAIR.nii.gz"),
}


def run_case(name: str, n_threads: int) -> dict:
    t1w, flair = CASES[name]
    config = ModelConfig()
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    start = time.perf_counter()
    pre = preprocess(REAL / t1w, REAL / flair if flair else None, grid, n_threads=n_threads)
    return {"case": name, "flair": flair is not None, "total_s": round(time.perf_counter() - start, 2),
            "brain_extraction": pre.brain_extraction, "qc": pre.qc}


def throughput(names: list[str], processes: int, n_threads: int) -> dict:
    """Wall time for all `names` with `processes` spawned workers of `n_threads` threads each.

    Includes starting the workers and loading deepbet and the template in each, as a cohort run pays them.
    """
    start = time.perf_counter()
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(run_case, names, [n_threads] * len(names)))
    wall = time.perf_counter() - start
    return {"processes": processes, "threads_per_process": n_threads, "participants": len(names),
            "wall_s": round(wall, 1), "seconds_per_participant": round(wall / len(names), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_threads", type=int, default=2, help="threads for the per-step timings")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "preprocess.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    warmup = run_case(args.cases[0], args.n_threads)
    cases = [run_case(name, args.n_threads) for name in args.cases]
    steps = _steps(cases)
    print("wall (CPU) seconds per step; " + ", ".join(f"{i}: {s}" for i, s in enumerate(steps)))
    print(f"{'case':22s} {'total':>13s}  " + "  ".join(f"{i:>11d}" for i in range(len(steps)))
          + "   dice  r_T1w  r_grad_FLAIR")
    for case in cases:
        qc = case["qc"]
        wall, cpu = qc["seconds"], qc["cpu_seconds"]
        print(f"{case['case']:22s} {case['total_s']:5.1f} ({sum(cpu.values()):5.1f})  "
              + "  ".join(f"{wall.get(s, 0.0):4.1f} ({cpu.get(s, 0.0):4.1f})" for s in steps)
              + f"  {qc['dice_brain_mask_vs_template']:.3f}  {qc['t1w_template_correlation']:.3f}"
              + f"  {qc.get('flair_t1w_gradient_correlation', float('nan')):.3f}")

    total_threads = args.n_threads
    scaling = [throughput(args.cases, p, max(1, total_threads // p)) for p in args.processes]
    for row in scaling:
        print(f"{row['processes']} process(es) x {row['threads_per_process']} thread(s): "
              f"{row['wall_s']} s for {row['participants']} participants, "
              f"{row['seconds_per_participant']} s each")

    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "n_threads": args.n_threads,
        "warmup": warmup,
        "cases": cases,
        "scaling": scaling,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _steps(cases: list[dict]) -> list[str]:
    steps: list[str] = []
    for case in cases:
        steps += [s for s in case["qc"]["seconds"] if s not in steps]
    return steps


if __name__ == "__main__":
    main()
