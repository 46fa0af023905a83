"""The group level: train on the labelled cohort with subject-level cross-validation and write
OUTPUT_DIR/group/.

    cached participants -> folds -> K models (early stopping) -> out-of-fold predictions -> thresholds
    -> final model -> metrics, shortcut audit, model card, report

Final model (`--final_model`): `refit` (default) retrains one network on all cross-validation participants for
the median of the folds' best epochs (ClinicaDL practice); `fold_ensemble` joins the folds' best networks into
one `FCDEnsemble` that averages their logits (nnU-Net practice: no retraining, and averaging networks trained
apart cancels part of their run-to-run variance). Either is one checkpoint that `participant --model
OUTPUT_DIR/group/model.pt` reads. The fold models stay in `group/fold-<k>/checkpoint_best.pt` (labelled with the
group model's name, version and thresholds, so each can be run the same way); the thresholds
stored with the final model are chosen on the fold models' out-of-fold predictions (`evaluate.THRESHOLD_RULE`,
`evaluate.VOXEL_THRESHOLD_RULE`), made exactly as the participant level makes them (`infer.predict`, same
`--n_passes`): for the ensemble too, whose mean logit is on the scale of its members'.

Multi-GPU: `torchrun --nproc_per_node=N run.py BIDS_DIR OUTPUT_DIR group ...` (see `bids_fcd.engine`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bids_fcd import __version__, exit_codes
from bids_fcd.config import ModelConfig
from bids_fcd.data import (
    Sample,
    SplitPlan,
    as_model_input,
    implant_copies,
    mimic_copies,
    plan_splits,
    prepare_samples,
    sample_seed,
    with_copies,
)
from bids_fcd.derivatives import atomic_path, write_json
from bids_fcd.engine import (
    DistContext,
    FitResult,
    TrainOptions,
    fit,
    pretrain_encoder,
    set_determinism,
    state_digest,
)
from bids_fcd.inputs import LabelSpec, Participant

log = logging.getLogger("bids_fcd.train")

VERSIONED_PACKAGES = ("torch", "numpy", "torchio", "scikit-learn", "neuroCombat", "nibabel", "SimpleITK")
N_BOOTSTRAP = 1000  # resamples behind every 95% confidence interval
SCRATCH_LEARNING_RATE = 1e-3
# Fine-tuning the shipped model at 1e-3 lost validation AUROC as the rate warmed up (every fold best at epoch 1;
# out-of-fold AUROC 0.84 on an 80-participant synthetic cohort); at 1e-4 it held it (0.91).
FINE_TUNE_LEARNING_RATE = 1e-4


def training_options(args: argparse.Namespace, fine_tune: bool) -> TrainOptions:
    """TrainOptions from the group-level command line; the default rate depends on the starting point."""
    default_rate = FINE_TUNE_LEARNING_RATE if fine_tune else SCRATCH_LEARNING_RATE
    return TrainOptions(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate or default_rate,
        grad_accum_steps=args.grad_accum_steps, patience=args.patience,
        mixed_precision=args.mixed_precision, deterministic=args.deterministic,
        augmentation=args.augmentation, pretrain_epochs=args.pretrain_epochs or 0,
        mimic_fraction=args.mimic_fraction, implant_fraction=args.implant_fraction, seed=args.seed,
        n_workers=min(4, args.n_cpus // 2),
    )


class StartingPointError(Exception):
    """The starting model or the requested network cannot be used; `exit_code` is the contract's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def starting_point(args: argparse.Namespace) -> tuple[ModelConfig, dict | None]:
    """The starting model's config (grid, channels, architecture) with the command line's overrides, and the
    weights to start from (None: random initialisation).

    The starting model is --model, else the shipped model when there is one, else `ModelConfig()`. Its weights
    are used unless --from_scratch, or the architecture or its parameters were changed. Checked before any
    preprocessing, so that a wrong --model or --architecture fails in seconds, not after the cohort:
    StartingPointError 66 (missing checkpoint), 65 (unreadable checkpoint), 64 (unknown network or parameters).
    """
    from bids_fcd.models import CheckpointError, build_model, load_checkpoint
    from bids_fcd.participant import DEFAULT_MODEL

    path = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    config, state = ModelConfig(), None
    if path is not None:
        try:
            model, config = load_checkpoint(path)
        except FileNotFoundError as err:
            raise StartingPointError(f"--model: {err}", exit_codes.EXIT_MISSING_INPUT) from err
        except CheckpointError as err:
            raise StartingPointError(f"--model: {err}", exit_codes.EXIT_BAD_DATA) from err
        if config.ensemble_size > 1:  # the group level trains one network: the ensemble's first member
            log.info("%s is an ensemble of %d networks: starting from its first", path, config.ensemble_size)
            model, config = model.members[0], config.updated(ensemble_size=1)
        state = model.state_dict()
        log.info("starting model %s (%s, grid %s at %.1f mm)", path, config.architecture, config.grid_shape,
                 config.grid_spacing_mm)
    changes = {}
    if args.architecture and args.architecture != config.architecture:
        changes.update(architecture=args.architecture, arch_params={})
    if args.arch_params is not None:
        changes["arch_params"] = json.loads(args.arch_params)
    if args.grid_spacing_mm is not None:
        changes["grid_spacing_mm"] = args.grid_spacing_mm
    if args.grid_shape is not None:
        changes["grid_shape"] = tuple(int(side) for side in args.grid_shape.lower().split("x"))
    if {"architecture", "arch_params"} & set(changes) or args.from_scratch:
        state = None
    if path is not None and state is None:
        log.info("training from random initialisation (--from_scratch, or another architecture or "
                 "arch_params)")
    config = config.updated(**changes)
    try:
        build_model(config)
    except (TypeError, ValueError) as err:
        raise StartingPointError(f"--architecture / --arch_params: {err}", exit_codes.EXIT_USAGE) from err
    return config, state


