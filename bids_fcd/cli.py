"""Command line: arguments, the contract's exit codes and their order, logging, dispatch.

    bids_fcd BIDS_DIR OUTPUT_DIR {participant,group} [options]
    bids_fcd synth OUT_DIR [--n N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bids_fcd import __version__
from bids_fcd.config import DEFAULT_N_PASSES
from bids_fcd.exit_codes import (
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_MISSING_INPUT,
    EXIT_OK,
    EXIT_UNKNOWN_LEVEL,
    EXIT_USAGE,
)
from bids_fcd.inputs import InputError, read_filter_file, validate_labels

ANALYSIS_LEVELS = ("participant", "group")

log = logging.getLogger("bids_fcd")


class UsageError(Exception):
    """Raised instead of argparse's exit 2, so that usage errors exit 64 as the contract says."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(
        prog="bids_fcd",
        description="Localise focal cortical dysplasia in T1w + FLAIR MRI (BIDS App; research use only).",
        epilog="Exit codes: 0 ok, 1 a participant failed, 16 BIDS validation failed, 17 unknown analysis "
               "level, 18 selection empty, 64 usage, 65 bad image, 66 missing input, 73 cannot create output, "
               "74 I/O error.",
    )
    parser.add_argument("bids_dir", type=Path, help="input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="output BIDS derivatives dataset")
    parser.add_argument("analysis_level", help="participant: preprocess and predict; group: train on the cohort")
    parser.add_argument("-v", "--version", action="version", version=f"bids_fcd {__version__}")
    parser.add_argument("--participant_label", nargs="+", metavar="L",
                        help="participant labels, with or without 'sub-' (default: all)")
    parser.add_argument("--session_label", nargs="+", metavar="S", help="session labels (default: all)")
    parser.add_argument("--bids_filter_file", type=Path, metavar="FILE",
                        help='JSON of pybids queries per modality, e.g. {"t1w": {"acquisition": "iso08"}}')
    parser.add_argument("--skip_bids_validator", action="store_true", help="do not validate the input dataset")
    parser.add_argument("--model", type=Path, metavar="PATH",
                        help="checkpoint written by the group level (default: the shipped model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default: auto, CUDA when present)")
    parser.add_argument("--n_cpus", type=positive_int, default=1, metavar="N",
                        help="CPU cores to use; participants run in parallel processes (default: 1)")
    parser.add_argument("--work_dir", type=Path, metavar="DIR",
                        help="scratch space (default: OUTPUT_DIR/work, removed on success)")
    parser.add_argument("--seed", type=seed_int, default=0, metavar="N", help="random seed, 0 to 2^32 - 1 (default: 0)")
    parser.add_argument("--n_passes", type=positive_int, default=DEFAULT_N_PASSES, metavar="N",
                        help="stochastic passes (test-time flips, MC dropout) for the uncertainty map "
                             f"(default: {DEFAULT_N_PASSES}, as the shipped model's thresholds were chosen)")
    group = parser.add_argument_group(
        "group level (training)",
        "Trains on OUTPUT_DIR/cache (preprocessing what is missing) and writes OUTPUT_DIR/group/. Several GPUs "
        "or nodes: torchrun --nproc_per_node=N run.py BIDS_DIR OUTPUT_DIR group --device cuda [options]")
    group.add_argument("--label_column", default="group",
                       help="participants.tsv column with the diagnosis (default: group)")
    group.add_argument("--positive_label", default="fcd",
                       help="value of --label_column meaning FCD; others are controls, n/a excluded (default: fcd)")
    group.add_argument("--n_folds", type=fold_count, default=5, help="cross-validation folds, >= 2 (default: 5)")
    group.add_argument("--epochs", type=positive_int, default=30, help="training epochs per fold (default: 30)")
    group.add_argument("--batch_size", type=positive_int, default=4, help="volumes per step (default: 4)")
    group.add_argument("--learning_rate", type=float, default=None,
                       help="AdamW peak learning rate (default: 1e-4 when fine-tuning a trained model, 1e-3 from "
                            "random initialisation)")
    group.add_argument("--architecture", default=None,
                       help="network from the registry (default: the starting model's, mobilenet3d_small)")
    group.add_argument("--arch_params", type=json_object, default=None, metavar="JSON",
                       help='architecture keyword arguments, e.g. \'{"width": 0.5}\' (default: the starting model\'s)')
    group.add_argument("--grid_spacing_mm", type=float, default=None, metavar="MM",
                       help="model grid voxel size in mm (default: the starting model's, 1.5)")
    group.add_argument("--grid_shape", type=grid_shape, default=None, metavar="XxYxZ",
                       help="model grid in voxels, each side a multiple of 16 (default: the starting model's, "
                            "112x128x112)")
    group.add_argument("--from_scratch", action="store_true",
                       help="random initialisation instead of the starting model's weights")
    group.add_argument("--pretrain_epochs", type=positive_int, default=None, metavar="N",
                       help="autoencoder pre-training epochs of the encoder in each fold (default: none)")
    group.add_argument("--final_model", choices=("refit", "fold_ensemble"), default="refit",
                       help="refit: one network retrained on every cross-validated participant; fold_ensemble: "
                            "the folds' best networks, their outputs averaged (default: refit)")
    group.add_argument("--mimic_fraction", type=fraction, default=0.5, metavar="F",
                       help="share of the training controls and lesion-masked patients that also train as a copy "
                            "with a non-FCD lesion (MS-like plaques, infarct, glioma), labels unchanged, so that "
                            "fine-tuning does not learn 'bright on FLAIR is FCD' (default: 0.5; 0: none)")
    group.add_argument("--implant_fraction", type=fraction, default=0.0, metavar="F",
                       help="share of the training controls that also train as a copy with a simulated FCD type II "
                            "lesion implanted in their own anatomy, labelled FCD, meant to adapt the model to the "
                            "cohort's scanners without drawing masks; not yet shown to help (README) (default: 0, "
                            "none)")
    group.add_argument("--grad_accum_steps", type=positive_int, default=1, metavar="N",
                       help="batches per optimizer step (gradient accumulation; default: 1)")
    group.add_argument("--patience", type=positive_int, default=10, metavar="N",
                       help="early stopping: epochs without a lower validation loss (default: 10)")
    group.add_argument("--mixed_precision", choices=("off", "bf16", "fp16"), default="off",
                       help="autocast precision (default: off; bf16 was slower than fp32 on an H100 and an H200 "
                            "for this net)")
    group.add_argument("--augmentation", choices=("auto", "cpu", "gpu", "off"), default="auto",
                       help="cpu: TorchIO per volume; gpu: batched on the device; auto: gpu on CUDA, else cpu")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic kernels (reproducible on the same hardware, slower on GPUs)")
    group.add_argument("--embedding", choices=("umap", "tsne", "pca"), default="umap",
                       help="2-D embedding of the learned features in the report (default: umap)")
    return parser


def json_object(text: str) -> str:
    """A JSON object given on the command line (kept as text; read where it is used)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return text


def grid_shape(text: str) -> str:
    """`XxYxZ` voxels, each a positive multiple of 16 (the encoders' total stride); kept as text."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 and int(p) % 16 == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected XxYxZ with multiples of 16, e.g. 112x128x112; got {text!r}")
    return text


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def fold_count(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds, got {value}")
    return value


def seed_int(text: str) -> int:
    """A seed every random generator used here accepts (numpy's legacy seeding stops at 2^32 - 1)."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2^32 - 1, got {value}")
    return value


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("bids", "nibabel", "matplotlib", "PIL", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_paths(bids_dir: Path, output_dir: Path, work_dir: Path | None = None) -> int:
    """The contract's path checks, in order: input present (66), output (and --work_dir) creatable and outside
    the input (73): the app never writes into the dataset it reads."""
    if not bids_dir.is_dir() or not (bids_dir / "dataset_description.json").is_file():
        log.error("BIDS_DIR %s does not exist or has no dataset_description.json", bids_dir)
        return EXIT_MISSING_INPUT
    bids_resolved = bids_dir.resolve()
    for option, folder in (("OUTPUT_DIR", output_dir), ("--work_dir", work_dir)):
        if folder is None:
            continue
        resolved = folder.resolve()
        if resolved == bids_resolved or bids_resolved in resolved.parents:
            log.error("%s %s must not be BIDS_DIR or inside it", option, folder)
            return EXIT_CANNOT_CREATE_OUTPUT
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.error("cannot create %s %s: %s", option, folder, err)
            return EXIT_CANNOT_CREATE_OUTPUT
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":
        from bids_fcd import synth

        return synth.main(argv[1:])
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        args.participant_label = validate_labels(args.participant_label, "sub-", "participant")
        args.session_label = validate_labels(args.session_label, "ses-", "session")
        args.filters = read_filter_file(args.bids_filter_file)
    except (UsageError, InputError) as err:
        build_parser().print_usage(sys.stderr)
        print(f"bids_fcd: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USAGE)
    if args.analysis_level not in ANALYSIS_LEVELS:
        log.error("unknown analysis level %r: choose participant or group", args.analysis_level)
        return EXIT_UNKNOWN_LEVEL
    code = check_paths(args.bids_dir, args.output_dir, args.work_dir)
    if code:
        return code

    from bids_fcd.app import run_app

    return run_app(args)


if __name__ == "__main__":
    sys.exit(main())
