"""The whole participant level, preprocessing included, in seconds per participant (issue target: <= 60 s on
2 CPU cores, <= 15 s on a GPU machine).

Makes a fresh synthetic cohort (`bids_fcd synth`), then runs `run.py BIDS OUT participant` with the shipped model
on an empty OUTPUT_DIR (no cache), once per `--n_cpus` setting, each into its own OUTPUT_DIR. Reports the wall time
of the whole run, its seconds per participant, each participant's own time (from its log) and the machine.
Writes benchmarks/results/participant.json.

    python benchmarks/bench_participant.py [--n 4] [--n_cpus 1 2] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bids_fcd.synth import make_cohort

REPO = Path(__file__).resolve().parents[1]


def unit_seconds(logs_dir: Path) -> dict[str, float]:
    """Each participant's own processing time, as its log records it."""
    seconds = {}
    for log_file in sorted(logs_dir.glob("sub-*.log")):
        found = re.search(r"(sub-\S+) finished in ([0-9.]+) s", log_file.read_text())
        if found:
            seconds[found.group(1)] = float(found.group(2))
    return seconds


def run_once(bids_dir: Path, out: Path, n_cpus: int, device: str) -> dict:
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(REPO / "run.py"), str(bids_dir), str(out), "participant",
                                "--n_cpus", str(n_cpus), "--device", device, "--skip_bids_validator"],
                               capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"run.py exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    per_unit = unit_seconds(out / "logs")
    return {"n_cpus": n_cpus, "wall_s": round(wall, 1), "wall_s_per_participant": round(wall / len(per_unit), 1),
            "participant_s": per_unit,
            "max_rss_children_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="synthetic participants")
    parser.add_argument("--n_cpus", type=int, nargs="+", default=[2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "participant.json")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="bench_participant-"))
    try:
        bids_dir = make_cohort(scratch / "bids", n=args.n, seed=args.seed)
        runs = [run_once(bids_dir, scratch / f"out-{n_cpus}", n_cpus, args.device) for n_cpus in args.n_cpus]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "benchmark": "whole participant level (preprocessing, prediction with 4 passes, HiResCAM saliency, native-space "
                     "maps, report), empty OUTPUT_DIR, shipped model",
        "n_participants": args.n,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_average_1min_end": round(os.getloadavg()[0], 2)},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