def select_units(units: list[Participant],
                 channels: tuple[str, ...]) -> tuple[list[Participant], dict[str, tuple]]:
    """Units that can train (labelled, with the images the model needs) and {name: (exit code, why)} for
    those missing an image. Unlabelled units are left out with a log line (they are not failures)."""
    usable, failed = [], {}
    for unit in units:
        if unit.label is None:
            log.info("%s: no label in participants.tsv (or n/a): left out of training", unit.name)
        elif unit.t1w is None or ("FLAIR" in channels and unit.flair is None):
            failed[unit.name] = (exit_codes.EXIT_MISSING_INPUT,
                                 "no T1w image" if unit.t1w is None else "no FLAIR image")
            log.error("%s: %s; left out of training", unit.name, failed[unit.name][1])
        else:
            usable.append(unit)
    return usable, failed


def write_folds(path: Path, samples: list[Sample], plan: SplitPlan) -> None:
    """group/folds.tsv: one row per participant/session with its fold (or `test`), label, site and split."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["participant_id", "session", "label", "site", "split", "fold"])
        for sample, fold in zip(samples, plan.fold):
            writer.writerow([sample.participant_id, sample.unit.session or "n/a", sample.label, sample.site,
                             sample.unit.split or "n/a", "test" if fold < 0 else int(fold)])


def fresh_model(config: ModelConfig, state: dict | None, seed: int) -> torch.nn.Module:
    from bids_fcd.models import build_model

    torch.manual_seed(seed)
    model = build_model(config)
    if state is not None:
        model.load_state_dict(state)
    return model


def train_one(config: ModelConfig, state: dict | None, train: list[Sample], val: list[Sample],
              options: TrainOptions, out_dir: Path, fold_id: int, dist: DistContext,
              epochs: int | None = None) -> tuple[torch.nn.Module, FitResult]:
    """A fresh (or starting-model) network, optionally autoencoder-pretrained, trained by `engine.fit`."""
    model = fresh_model(config, state, sample_seed(options.seed, fold_id, 7))
    if options.pretrain_epochs:
        pretrain_encoder(model, train, options, dist, config.grid_spacing_mm, fold_id,
                         out_dir / "pretrained_encoder.pt")
    return model, fit(model, config, train, val, options, out_dir, fold_id, dist, epochs=epochs,
                      start_digest=state_digest(state) if state is not None else None)


@dataclass
class Predicted:
    """Subject probabilities and voxel maps (float16, model grid) of some samples, in their order."""

    indices: np.ndarray
    probability: np.ndarray
    maps: list[np.ndarray]


def predict_samples(model: torch.nn.Module, config: ModelConfig, samples: list[Sample], indices: np.ndarray,
                    device: torch.device, n_passes: int, seed: int) -> Predicted:
    """Predictions exactly as the participant level makes them (`infer.predict`)."""
    from bids_fcd.infer import predict

    probability, maps = [], []
    for i in indices:
        prediction = predict(model, config, samples[i].image, samples[i].brain_mask, device,
                             n_passes=n_passes,
                             seed=seed)
        probability.append(prediction.fcd_probability)
        maps.append(prediction.prob_template.astype(np.float16))
    return Predicted(np.asarray(indices), np.asarray(probability), maps)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "bids_fcd": __version__}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def label_diagnosis(units: list[Participant], label_spec: LabelSpec) -> str:
    """What participants.tsv holds against --label_column / --positive_label: what a user must fix."""
    columns = sorted({key for unit in units for key in unit.metadata if not key.startswith(("T1w_", "FLAIR_"))})
    if not any(label_spec.column in unit.metadata for unit in units):
        return (f"participants.tsv has no column {label_spec.column!r} (--label_column); its columns: "
                f"{', '.join(columns) or 'none (no participants.tsv?)'}")
    values = sorted({str(unit.metadata[label_spec.column]).strip() for unit in units
                     if label_spec.column in unit.metadata})
    test = sum(unit.split == "test" for unit in units)
    return (f"column {label_spec.column!r} holds {values}; --positive_label {label_spec.positive!r} marks FCD, "
            "any other value control, n/a unknown"
            + (f"; {test} participant(s) with split = test are held out of cross-validation" if test else ""))


# What a finished group run leaves, written after training. A rerun withdraws them before it trains, so a run
# that then fails can never leave the last run's model and metrics beside its own folds as if they belonged.
FINISHED_OUTPUTS = ("model.pt", "model.json", "predictions.tsv", "metrics.json", "combat_estimates.json",
                    "report.html", "MODEL_CARD.md")


def withdraw_finished_outputs(group_dir: Path) -> None:
    group_dir.mkdir(parents=True, exist_ok=True)
    for name in FINISHED_OUTPUTS:
        (group_dir / name).unlink(missing_ok=True)


def failure_code(failed: dict[str, tuple]) -> int:
    """Exit code when nothing could train: the shared code if every unit failed the same way, else 1."""
    codes = {code for code, _ in failed.values()}
    return codes.pop() if len(codes) == 1 else exit_codes.EXIT_PARTICIPANT_FAILED


def run_group(args: argparse.Namespace, units: list[Participant], label_spec: LabelSpec) -> int:
    """The group level; returns the contract's exit code (0; 1 when some participants could not be used; the
    shared code when all failed alike; 18, 64, 65 or 66 for the selection, options or starting model)."""
    from bids_fcd.infer import select_device

    dist = DistContext.from_env(select_device(args.device))
    try:
        return _group_level(args, units, label_spec, dist)
    finally:
        dist.close()


def _group_level(args: argparse.Namespace, units: list[Participant], label_spec: LabelSpec,
                 dist: DistContext) -> int:
    """`run_group`'s work, inside the lifetime of this process's place in the process group."""
    from bids_fcd.template import model_grid

    try:
        config, state = starting_point(args)
    except StartingPointError as err:
        log.error("group level: %s", err)
        return err.exit_code
    options = training_options(args, fine_tune=state is not None)
    set_determinism(args.seed, options.deterministic)
    # --n_cpus is the budget: DataLoader workers plus torch's threads (more threads than cores spin and stall)
    torch.set_num_threads(max(1, args.n_cpus - options.n_workers))
    group_dir = args.output_dir / "group"
    usable, failed = select_units(units, config.channels)
    if not usable:
        log.error("group level: no participant with a label and the images needed; %s",
                  label_diagnosis(units, label_spec))
        return failure_code(failed) if failed else exit_codes.EXIT_EMPTY_SELECTION

    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    cache_dir = args.output_dir / "cache"
    if not dist.is_main:  # rank 0 preprocesses what is missing; the others then read the cache
        dist.barrier()
    samples, broken = prepare_samples(usable, cache_dir, grid, config.channels, args.n_cpus)
    if dist.is_main:
        dist.barrier()
    failed.update(broken)
    if not samples:
        log.error("group level: no participant could be prepared for training")
        return failure_code(failed)
    try:
        plan = plan_splits(samples, args.n_folds, args.seed)
    except ValueError as err:
        log.error("group level: %s; %s", err, label_diagnosis(units, label_spec))
        return exit_codes.EXIT_EMPTY_SELECTION
    for note in plan.notes:
        log.warning("%s", note)
    if plan.warning:
        log.warning("%s", plan.warning)
    if dist.is_main:
        withdraw_finished_outputs(group_dir)
        write_folds(group_dir / "folds.tsv", samples, plan)
    log.info("group level: %d unit(s) (%d FCD, %d control), %d-fold cross-validation%s; %d left out",
             len(samples), sum(s.label for s in samples), sum(1 - s.label for s in samples), plan.n_folds,
             f", {len(plan.test_indices)} in the test set" if plan.test_honoured else "", len(failed))

    copies = mimic_copies(samples, plan.cv_indices, options.mimic_fraction, args.seed, grid, config.channels)
    implants = implant_copies(samples, plan.cv_indices, options.implant_fraction, args.seed, grid, config.channels)
    # copies are made on normalised intensities, then read as the network reads every sample
    copies = as_model_copies(copies, config, "non-FCD mimics", "participant(s) also train as a copy with an MS-like, "
                             "infarct or glioma lesion", "--mimic_fraction", options.mimic_fraction,
                             "controls or patients with a lesion mask")
    implants = as_model_copies(implants, config, "simulated FCD", "control(s) also train as a copy with an implanted "
                               "FCD-like lesion, labelled FCD", "--implant_fraction", options.implant_fraction,
                               "controls")
    samples = as_model_input(samples, config)
    results: list[FitResult] = []
    for k in range(plan.n_folds):
        train_idx, val_idx = plan.fold_indices(k)
        _, result = train_one(config, state, with_copies(samples, train_idx, copies, implants),
                              [samples[i] for i in val_idx], options, group_dir / f"fold-{k}", k, dist)
        results.append(result)
    refit_samples = with_copies(samples, plan.cv_indices, copies, implants)
    final_model, final = final_network(args.final_model, config, state, refit_samples, plan, results, options,
                                       group_dir, dist)
    if not dist.is_main:
        return exit_codes.EXIT_OK

    finish_group(GroupRun(args, label_spec, config, samples, plan, results, final, failed, options,
                          dist.device, len(copies), len(implants)), final_model)
    return exit_codes.EXIT_PARTICIPANT_FAILED if failed else exit_codes.EXIT_OK


def as_model_copies(copies: dict[int, Sample], config: ModelConfig, kind: str, made: str, option: str,
                    fraction: float, eligible: str) -> dict[int, Sample]:
    """`copies` as the network reads them (`data.as_model_input`), after logging how many were made or, at a
    positive `fraction`, why none were (`eligible`: which participants can hold one)."""
    if copies:
        log.info("%s: %d %s (%s %.2g), in their own fold's training set only", kind, len(copies), made, option,
                 fraction)
    elif fraction > 0:
        log.warning("%s: none made (%s %.2g): they need T1w and FLAIR channels (the model has %s) and %s", kind,
                    option, fraction, ", ".join(config.channels), eligible)
    return dict(zip(copies, as_model_input(list(copies.values()), config)))


@dataclass
class FinalModel:
    """How the final network was made: its description (metrics, card), refit history, ensemble size."""

    description: str
    history: list[dict]
    ensemble_size: int


def final_network(kind: str, config: ModelConfig, state: dict | None, refit_samples: list[Sample],
                  plan: SplitPlan, folds: list[FitResult], options: TrainOptions, group_dir: Path,
                  dist: DistContext) -> tuple[torch.nn.Module, FinalModel]:
    """The model written as group/model.pt: a refit on `refit_samples` (every cross-validation unit and their
    mimic and implant copies), or the folds' ensemble."""
    from bids_fcd.models import ensemble_of

    if kind == "fold_ensemble":
        dist.barrier()  # rank 0 has written every fold's checkpoint_best.pt before any rank reads them
        model, _ = ensemble_of([group_dir / f"fold-{k}" / "checkpoint_best.pt" for k in range(plan.n_folds)])
        log.info("final model: soft-voting ensemble of the %d folds' best networks", plan.n_folds)
        return model, FinalModel(f"soft-voting ensemble of the {plan.n_folds} folds' best networks (logits "
                                 "averaged; no refit)", [], plan.n_folds)
    epochs = max(1, round(float(np.median([r.best_epoch for r in folds]))))
    log.info("final model: refit on %d unit(s) for %d epoch(s) (median best epoch of the folds)",
             len(plan.cv_indices), epochs)
    model, result = train_one(config, state, refit_samples, [], options, group_dir / "final", plan.n_folds, dist,
                              epochs=epochs)
    return model, FinalModel(f"refit on all {len(plan.cv_indices)} cross-validation units for {epochs} epochs "
                             "(median best epoch of the folds)", result.history, 1)


