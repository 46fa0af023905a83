"""Train the shipped default model, `bids_fcd/weights/model.pt`, with this project's own training engine.

    python tools/train_default_model.py --out bids_fcd/weights --seed 0

What it trains on (all simulated lesions, never a patient):
- volumes drawn on the model grid by `bids_fcd.synth.synth_template_sample` (nilearn's MNI152 2009 anatomy,
  smoothly deformed, with random contrasts, noise and bias; half carry an implanted FCD-like lesion);
- the two real glioma brains the data README allows as base anatomy (`glioma-brainlesion`, T1w + FLAIR),
  preprocessed by the participant pipeline, with FCD-like lesions implanted away from the tumour and its
  oedema, and as they are (a real FLAIR-bright lesion that is not FCD, labelled control);
- non-FCD distractors: FLAIR-bright, T1-dark ovoid lesions in the deep white matter (small-vessel / MS-like),
  labelled control, so that "bright on FLAIR" alone is not FCD (`--no_distractors` leaves them out; what that
  does to detection is measured in benchmarks/results/model_candidates.md, candidates 12-13);
- in phase 2, non-FCD lesion mimics (`bids_fcd.mimics`: MS-like plaques, chronic infarcts, gliomas with oedema)
  in synthetic and real anatomy, in controls and beside FCD implants, their voxels labelled not-lesion: the
  unseen real stroke, MS and glioma brains were the first model's worst false positives.

The network is the seed card's MobileNetV3-Small-3D with the lesion decoder and the lesion-evidence subject head.
Four phases. (1) 48^3 patches (72 mm), lesion-centred or random, teach the lesion features fast on a CPU.
(2) Whole volumes fine-tune it for the way it predicts: the network is convolutional but not patch-invariant
(squeeze-excitation pools each block over its whole input; batch-norm statistics were gathered on patches).
Measured: the patch-only model marked ~10^5 voxels of whole synthetic brains above 0.5 (whole-volume subject
AUROC 0.50), the same weights applied tile by tile ~400; after one whole-volume epoch at warm-up learning rate
the held-out whole-volume AUROC was 1.0. (3) A short fine-tune on synthetic participants pushed through the
participant level's real preprocessing (`--n_pipeline`; 0 skips it), whose brain-mask edges and interpolation
template-grid volumes never show: on pipeline-preprocessed controls the phase-2 model's confident false
candidates sat at the brain's outer edge. (4) A second short fine-tune for what the unseen real brains showed
the synthetic data lacked: real FLAIR sits lower after normalisation (its bright tail sets the 99th percentile;
measured on the two real training brains), so synthetic FLAIR is rescaled to real levels; and MS plaques are
mostly T1-isointense, which the mimics now include. Measured since (model_candidates.md, candidates 12-15): the
rescaling in this short fine-tune silences deep lesions, the mimics do not; `--no_realism_levels` and
`--no_realism_mimics` leave either out. `--histogram_standardisation` takes the level (and shape) difference out
of the input instead: every volume's in-brain histogram is mapped to landmarks of the phase-1 training volumes
(`preprocess.model_input`, TorchIO's Nyul-Udupa standardisation), in training and in use alike, which also makes
phase 4's FLAIR rescaling a no-op (candidate 16: best synthetic figures, real-anatomy detection unchanged).
`--finetune_from` loads a model made by phases 1-3 and runs phase 4 only
(phase 4 draws its own random numbers, so it is the same either way).
Thresholds are chosen on a calibration cohort that no training step saw: `bids_fcd synth` participants written
as raw native-space scans and pushed through the participant level's own preprocessing (N4, brain extraction,
registration, resampling), so that they are set on what the model sees in use. Template-grid validation volumes
gave a subject threshold that called half the demo's patients control: preprocessing compresses the
probabilities. The subject threshold is Youden's J on the subject probability, the voxel threshold the group
level's rule (`evaluate.VOXEL_THRESHOLD_RULE`: the lowest keeping false-positive clusters per calibration participant
within a bound), both on maps made with the participant level's test-time passes. `--recalibrate` chooses them
again for the model already in `--out`, without retraining.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from bids_fcd import __version__
from bids_fcd.cache import load_or_preprocess
from bids_fcd.config import DEFAULT_N_PASSES, ModelConfig
from bids_fcd.data import Sample, prepare_samples
from bids_fcd.engine import DistContext, TrainOptions, fit, state_digest
from bids_fcd.evaluate import THRESHOLD_RULE, VOXEL_THRESHOLD_RULE, choose_voxel_threshold, youden_threshold
from bids_fcd.infer import predict, select_device
from bids_fcd.inputs import Participant, discover
from bids_fcd.lesions import bright_lesion_region, implant_fcd, sample_lesion_params, tissue_probabilities
from bids_fcd.mimics import MIMIC_KINDS, mimic_copy
from bids_fcd.models import build_model, ensemble_of, load_checkpoint, save_checkpoint
from bids_fcd.preprocess import NORMALISED_RANGE, histogram_landmarks, model_input
from bids_fcd.synth import make_cohort, neocortical_territory, synth_template_sample, template_tissue_maps
from bids_fcd.template import model_grid

log = logging.getLogger("train_default_model")
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
TRAINING_BRAINS = [("glioma-brainlesion", "sub-bratsgli00001"), ("glioma-brainlesion", "sub-tcgadu7294")]
PATCH = 48
PIPELINE_SEED = 5000  # + --seed: phase 3's participants
CALIBRATION_SEED = 4000  # + --seed; not the seeds of the model card's test cohort (2026) or the demo (7)
REALISM_STREAM = 4  # phase 4 draws from default_rng([--seed, REALISM_STREAM]): the same with or without phases 1-3
# In-brain FLAIR median after normalisation: the synthetic generator's sits at 0.74-0.85, the two real training
# brains' at 0.48 and 0.68 (real FLAIR has a bright tail that sets the 99th percentile). Phase 4 rescales each
# synthetic FLAIR to a median drawn in this range.
FLAIR_MEDIAN_RANGE = (0.45, 0.85)


class Volume:
    """A whole model-grid volume: image (2, X, Y, Z), brain mask, lesion mask (uint8), subject label, origin."""

    def __init__(self, image: np.ndarray, brain: np.ndarray, lesion: np.ndarray, label: int, origin: str):
        self.image, self.brain, self.lesion, self.label, self.origin = image, brain, lesion, label, origin


def synthetic_volume(rng: np.random.Generator, grid, with_lesion: bool) -> Volume:
    t1w, flair, brain, lesion = synth_template_sample(rng, grid, with_lesion)
    return Volume(np.stack([t1w, flair]), brain.astype(bool), lesion, int(with_lesion), "synthetic")


class RealHead(NamedTuple):
    """One allowed real training brain, preprocessed, with what an implant needs: tissue maps and the region to keep
    clear of (its tumour and oedema)."""

    subject: str
    pre: object  # preprocess.Preprocessed
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    exclude: np.ndarray


def real_heads(grid, cache_dir: Path) -> list[RealHead]:
    """The allowed real training brains (TRAINING_BRAINS) through the participant level's cached preprocessing."""
    template_gm, template_wm, _ = template_tissue_maps(grid)
    heads = []
    for folder, subject in TRAINING_BRAINS:
        t1w_path, flair_path = REAL / folder / f"{subject}_T1w.nii.gz", REAL / folder / f"{subject}_FLAIR.nii.gz"
        pre = load_or_preprocess(cache_dir, t1w_path, flair_path, grid)
        brain = pre.brain_mask.astype(bool)
        gm, wm = tissue_probabilities(pre.t1w, brain, template_gm, template_wm, grid.spacing_mm)
        heads.append(RealHead(subject, pre, brain, gm, wm, bright_lesion_region(pre.flair, brain, grid.spacing_mm)))
    return heads


