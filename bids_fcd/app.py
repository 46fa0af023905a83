"""One run of the BIDS App after the arguments are parsed: validate, select, run every unit, summarise.

Checks run in the contract's order (validation 16, then selection 18); then each participant/session runs on
its own, in parallel processes with --n_cpus, and one failure never stops the others.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bids_fcd import exit_codes
from bids_fcd.derivatives import init_output_dataset
from bids_fcd.inputs import InputError, LabelSpec, Participant, discover
from bids_fcd.participant import DEFAULT_MODEL, ParticipantSettings, UnitResult, run_participant

log = logging.getLogger("bids_fcd")


def selected_subjects(bids_dir: Path, participant_labels: list[str] | None) -> list[str]:
    """Labels the validator's errors are matched against: the requested ones, else every sub-* folder."""
    if participant_labels:
        return participant_labels
    return sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())


def run_app(args: argparse.Namespace) -> int:
    bids_dir, output_dir = args.bids_dir, args.output_dir
    if not args.skip_bids_validator:
        from bids_fcd.validation import ValidatorError, validate_input

        try:
            result = validate_input(bids_dir, selected_subjects(bids_dir, args.participant_label))
        except ValidatorError as err:
            log.error("BIDS validation of %s could not run: %s\nFix the validator's environment, or rerun with "
                      "--skip_bids_validator.", bids_dir, err)
            return exit_codes.EXIT_VALIDATION
        if result.blocking:
            log.error("BIDS validation failed for %s with %d error(s) in the selected participants or "
                      "dataset_description.json:\n%s\nFix them, or rerun with --skip_bids_validator.",
                      bids_dir, len(result.blocking), result.summary())
            return exit_codes.EXIT_VALIDATION

    label_spec = LabelSpec(column=args.label_column, positive=args.positive_label)
    try:
        units = discover(bids_dir, args.participant_label, args.session_label, args.filters, label_spec)
    except InputError as err:
        log.error("%s", err)
        return err.exit_code

    init_output_dataset(output_dir, bids_dir)
    if args.analysis_level == "group":
        from bids_fcd.train import run_group

        return run_group(args, units, label_spec)
    return run_participants(args, units)


def run_participants(args: argparse.Namespace, units: list[Participant]) -> int:
    """Run every unit, in parallel processes when --n_cpus > 1; log progress and a closing summary."""
    model_path = args.model or DEFAULT_MODEL
    if not Path(model_path).is_file():
        log.error("model checkpoint %s does not exist", model_path)
        return exit_codes.EXIT_MISSING_INPUT
    # Each run gets its own scratch folder, so parallel jobs sharing OUTPUT_DIR never delete each other's.
    work_root = Path(args.work_dir or args.output_dir / "work")
    work_root.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_root))
    n_workers = min(args.n_cpus, len(units))
    settings = ParticipantSettings(
        bids_dir=Path(os.path.abspath(args.bids_dir)), output_dir=args.output_dir.resolve(), work_dir=work_dir,
        model_path=Path(model_path).resolve(), device=args.device, n_threads=max(1, args.n_cpus // n_workers),
        seed=args.seed, n_passes=args.n_passes,
    )
    log.info("participant level: %d unit(s), %d process(es) x %d thread(s)", len(units), n_workers,
             settings.n_threads)
    results: list[UnitResult] = []
    if n_workers == 1:
        for index, unit in enumerate(units, 1):
            results.append(run_participant(unit, settings))
            report_progress(index, len(units), results[-1])
    else:
        # spawn, not fork: torch's thread pools do not survive a fork.
        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_participant, unit, settings) for unit in units]
            for index, future in enumerate(as_completed(futures), 1):
                results.append(future.result())
                report_progress(index, len(units), results[-1])
    code = summarise(results)
    if code == exit_codes.EXIT_OK:
        shutil.rmtree(work_dir, ignore_errors=True)
        if args.work_dir is None and not any(work_root.iterdir()):
            work_root.rmdir()
    return code


def report_progress(index: int, total: int, result: UnitResult) -> None:
    status = "done" if result.code == 0 else f"FAILED (exit {result.code})"
    log.info("[%d/%d] %s %s %s", index, total, result.name, status, result.message)


def summarise(results: list[UnitResult]) -> int:
    """0 if all succeeded; the shared code if every unit failed for one same reason; else 1."""
    failed = [r for r in results if r.code != 0]
    log.info("summary: %d of %d unit(s) succeeded", len(results) - len(failed), len(results))
    for result in failed:
        log.error("  %s failed (exit %d): %s", result.name, result.code, result.message)
    if not failed:
        return exit_codes.EXIT_OK
    codes = {r.code for r in failed}
    if len(failed) == len(results) and len(codes) == 1:
        return codes.pop()
    return exit_codes.EXIT_PARTICIPANT_FAILED