# --- after training: out-of-fold predictions, thresholds, metrics, audit, outputs ---------------------------


@dataclass
class GroupRun:
    """Everything the training part hands to the evaluation and outputs."""

    args: argparse.Namespace
    label_spec: LabelSpec
    config: ModelConfig
    samples: list[Sample]
    plan: SplitPlan
    folds: list[FitResult]
    final: FinalModel
    failed: dict[str, tuple]
    options: TrainOptions
    device: torch.device
    n_mimic_copies: int = 0
    n_implant_copies: int = 0

    @property
    def group_dir(self) -> Path:
        return self.args.output_dir / "group"

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])


def out_of_fold(run: GroupRun) -> Predicted:
    """Each fold's best model on its validation participants, concatenated (fold order)."""
    from bids_fcd.models import load_checkpoint

    parts = []
    for k in range(run.plan.n_folds):
        model, _ = load_checkpoint(run.group_dir / f"fold-{k}" / "checkpoint_best.pt", run.device)
        parts.append(predict_samples(model, run.config, run.samples, run.plan.fold_indices(k)[1], run.device,
                                     run.args.n_passes, run.args.seed))
    return Predicted(np.concatenate([p.indices for p in parts]),
                     np.concatenate([p.probability for p in parts]),
                     [m for p in parts for m in p.maps])