def real_volumes(grid, cache_dir: Path, rng: np.random.Generator, implants_per_brain: int,
                 mimic_rng: np.random.Generator | None = None) -> list[Volume]:
    """The allowed real brains as they are (label 0) and with FCD-like implants away from the tumour (label 1).

    With `mimic_rng`: also each brain with one mimic of every kind (label 0), and every other implanted copy
    with a mimic beside its FCD lesion.
    """
    volumes = []
    territory = neocortical_territory(grid)
    for head in real_heads(grid, cache_dir):
        as_is = Volume(np.stack([head.pre.t1w, head.pre.flair]), head.brain, np.zeros(grid.shape, np.uint8), 0,
                       head.subject)
        volumes.append(as_is)
        if mimic_rng is not None:
            volumes += [with_mimic(as_is, mimic_rng, head.gm, head.wm, grid.spacing_mm, kind) for kind in MIMIC_KINDS]
        for implant_index in range(implants_per_brain):
            params = sample_lesion_params(rng, head.gm, head.wm, grid.spacing_mm, exclude_mask=head.exclude,
                                          territory_mask=territory)
            t1w, flair, lesion = implant_fcd(head.pre.t1w, head.pre.flair, head.gm, head.wm, params, grid.spacing_mm)
            implanted = Volume(np.stack([t1w, flair]), head.brain, lesion, 1, f"{head.subject}+implant")
            if mimic_rng is not None and implant_index % 2 == 1:
                implanted = with_mimic(implanted, mimic_rng, head.gm, head.wm, grid.spacing_mm,
                                       MIMIC_KINDS[implant_index // 2 % len(MIMIC_KINDS)])
            volumes.append(implanted)
    return volumes


def with_mimic(volume: Volume, rng: np.random.Generator, gm: np.ndarray, wm: np.ndarray, spacing_mm: float,
               kind: str) -> Volume:
    """A copy of `volume` with one non-FCD lesion of `kind` clear of its FCD lesion, renormalised as the
    pipeline would (a large FLAIR-bright mimic moves the brain's intensity percentiles); same labels."""
    image = np.stack(mimic_copy(rng, volume.image[0], volume.image[1], volume.brain, volume.lesion, gm, wm,
                                spacing_mm, kind))
    return Volume(image, volume.brain, volume.lesion, volume.label, f"{volume.origin}+{kind}")


def mimic_volumes(rng: np.random.Generator, grid, n: int) -> list[Volume]:
    """`n` synthetic volumes each with one mimic (kinds in turn); every other one also has an FCD lesion."""
    gm, wm, _ = template_tissue_maps(grid)
    return [with_mimic(synthetic_volume(rng, grid, with_lesion=i % 2 == 0), rng, gm, wm, grid.spacing_mm,
                       MIMIC_KINDS[i // 2 % len(MIMIC_KINDS)]) for i in range(n)]


def add_distractors(volume: Volume, rng: np.random.Generator, wm: np.ndarray, spacing_mm: float, n: int) -> None:
    """Implant `n` non-FCD white-matter lesions: ovoid, FLAIR-bright and T1-dark, away from the cortex."""
    deep_wm = ndimage.binary_erosion(wm > 0.9, iterations=max(1, round(4.0 / spacing_mm)))
    candidates = np.argwhere(deep_wm & (volume.lesion == 0))
    if len(candidates) == 0:
        return
    grid_index = np.indices(wm.shape, dtype=np.float32)
    for centre in candidates[rng.choice(len(candidates), size=n)]:
        radii_vox = rng.uniform(2.0, 6.0, size=3) / spacing_mm
        distance = sum(((grid_index[a] - centre[a]) / radii_vox[a]) ** 2 for a in range(3))
        blob = np.exp(-2.0 * distance) * (distance < 2.0)
        wm_level = np.median(volume.image[:, wm > 0.9], axis=1)
        volume.image[0] -= blob * wm_level[0] * rng.uniform(0.1, 0.35)
        volume.image[1] += blob * wm_level[1] * rng.uniform(0.4, 1.0)


def distract_controls(volumes: list[Volume], rng: np.random.Generator, wm: np.ndarray, spacing_mm: float,
                      apply: bool) -> None:
    """Distractors into every other control (`volumes[1::4]`: the volumes alternate FCD / control). With `apply`
    False their random numbers are still drawn, on a copy, so that every other volume of the run is the same: a
    run with `--no_distractors` differs from one without it in the distractors alone."""
    for volume in volumes[1::4]:
        target = volume if apply else Volume(volume.image.copy(), volume.brain, volume.lesion, volume.label,
                                             volume.origin)
        add_distractors(target, rng, wm, spacing_mm, n=int(rng.integers(2, 8)))


def with_flair_level(volume: Volume, rng: np.random.Generator) -> Volume:
    """A copy whose FLAIR is scaled so that its in-brain median is drawn in FLAIR_MEDIAN_RANGE; lesion contrast,
    a fraction of the tissue's own intensity, scales with it."""
    median = float(np.median(volume.image[1][volume.brain]))
    scale = rng.uniform(*FLAIR_MEDIAN_RANGE) / max(median, 1e-3)
    image = np.stack([volume.image[0], np.clip(volume.image[1] * scale, *NORMALISED_RANGE).astype(np.float32)])
    return Volume(image, volume.brain, volume.lesion, volume.label, volume.origin)


def realism_volumes(args: argparse.Namespace, grid, pipeline: list[Volume]) -> list[Volume]:
    """Phase 4's training set: the preprocessed pipeline participants and fresh synthetic volumes (half with FCD,
    half of them with a non-FCD mimic) with real-like FLAIR levels, and one fresh draw of the real brains with
    implants and mimics (`--realism_real_rounds` draws, the later ones from their own generators so the first is
    the same with or without them). With `--no_realism_mimics` no mimics (the real brains' implant sites are then other draws
    of the same stream); with `--no_realism_levels` every FLAIR at the level it was made at (the last draws)."""
    rng = np.random.default_rng([args.seed, REALISM_STREAM])
    gm, wm, _ = template_tissue_maps(grid)
    synthetic = [synthetic_volume(rng, grid, with_lesion=i % 2 == 0) for i in range(args.n_realism)]
    if not args.no_realism_mimics:
        synthetic = [with_mimic(v, rng, gm, wm, grid.spacing_mm, MIMIC_KINDS[i // 2 % len(MIMIC_KINDS)])
                     if i % 4 < 2 else v for i, v in enumerate(synthetic)]
    real = real_volumes(grid, args.work_dir / "cache", rng, args.implants_per_brain,
                        mimic_rng=None if args.no_realism_mimics else rng)
    for round_index in range(1, args.realism_real_rounds):
        extra_rng = np.random.default_rng([args.seed, REALISM_STREAM, round_index])
        real += real_volumes(grid, args.work_dir / "cache", extra_rng, args.implants_per_brain,
                             mimic_rng=None if args.no_realism_mimics else extra_rng)
    if args.no_realism_levels:
        return pipeline + synthetic + real
    return [with_flair_level(v, rng) for v in pipeline + synthetic] + real


def standardised(volumes: list[Volume], config: ModelConfig) -> list[Volume]:
    """`volumes` as `config`'s network reads them (`preprocess.model_input`), changed in place: phase 2 holds
    hundreds of whole volumes, and a copy of each would double the memory. Unchanged without landmarks."""
    for volume in volumes:
        volume.image = model_input(volume.image, volume.brain, config)
    return volumes


def phase_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """Each phase's training folder in the work folder, named by the options that change the phase's data: a resume
    already refuses another run's checkpoint (`engine.sample_ids` fingerprints the data), and this way runs with
    other options keep their finished phases side by side instead of overwriting each other's."""
    data = ("_no_distractors" if args.no_distractors else "") + ("_histogram" if args.histogram_standardisation else "")
    realism = (data + ("_no_mimics" if args.no_realism_mimics else "") + ("_no_levels" if args.no_realism_levels else "")
               + (f"_real{args.realism_real_rounds}" if args.realism_real_rounds > 1 else ""))
    return {"patches": args.work_dir / f"fit{data}", "whole": args.work_dir / f"fit_whole{data}",
            "pipeline": args.work_dir / f"fit_pipeline{data}", "realism": args.work_dir / f"fit_realism{realism}"}


def patch_origins(volume: Volume, rng: np.random.Generator, n_random: int, n_lesion: int = 2) -> list[np.ndarray]:
    """Corners of PATCH^3 patches: `n_lesion` around the lesion (when there is one), `n_random` anywhere in the brain.

    Lesion patches put the lesion at a random offset, so the network cannot learn "the lesion is in the middle".
    """
    shape = np.array(volume.brain.shape)
    corners = []
    if volume.lesion.any():
        lesion_voxels = np.argwhere(volume.lesion)
        for _ in range(n_lesion):
            centre = lesion_voxels[rng.integers(len(lesion_voxels))]
            corners.append(centre - rng.integers(8, PATCH - 8, size=3))
    brain_voxels = np.argwhere(volume.brain)
    for _ in range(n_random):
        corners.append(brain_voxels[rng.integers(len(brain_voxels))] - PATCH // 2)
    return [np.clip(c, 0, shape - PATCH) for c in corners]


def to_patch_samples(volumes: list[Volume], rng: np.random.Generator, n_random: int, prefix: str,
                     spacing_mm: float) -> list[Sample]:
    """Training samples: patches whose label says whether they hold at least 100 mm3 of lesion."""
    samples = []
    for index, volume in enumerate(volumes):
        for corner_index, corner in enumerate(patch_origins(volume, rng, n_random)):
            box = tuple(slice(int(c), int(c) + PATCH) for c in corner)
            lesion = volume.lesion[box].astype(np.float16)
            label = int(float(lesion.sum()) * spacing_mm ** 3 >= 100.0)
            unit = Participant(subject=f"{prefix}{index}x{corner_index}", session=None, t1w=None, flair=None,
                               label=label)
            samples.append(Sample(unit=unit, image=volume.image[(slice(None), *box)].copy(),
                                  brain_mask=volume.brain[box].copy(), lesion=lesion, site=volume.origin))
    return samples


def whole_volume_samples(volumes: list[Volume], prefix: str) -> list[Sample]:
    """Training samples of whole model-grid volumes (phase 2); arrays shared with the volumes, not copied."""
    return [Sample(unit=Participant(subject=f"{prefix}{index}", session=None, t1w=None, flair=None,
                                    label=volume.label),
                   image=volume.image, brain_mask=volume.brain, lesion=volume.lesion.astype(np.float16),
                   site=volume.origin)
            for index, volume in enumerate(volumes)]


def pipeline_volumes(work_dir: Path, name: str, grid, n: int, seed: int, n_processes: int) -> list[Volume]:
    """`n` synthetic participants (`bids_fcd synth`, `seed`) as raw native-space scans, through the participant
    level's preprocessing (cached in the work folder): what the model sees in use."""
    bids_dir = work_dir / f"{name}_n{n}_seed{seed}_bids"  # another draw never reuses this one
    if not (bids_dir / "participants.tsv").is_file():
        shutil.rmtree(bids_dir, ignore_errors=True)  # an interrupted write
        make_cohort(bids_dir, n=n, seed=seed)
    units = discover(bids_dir)
    # As the group level does: one scan per process, one thread each.
    prepared, failed = prepare_samples(units, work_dir / "cache", grid, ModelConfig().channels, n_cpus=n_processes)
    if failed:
        raise RuntimeError(f"synthetic participants failed preprocessing: {failed}")
    return [Volume(sample.image, sample.brain_mask,
                   np.zeros(grid.shape, np.uint8) if sample.lesion is None else (sample.lesion >= 0.5).astype(np.uint8),
                   int(sample.unit.label), sample.unit.name) for sample in prepared]


def predictions(model, config: ModelConfig, volumes: list[Volume], n_passes: int,
                device: torch.device) -> list[tuple[Volume, object]]:
    """Each volume with the model's prediction on `device`."""
    return [(v, predict(model, config, v.image, v.brain, device, n_passes=n_passes)) for v in volumes]


def choose_thresholds(model, config: ModelConfig, volumes: list[Volume], device: torch.device) -> dict:
    """Subject threshold (Youden's J) and voxel threshold (`VOXEL_THRESHOLD_RULE`) on maps made as the participant
    level makes them (`DEFAULT_N_PASSES` test-time passes)."""
    results = predictions(model, config, volumes, DEFAULT_N_PASSES, device)
    labels = np.array([v.label for v, _ in results])
    scores = np.array([p.fcd_probability for _, p in results])
    voxel_threshold = choose_voxel_threshold([p.prob_template for _, p in results], [v.lesion for v, _ in results],
                                             config.min_cluster_voxels)
    return {"subject_threshold": youden_threshold(labels, scores), "voxel_threshold": voxel_threshold,
            "calibration_auroc": float(roc_auc_score(labels, scores)), "n_calibration": len(results)}


def validation_auroc(model, config: ModelConfig, volumes: list[Volume], device: torch.device) -> float:
    """Subject AUROC on the held-out template-grid volumes (what training early-stopped on: one pass)."""
    results = predictions(model, config, volumes, 1, device)
    return float(roc_auc_score([v.label for v, _ in results], [p.fcd_probability for _, p in results]))


def epoch_seconds(*fits) -> int:
    """Seconds of training epochs in these `fit` results."""
    return round(sum(row["seconds"] for result in fits for row in result.history))


def threshold_rule(n_calibration: int, seed: int) -> str:
    """How the shipped thresholds were chosen, for the model card."""
    return (f"subject threshold: {THRESHOLD_RULE}; voxel threshold: {VOXEL_THRESHOLD_RULE}; both on {n_calibration} "
            f"synthetic participants (bids_fcd synth seed {CALIBRATION_SEED + seed}) through the participant level's "
            f"preprocessing, with its {DEFAULT_N_PASSES} test-time passes")


def calibration_volumes(args: argparse.Namespace, grid) -> list[Volume]:
    """The calibration cohort: never trained on, only used to choose the thresholds."""
    return pipeline_volumes(args.work_dir, "calibration", grid, args.n_calibration, CALIBRATION_SEED + args.seed,
                            args.n_threads)


def save(model, config: ModelConfig, thresholds: dict, training: dict, out: Path) -> None:
    """The checkpoint and its model.json, with the thresholds in the config and in the training record."""
    config = config.updated(subject_threshold=thresholds["subject_threshold"],
                            voxel_threshold=thresholds["voxel_threshold"], training={**training, **thresholds},
                            versions={"bids_fcd": __version__, "torch": torch.__version__,
                                      "python": platform.python_version()})
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, config, out / "model.pt")
    log.info("saved %s: %s", out / "model.pt", json.dumps(thresholds))


def recalibrate(args: argparse.Namespace, grid) -> int:
    """Choose the thresholds of the model already in `--out` again (after a change of rule), without retraining."""
    model, config = load_checkpoint(args.out / "model.pt")
    thresholds = choose_thresholds(model, config, calibration_volumes(args, grid), select_device(args.device))
    # the full command with this --n_calibration gives these weights and thresholds: no weight depends on it
    command = re.sub(r"--n_calibration \d+", f"--n_calibration {args.n_calibration}", config.training["command"])
    save(model, config, thresholds, {**config.training, "command": command,
                                     "threshold_rule": threshold_rule(args.n_calibration, args.seed)}, args.out)
    return 0


def join_ensemble(args: argparse.Namespace, grid) -> int:
    """The models at `--ensemble` (this command's, at other seeds) as one ensemble in `--out`, with thresholds
    chosen on the ensemble's own outputs for the calibration cohort of `--seed`."""
    model, config = ensemble_of(args.ensemble)
    thresholds = choose_thresholds(model, config, calibration_volumes(args, grid), select_device(args.device))
    members = " ".join(str(path) for path in args.ensemble)
    training = {**config.training,
                "command": f"python tools/train_default_model.py --ensemble {members} --out bids_fcd/weights "
                           f"--seed {args.seed} --n_calibration {args.n_calibration}",
                "threshold_rule": threshold_rule(args.n_calibration, args.seed)}
    save(model, config, thresholds, training, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bids_fcd/weights"))
    parser.add_argument("--work_dir", type=Path, default=Path("work/train_default_model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_synthetic", type=int, default=300, help="synthetic training volumes")
    parser.add_argument("--n_validation", type=int, default=40, help="held-out synthetic whole volumes")
    parser.add_argument("--implants_per_brain", type=int, default=12)
    parser.add_argument("--whole_real_rounds", type=int, default=3,
                        help="phase 2: draws of the real brains (each: both as they are + fresh implants)")
    parser.add_argument("--n_mimic", type=int, default=120,
                        help="phase 2: synthetic volumes with a non-FCD mimic (half also with an FCD lesion)")
    parser.add_argument("--n_pipeline", type=int, default=60,
                        help="phase 3: synthetic participants through the real preprocessing (0: no phase 3)")
    parser.add_argument("--pipeline_epochs", type=int, default=4, help="phase 3: epochs")
    parser.add_argument("--n_calibration", type=int, default=80,
                        help="synthetic participants through the real preprocessing, for choosing the thresholds")
    parser.add_argument("--n_realism", type=int, default=80,
                        help="phase 4: fresh synthetic volumes (with the pipeline participants, real-like FLAIR levels)")
    parser.add_argument("--realism_epochs", type=int, default=8, help="phase 4: epochs (0: no phase 4)")
    parser.add_argument("--finetune_from", type=Path,
                        help="a model trained by phases 1-3 of this command: load it instead of training them again")
    parser.add_argument("--no_distractors", action="store_true",
                        help="phases 1-2 without the deep white-matter distractors, all else the same (at the card's "
                             "size, one seed: 67 of the N=240 cohort's 90 lesions found without them, 58 with; "
                             "benchmarks/results/model_candidates.md)")
    parser.add_argument("--no_realism_mimics", action="store_true",
                        help="phase 4 without its non-FCD mimics, synthetic and on the real brains (candidate 14 in "
                             "benchmarks/results/model_candidates.md: lesions lost as with them, real false positives up)")
    parser.add_argument("--no_realism_levels", action="store_true",
                        help="phase 4 without its FLAIR rescaling to real-like levels (candidate 15: keeps the deep "
                             "lesions the rescaling silences, finds fewer implants in real anatomy)")
    parser.add_argument("--realism_real_rounds", type=int, default=1,
                        help="phase 4: fresh draws of the real brains with implants (and mimics)")
    parser.add_argument("--histogram_standardisation", action="store_true",
                        help="map every input's in-brain histogram to landmarks of the phase-1 training volumes "
                             "(TorchIO's HistogramStandardization), kept in the model's config and applied in use")
    parser.add_argument("--epochs", type=int, default=14, help="phase 1: epochs on patches")
    parser.add_argument("--whole_epochs", type=int, default=8, help="phase 2: epochs on whole volumes")
    parser.add_argument("--n_threads", type=int, default=2,
                        help="torch's threads; also the processes preprocessing scans (one thread each)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where training and the threshold choice run (default cpu, on which the shipped weights "
                             "were trained; cuda on a GPU machine)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="only choose the thresholds of --out/model.pt again, on the calibration cohort")
    parser.add_argument("--ensemble", type=Path, nargs="+", metavar="MODEL",
                        help="only join these models of this command (other seeds) into one ensemble in --out and "
                             "choose its thresholds on the calibration cohort of --seed")
    args = parser.parse_args(argv)
    if args.no_distractors and args.finetune_from:
        parser.error("--no_distractors changes phases 1-2, which --finetune_from skips")
    if args.histogram_standardisation and args.finetune_from:
        parser.error("--finetune_from takes the base model's own histogram landmarks, if it has any")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.n_threads)
    started = time.time()

    config = ModelConfig(name="bids_fcd-default", model_version=__version__, arch_params={"dropout": 0.1})
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    if args.recalibrate:
        return recalibrate(args, grid)
    if args.ensemble:
        return join_ensemble(args, grid)
    rng = np.random.default_rng(args.seed)
    _, wm, _ = template_tissue_maps(grid)

    train_volumes = [synthetic_volume(rng, grid, with_lesion=i % 2 == 0) for i in range(args.n_synthetic)]
    distract_controls(train_volumes, rng, wm, grid.spacing_mm, apply=not args.no_distractors)
    real = real_volumes(grid, args.work_dir / "cache", rng, args.implants_per_brain)
    validation_volumes = [synthetic_volume(rng, grid, with_lesion=i % 2 == 0) for i in range(args.n_validation)]
    distract_controls(validation_volumes, rng, wm, grid.spacing_mm, apply=not args.no_distractors)
    base = None  # with --finetune_from: the training record of the model phases 1-3 made
    if args.finetune_from:
        base_model, base_config = load_checkpoint(args.finetune_from)
        config = config.updated(histogram_landmarks=base_config.histogram_landmarks)
        base = base_config.training
    elif args.histogram_standardisation:
        config = config.updated(histogram_landmarks=histogram_landmarks(
            [v.image for v in train_volumes + real], [v.brain for v in train_volumes + real], config.channels))
    standardised(train_volumes + real + validation_volumes, config)
    log.info("volumes ready after %.0f s: %d synthetic, %d real-anatomy, %d validation", time.time() - started,
             len(train_volumes), len(real), len(validation_volumes))

    # Batched augmentation (flips, affine, gamma, noise, bias) also runs on the CPU and costs far less than
    # TorchIO's per-sample transforms, which would dominate a CPU training step.
    options = TrainOptions(epochs=args.epochs, batch_size=4, learning_rate=2e-3, warmup_epochs=1,
                           patience=args.epochs, augmentation="gpu", seed=args.seed)
    torch.manual_seed(args.seed)  # before the initial weights: torch seeds its global generator randomly per process
    model = build_model(config)
    dirs = phase_dirs(args)
    dist = DistContext(device=select_device(args.device))
    if base is not None:
        model.load_state_dict(base_model.state_dict())
    else:
        train_samples = to_patch_samples(train_volumes + real * 2, rng, n_random=2, prefix="train",
                                         spacing_mm=grid.spacing_mm)
        val_samples = to_patch_samples(validation_volumes, rng, n_random=1, prefix="val",
                                       spacing_mm=grid.spacing_mm)
        patches = fit(model, config, train_samples, val_samples, options, dirs["patches"], fold_id=0, dist=dist)
        model.load_state_dict(torch.load(patches.best_path, weights_only=True)["state_dict"])
        del train_samples, val_samples

    whole_options = TrainOptions(epochs=args.whole_epochs, batch_size=2, learning_rate=5e-4, warmup_epochs=1,
                                 patience=args.whole_epochs, augmentation="gpu", seed=args.seed)
    # Phases 2-4 each fine-tune the previous phase's weights: a resume needs the same starting weights (with
    # `start_digest`), so that an earlier phase trained again, or another --finetune_from model, starts them over.
    # Phase 2 sees the real anatomy more (more scanners' backgrounds than synthetic contrasts can give); its
    # extra draws use their own generators, so phase 1 is the same with or without them.
    for round_index in range(1, args.whole_real_rounds):
        real += standardised(real_volumes(grid, args.work_dir / "cache", np.random.default_rng([args.seed, round_index]),
                                          args.implants_per_brain,
                                          mimic_rng=np.random.default_rng([args.seed, round_index, 1])), config)
    mimic_rng = np.random.default_rng([args.seed, 1000])
    train_mimics = standardised(mimic_volumes(mimic_rng, grid, args.n_mimic), config)
    validation_volumes += standardised(mimic_volumes(mimic_rng, grid, args.n_validation // 2), config)
    log.info("phase 2: %d whole training volumes, %d validation", len(train_volumes) + len(real) + len(train_mimics),
             len(validation_volumes))
    if base is None:
        whole = fit(model, config, whole_volume_samples(train_volumes + real + train_mimics, "train"),
                    whole_volume_samples(validation_volumes, "val"), whole_options, dirs["whole"],
                    fold_id=0, dist=dist, start_digest=state_digest(model.state_dict()))
        model.load_state_dict(torch.load(whole.best_path, weights_only=True)["state_dict"])
    # Phase 3: what preprocessing does to a scan (brain-mask edges, interpolation, residual bias, registration
    # error), which template-grid volumes never show; with a quarter of phase 2's volumes, so that the mimics and
    # the real anatomy are not forgotten. A fixed short schedule at a low rate: the template-grid validation set
    # cannot judge this phase, and the calibration cohort must stay unseen until the thresholds.
    pipeline = (standardised(pipeline_volumes(args.work_dir, "pipeline", grid, args.n_pipeline,
                                              PIPELINE_SEED + args.seed, args.n_threads), config)
                if args.n_pipeline else [])
    if pipeline and base is None:
        pipeline_options = TrainOptions(epochs=args.pipeline_epochs, batch_size=2, learning_rate=2e-4,
                                        warmup_epochs=1, patience=args.pipeline_epochs, augmentation="gpu",
                                        seed=args.seed)
        tuned = fit(model, config, whole_volume_samples(pipeline + (train_volumes + real + train_mimics)[::4], "train"),
                    [], pipeline_options, dirs["pipeline"], fold_id=0, dist=dist,
                    start_digest=state_digest(model.state_dict()))
    # Phase 4: real-like FLAIR levels and the current mimics (T1-isointense plaques among them), on the pipeline
    # participants, fresh synthetic volumes and the real brains; fixed short schedule as in phase 3.
    realism_dir = dirs["realism"]
    if args.realism_epochs:
        realism_options = TrainOptions(epochs=args.realism_epochs, batch_size=2, learning_rate=2e-4,
                                       warmup_epochs=1, patience=args.realism_epochs, augmentation="gpu",
                                       seed=args.seed)
        realism = fit(model, config, whole_volume_samples(standardised(realism_volumes(args, grid, pipeline), config),
                                                          "train"), [],
                      realism_options, realism_dir, fold_id=0, dist=dist, start_digest=state_digest(model.state_dict()))
    model.eval()

    thresholds = {"validation_auroc": validation_auroc(model, config, validation_volumes, dist.device),
                  **choose_thresholds(model, config, calibration_volumes(args, grid), dist.device)}
    training = {
        "data": "simulated FCD-like lesions only: synthetic volumes from nilearn's MNI152 2009a template anatomy "
                f"({args.n_synthetic}, half with a lesion, "
                + ("no distractors" if args.no_distractors else "half of the controls with non-FCD white-matter "
                   "distractors")
                + ") and the two real glioma-brainlesion brains, each as it is (control) and with "
                f"{args.implants_per_brain} FCD-like implants away from the tumour (one draw in phase 1, "
                f"{args.whole_real_rounds} in phase 2); in phase 2 also non-FCD mimics (MS-like plaques, chronic "
                f"infarcts, gliomas with oedema: {args.n_mimic} synthetic volumes and the real brains, in controls "
                "and beside FCD lesions, labelled not-FCD); no patient data",
        "input_scaling": ("robust-percentile, then each channel's in-brain histogram mapped to the mean landmarks of "
                          "the phase-1 training volumes (Nyul-Udupa, TorchIO HistogramStandardization)"
                          if config.histogram_landmarks else "robust-percentile"),
        **({key: base[key] for key in ("phase_1", "phase_2", "phase_3")} if base else {
            "phase_1": f"{PATCH}^3 patches, {args.epochs} epochs (best {patches.best_epoch})",
            "phase_2": f"whole volumes, {args.whole_epochs} epochs (best {whole.best_epoch})",
            "phase_3": (f"{args.n_pipeline} synthetic participants through the real preprocessing (bids_fcd synth "
                        f"seed {PIPELINE_SEED + args.seed}) + a quarter of phase 2's volumes, {args.pipeline_epochs} "
                        "epochs" if pipeline else "none")}),
        "phase_4": (f"the {len(pipeline)} phase-3 participants and {args.n_realism} fresh synthetic volumes (half with "
                    + ("FCD, no mimics)" if args.no_realism_mimics else "FCD, half of each with a non-FCD mimic)")
                    + ("" if args.no_realism_levels else ", FLAIR rescaled to an in-brain median drawn in "
                       f"{FLAIR_MEDIAN_RANGE[0]}-{FLAIR_MEDIAN_RANGE[1]} (real FLAIR's level)")
                    + (", and one fresh draw" if args.realism_real_rounds == 1
                       else f", and {args.realism_real_rounds} fresh draws") + " of the real brains with implants"
                    + ("" if args.no_realism_mimics else " and mimics") + f", {args.realism_epochs} epochs"
                    if args.realism_epochs else "none"),
        **({"phases_1_3_from": f"{args.finetune_from} (model {base.get('command', '?')})"} if base else {}),
        "seed": args.seed,
        "command": "python tools/train_default_model.py --out bids_fcd/weights --seed "
                   f"{args.seed} --n_synthetic {args.n_synthetic} --n_validation {args.n_validation} "
                   f"--implants_per_brain {args.implants_per_brain} --whole_real_rounds {args.whole_real_rounds} "
                   f"--n_mimic {args.n_mimic} --n_pipeline {args.n_pipeline} --pipeline_epochs {args.pipeline_epochs} "
                   f"--n_realism {args.n_realism} --realism_epochs {args.realism_epochs} "
                   f"--n_calibration {args.n_calibration} "
                   f"--epochs {args.epochs} "
                   f"--whole_epochs {args.whole_epochs}"
                   + (" --no_distractors" if args.no_distractors else "")
                   + (" --no_realism_mimics" if args.no_realism_mimics else "")
                   + (" --no_realism_levels" if args.no_realism_levels else "")
                   + (" --histogram_standardisation" if args.histogram_standardisation else "")
                   + (f" --realism_real_rounds {args.realism_real_rounds}" if args.realism_real_rounds > 1 else "")
                   + (f" --device {dist.device.type}" if dist.device.type != "cpu" else ""),
        "device": str(dist.device),
        "voxel_loss_weight": options.voxel_loss_weight,
        "threshold_rule": threshold_rule(args.n_calibration, args.seed),
        "epoch_seconds": ((base["epoch_seconds"] if base else epoch_seconds(patches, whole, *([tuned] if pipeline else [])))
                          + (epoch_seconds(realism) if args.realism_epochs else 0)),  # all phases
        "seconds": round(time.time() - started),  # this invocation (less when it resumed finished phases)
    }
    save(model, config, thresholds, training, args.out)
    logs = {"training_log_patches.tsv": dirs["patches"], "training_log.tsv": dirs["whole"],
            "training_log_pipeline.tsv": dirs["pipeline"], "training_log_realism.tsv": realism_dir}
    for name, folder in logs.items():
        source = args.finetune_from.parent / name if base and folder != realism_dir else folder / "log.tsv"
        if source.is_file() and source.resolve() != (args.out / name).resolve():
            shutil.copy(source, args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