def thresholds(run: GroupRun, oof: Predicted) -> tuple[float, float, str]:
    """(subject threshold, voxel threshold, voxel threshold rule) from the out-of-fold predictions."""
    from bids_fcd.evaluate import VOXEL_THRESHOLD_RULE, choose_voxel_threshold, youden_threshold

    subject = youden_threshold(run.labels[oof.indices], oof.probability)
    known = [(oof.maps[j], lesion) for j, i in enumerate(oof.indices)
             if (lesion := known_lesion(run.samples[i])) is not None]
    if not known:
        return subject, run.config.voxel_threshold, ("kept from the starting model (no control and no lesion "
                                                     "mask to count false positives on)")
    voxel = choose_voxel_threshold([prob for prob, _ in known], [lesion for _, lesion in known],
                                   run.config.min_cluster_voxels)
    return subject, voxel, VOXEL_THRESHOLD_RULE


def known_lesion(sample: Sample) -> np.ndarray | None:
    """The sample's lesion mask; all zero for a control; None for a patient without a mask."""
    if sample.lesion is not None:
        return sample.lesion
    return np.zeros(sample.brain_mask.shape, dtype=bool) if sample.label == 0 else None


def lesion_froc(run: GroupRun, predicted: Predicted) -> dict:
    """`evaluate.froc` over `predicted`'s controls and patients with a lesion mask: the detection another voxel
    threshold would give for the false candidates it would cost, beside the one threshold the model ships with."""
    from bids_fcd.evaluate import froc, froc_case

    labels, cases = [], []
    for j, i in enumerate(predicted.indices):
        lesion = known_lesion(run.samples[i])
        has_lesion = lesion is not None and bool((lesion >= 0.5).any())
        if lesion is None or bool(run.samples[i].label) != has_lesion:  # unknown, or a patient's empty mask
            continue
        labels.append(int(has_lesion))
        cases.append(froc_case(predicted.maps[j].astype(np.float32), lesion, run.config.min_cluster_voxels))
    return froc(labels, cases)


def prediction_rows(run: GroupRun, predicted: Predicted, fold_of: list[str], subject_threshold: float,
                    voxel_threshold: float) -> list[dict]:
    """One predictions.tsv row per sample of `predicted`, with its lesion localisation outcome and, where the
    lesion is known, its volume, FLAIR contrast and depth inside the brain mask (`evaluate.lesion_conspicuity`):
    which lesions are missed; and the map's peak inside it: whether a miss was near the cut or unseen."""
    from bids_fcd.evaluate import lesion_case, lesion_conspicuity

    rows = []
    min_voxels = run.config.min_cluster_voxels
    flair_channel = run.config.channels.index("FLAIR") if "FLAIR" in run.config.channels else None
    for j, i in enumerate(predicted.indices):
        sample = run.samples[i]
        prob = predicted.maps[j].astype(np.float32)
        case = lesion_case(prob, known_lesion(sample), voxel_threshold, min_voxels)
        conspicuity = {"volume_ml": None, "flair_contrast": None, "edge_distance_mm": None}
        peak = None
        if case["detected"] is not None:  # a non-empty lesion mask
            conspicuity = lesion_conspicuity(None if flair_channel is None else sample.image[flair_channel],
                                             sample.lesion, sample.brain_mask, run.config.grid_spacing_mm)
            peak = float(prob[sample.lesion >= 0.5].max())
        meta = sample.unit.metadata
        rows.append({
            "participant_id": sample.participant_id, "session": sample.unit.session or "n/a",
            "label": "fcd" if sample.label else "control", "fold": fold_of[j],
            "split": sample.unit.split or "n/a", "site": sample.site,
            "T1w_acq": meta.get("T1w_acq", "n/a"), "FLAIR_acq": meta.get("FLAIR_acq", "n/a"),
            "fcd_probability": round(float(predicted.probability[j]), 6),
            "predicted": "fcd" if predicted.probability[j] >= subject_threshold else "control",
            "has_lesion_mask": sample.lesion is not None, "n_clusters": case["n_clusters"],
            "n_false_positive": case["n_false_positive"], "lesion_detected": case["detected"],
            "dice": _rounded(case["dice"], 4),
            "lesion_volume_ml": _rounded(conspicuity["volume_ml"], 3),
            "lesion_flair_contrast": _rounded(conspicuity["flair_contrast"], 3),
            "lesion_edge_distance_mm": _rounded(conspicuity["edge_distance_mm"], 2),
            "lesion_peak_probability": _rounded(peak, 4),
        })
    return rows


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def cohort_metrics(frame: pd.DataFrame, threshold: float, n_boot: int, seed: int) -> dict:
    """Subject and lesion metrics (with CIs) of a predictions table, overall and by site."""
    from bids_fcd.evaluate import (
        LESION_EDGE_DISTANCE_EDGES_MM,
        LESION_VOLUME_EDGES_ML,
        by_group,
        detection_by_band,
        lesion_metrics_with_ci,
        missed_lesions,
        subject_metrics_with_ci,
    )

    def compute(rows: pd.DataFrame) -> dict:
        cases = [{"n_clusters": r.n_clusters, "n_false_positive": None if pd.isna(r.n_false_positive)
                  else int(r.n_false_positive), "detected": None if pd.isna(r.lesion_detected)
                  else bool(r.lesion_detected), "dice": None if pd.isna(r.dice) else float(r.dice)}
                 for r in rows.itertuples()]
        labels = (rows["label"] == "fcd").to_numpy().astype(int)
        return {"subject": subject_metrics_with_ci(labels, rows["fcd_probability"].to_numpy(), threshold,
                                                   n_boot, seed, groups=rows["participant_id"].to_numpy()),
                "lesion": lesion_metrics_with_ci(cases, n_boot, seed)}

    result = compute(frame)
    with_lesion = frame[frame["lesion_volume_ml"].notna()]
    detected = with_lesion["lesion_detected"].astype(bool).to_numpy()
    result["lesion_by_volume"] = detection_by_band(with_lesion["lesion_volume_ml"].to_numpy(), detected,
                                                   LESION_VOLUME_EDGES_ML, "mL")
    result["lesion_by_edge_distance"] = detection_by_band(with_lesion["lesion_edge_distance_mm"].to_numpy(),
                                                          detected, LESION_EDGE_DISTANCE_EDGES_MM, "mm")
    result["missed_lesions"] = missed_lesions(detected, with_lesion["lesion_peak_probability"].astype(float))
    result["by_site"] = by_group(frame["site"].to_numpy(), lambda mask: compute(frame[mask]))
    return result


def finish_group(run: GroupRun, final_model: torch.nn.Module) -> None:
    """OOF evaluation, thresholds, test set, audit; then model.pt, predictions, metrics, card, report."""
    from bids_fcd import audit
    from bids_fcd.evaluate import THRESHOLD_RULE, youden_threshold_ci
    from bids_fcd.group_report import GroupSummary, write_model_card, write_report
    from bids_fcd.models import save_checkpoint

    args, plan, samples = run.args, run.plan, run.samples
    oof = out_of_fold(run)
    subject_threshold, voxel_threshold, voxel_rule = thresholds(run, oof)
    log.info("thresholds from out-of-fold predictions: subject %.3f, voxel %.2f", subject_threshold,
             voxel_threshold)
    subject_threshold_ci = youden_threshold_ci(
        run.labels[oof.indices], oof.probability, N_BOOTSTRAP, args.seed,
        groups=np.array([samples[i].participant_id for i in oof.indices]))
    rows = prediction_rows(run, oof, [str(plan.fold[i]) for i in oof.indices], subject_threshold,
                           voxel_threshold)
    if plan.test_honoured:
        final_model = final_model.to(run.device)
        test = predict_samples(final_model, run.config, samples, plan.test_indices, run.device, args.n_passes,
                               args.seed)
        rows += prediction_rows(run, test, ["test"] * len(plan.test_indices), subject_threshold,
                                voxel_threshold)
    frame = pd.DataFrame(rows)
    cv_rows, test_rows = frame[frame["fold"] != "test"], frame[frame["fold"] == "test"]
    metrics: dict = {
        "protocol": {
            "n_folds": plan.n_folds, "seed": args.seed, "test_set": "participants.tsv split = test"
            if plan.test_honoured else None, "split_warning": plan.warning, "notes": plan.notes,
            "subject_threshold": subject_threshold, "subject_threshold_ci95": subject_threshold_ci,
            "threshold_rule": THRESHOLD_RULE,
            "voxel_threshold": voxel_threshold, "voxel_threshold_rule": voxel_rule,
            "min_cluster_mm3": run.config.min_cluster_mm3, "n_bootstrap": N_BOOTSTRAP,
            "final_model": run.final.description,
            "mimic_copies": f"{run.n_mimic_copies} cross-validation participant(s) also trained as a copy with a "
                            f"non-FCD lesion (--mimic_fraction {run.options.mimic_fraction:g}), in their own fold only",
            "implant_copies": f"{run.n_implant_copies} cross-validation control(s) also trained as a copy with a "
                              f"simulated FCD lesion, labelled FCD (--implant_fraction "
                              f"{run.options.implant_fraction:g}), in their own fold only",
            "predictions": f"infer.predict with {args.n_passes} pass(es), as the participant level"},
        "cohort": {"n_units": len(samples), "n_participants": len({s.participant_id for s in samples}),
                   "n_fcd": int(run.labels.sum()), "n_control": int((run.labels == 0).sum()),
                   "n_with_lesion_mask": sum(s.lesion is not None for s in samples),
                   "left_out": {name: {"exit_code": code, "reason": why}
                                for name, (code, why) in run.failed.items()}},
        "cross_validation": cohort_metrics(cv_rows, subject_threshold, N_BOOTSTRAP, args.seed),
        "folds": [{"fold": k, "best_epoch": r.best_epoch, "epochs_run": len(r.history),
                   "best_val_loss": min((h["val_loss"] for h in r.history), default=None),
                   "n_train": len(plan.fold_indices(k)[0]), "n_val": len(plan.fold_indices(k)[1])}
                  for k, r in enumerate(run.folds)],
    }
    metrics["cross_validation"]["froc"] = lesion_froc(run, oof)
    if plan.test_honoured:
        metrics["test"] = {**cohort_metrics(test_rows, subject_threshold, N_BOOTSTRAP, args.seed),
                           "froc": lesion_froc(run, test)}
    elif plan.official_test.any():
        official = cv_rows[cv_rows["split"] == "test"]
        metrics["official_test_patients"] = {
            "note": "out-of-fold predictions of the participants participants.tsv marks `test`",
            **cohort_metrics(official, subject_threshold, N_BOOTSTRAP, args.seed)}

    report = audit.run_audit(samples, plan, final_model, run.device, metrics, args.embedding, args.seed)
    metrics["shortcut_audit"], metrics["harmonisation"] = report.shortcut, report.harmonisation
    metrics["warnings"] = [w for w in (plan.warning, report.shortcut.get("warning")) if w]
    for warning in metrics["warnings"]:
        log.warning("%s", warning)
    if report.combat_estimates is not None:
        write_json(run.group_dir / "combat_estimates.json", report.combat_estimates)
    write_json(run.group_dir / "metrics.json", metrics)
    with atomic_path(run.group_dir / "predictions.tsv") as temporary:
        frame.to_csv(temporary, sep="\t", index=False, na_rep="n/a")

    final_config = run.config.updated(
        ensemble_size=run.final.ensemble_size, subject_threshold=subject_threshold,
        voxel_threshold=voxel_threshold, name="bids_fcd-group",
        model_version=f"{__version__}+group.{date.today().isoformat()}",
        training=training_record(run, metrics, subject_threshold), versions=package_versions())
    save_checkpoint(final_model.cpu(), final_config, run.group_dir / "model.pt")
    relabel_fold_checkpoints(run.group_dir, plan.n_folds, final_config)
    summary = GroupSummary(config=final_config, metrics=metrics, predictions=frame,
                           fold_histories=[r.history for r in run.folds], final_history=run.final.history,
                           cohort=cohort_table(samples, plan), audit=report)
    write_model_card(run.group_dir / "MODEL_CARD.md", summary)
    write_report(run.group_dir, summary)
    log.info("group level: wrote %s (model.pt, model.json, folds.tsv, predictions.tsv, metrics.json, "
             "MODEL_CARD.md, report.html)", run.group_dir)


def relabel_fold_checkpoints(group_dir: Path, n_folds: int, final_config: ModelConfig) -> None:
    """Give each fold's best checkpoint the group model's name, version, thresholds and package versions, keeping
    its own fold record: written during training, it still carried the starting model's (a fine-tune's fold model,
    run with `participant --model`, called itself the shipped model and cut at the shipped thresholds)."""
    from bids_fcd.models import load_checkpoint, save_checkpoint

    for k in range(n_folds):
        path = group_dir / f"fold-{k}" / "checkpoint_best.pt"
        model, config = load_checkpoint(path)
        save_checkpoint(model, final_config.updated(ensemble_size=1, training=config.training), path)


def training_record(run: GroupRun, metrics: dict, subject_threshold: float) -> dict:
    """ModelConfig.training of the final model: data, folds, options, rules and headline metrics."""
    cv = metrics["cross_validation"]
    headline = {f"cv_{k}": cv["subject"][k] for k in ("auroc", "balanced_accuracy", "sensitivity",
                                                      "specificity")}
    headline.update({f"cv_lesion_{k}": cv["lesion"][k] for k in ("detection_rate", "dice")})
    if "test" in metrics:
        headline.update({f"test_{k}": metrics["test"]["subject"][k] for k in ("auroc", "balanced_accuracy")})
    return {
        "dataset": {"bids_dir": str(run.args.bids_dir.resolve()), **{k: metrics["cohort"][k] for k in (
            "n_units", "n_participants", "n_fcd", "n_control", "n_with_lesion_mask")},
            "participants": sorted({s.participant_id for s in run.samples})},
        "label": {"column": run.label_spec.column, "positive": run.label_spec.positive},
        "folds": {"n_folds": run.plan.n_folds, "seed": run.args.seed, "file": "folds.tsv",
                  "best_epochs": [r.best_epoch for r in run.folds],
                  "test_set": metrics["protocol"]["test_set"]},
        "final_model": metrics["protocol"]["final_model"],
        "options": run.options.signature(),
        "threshold_rule": f"{metrics['protocol']['threshold_rule']} (threshold {subject_threshold:.4f})",
        "voxel_threshold_rule": metrics["protocol"]["voxel_threshold_rule"],
        "metrics": headline,
        "shortcut_audit": {"metadata_auroc": (metrics["shortcut_audit"].get("best") or {}).get("auroc"),
                           "warning": metrics["shortcut_audit"].get("warning")},
        "date": date.today().isoformat(),
    }


def cohort_table(samples: list[Sample], plan: SplitPlan) -> pd.DataFrame:
    """Label, site, split, fold, age and sex per unit (the report's cohort composition)."""
    from bids_fcd.audit import AGE_COLUMNS

    return pd.DataFrame([{
        "participant_id": s.participant_id, "label": "fcd" if s.label else "control", "site": s.site,
        "split": s.unit.split or "n/a", "fold": "test" if f < 0 else str(f),
        "age": pd.to_numeric(next((s.unit.metadata[c] for c in AGE_COLUMNS if c in s.unit.metadata), None),
                             errors="coerce"),
        "sex": s.unit.metadata.get("sex", "n/a")} for s, f in zip(samples, plan.fold)])
