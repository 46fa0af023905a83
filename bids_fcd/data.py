"""The group level's data: cached model-grid samples, leakage-free folds, and augmentation on CPU or GPU.

- `prepare_samples` loads every labelled participant's preprocessed arrays from OUTPUT_DIR/cache (running the
  participant-level preprocessing, in parallel processes, for those not cached yet) and maps its lesion mask
  to the model grid. Arrays are held in memory: a (2, 112, 128, 112) float32 volume is 13 MB, ds004199 ~3 GB.
- `mimic_copies` makes, for a share of the cross-validation participants, a copy with a non-FCD lesion (MS-like
  plaques, infarct, glioma) that trains beside the original in its fold, labels unchanged (another 13 MB each);
  `implant_copies`, for a share of the cross-validation controls, a copy with a simulated FCD lesion, labelled FCD.
- `plan_splits` makes subject-level stratified folds (by label and site/acquisition), keeps a participant's
  sessions together, and honours participants.tsv's `split` when its test part holds both classes.
- Augmentation comes in two forms. On the CPU, TorchIO per volume in the DataLoader workers
  (`torchio_transform`). On the GPU, `BatchAugmentation` on whole batches (flips, affine grids, smooth bias,
  gamma, noise), split the TorchIO way: `sample(generator, n) -> params` draws every random value,
  `apply(batch, params)` is deterministic, so the same params (or the same seed) replay the exact augmentation.
  Arrays are (N, C, X, Y, Z), RAS+ template axes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from bids_fcd.config import ModelConfig
from bids_fcd.inputs import Participant
from bids_fcd.template import Grid

log = logging.getLogger("bids_fcd.data")

MIN_STRATUM = 2  # label x site strata smaller than this per fold join their label's "other" stratum
FLIP_AXIS_X = 2  # X of (N, C, X, Y, Z): left-right, the only anatomically plausible flip in template space


# --- samples ------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One participant/session ready for training.

    Attributes:
        unit: the input record (names, label, split, metadata).
        image: (C, X, Y, Z) float32 model input on the model grid, channels in `ModelConfig.channels` order.
        brain_mask: (X, Y, Z) bool.
        lesion: (X, Y, Z) float16 fraction of each voxel inside the lesion (0..1), or None when not known.
        site: site or acquisition key used for stratification, ComBat and per-site metrics.
    """

    unit: Participant
    image: np.ndarray
    brain_mask: np.ndarray
    lesion: np.ndarray | None
    site: str

    @property
    def label(self) -> int:
        return int(self.unit.label)

    @property
    def voxel_target(self) -> bool:
        """Whether the voxel loss applies: a patient with a lesion mask, or a control (whose map is empty).

        A patient without a mask trains only the subject-level head.
        """
        return self.lesion is not None or self.label == 0

    @property
    def participant_id(self) -> str:
        return f"sub-{self.unit.subject}"


def site_of(unit: Participant) -> str:
    """The unit's site: participants.tsv `site` when known, else its T1w and FLAIR acquisition labels."""
    site = str(unit.metadata.get("site", "")).strip()
    if site and site.lower() not in ("n/a", "na", "nan"):
        return site
    return f"T1w-{unit.metadata.get('T1w_acq', 'n/a')}_FLAIR-{unit.metadata.get('FLAIR_acq', 'n/a')}"


@dataclass(frozen=True)
class PreparedArrays:
    """What a preprocessing worker sends back: the model input, brain mask and lesion on the model grid."""

    image: np.ndarray
    brain_mask: np.ndarray
    lesion: np.ndarray | None


def preprocess_unit(unit: Participant, cache_dir: Path, grid: Grid, channels: tuple[str, ...],
                    n_threads: int) -> PreparedArrays:
    """One unit through the participant level's cached preprocessing, with its lesion mask mapped."""
    from bids_fcd.cache import load_or_preprocess
    from bids_fcd.preprocess import channels_array, mask_to_template

    torch.set_num_threads(n_threads)
    pre = load_or_preprocess(cache_dir, unit.t1w, unit.flair, grid, n_threads=n_threads, logger=log)
    lesion = None
    if unit.lesion_mask is not None:
        lesion = mask_to_template(unit.lesion_mask, unit.lesion_mask_space, pre, unit.t1w, unit.flair)
        lesion = lesion.astype(np.float16)
        if unit.label == 1 and not (lesion >= 0.5).any():
            # An empty mask on a patient says "lesion unknown", not "no lesion": as "no lesion" every candidate
            # would count as a false positive and the voxel loss would train the map towards empty.
            log.warning("%s: lesion mask %s marks no lesion on the model grid: the patient trains the subject "
                        "head only", unit.name, unit.lesion_mask.name)
            lesion = None
    return PreparedArrays(channels_array(pre, channels), pre.brain_mask.astype(bool), lesion)


def _prepare_safely(unit: Participant, cache_dir: Path, grid: Grid, channels: tuple[str, ...],
                    n_threads: int) -> PreparedArrays | tuple[int, str]:
    """`preprocess_unit` that returns the failure as (exit code, why): one broken scan must not stop the cohort."""
    from bids_fcd.participant import exit_code_for

    try:
        return preprocess_unit(unit, cache_dir, grid, channels, n_threads)
    except Exception as error:  # noqa: BLE001 - reported per unit, the unit is left out of training
        return exit_code_for(error), f"{type(error).__name__}: {error}"


def prepare_samples(units: list[Participant], cache_dir: Path, grid: Grid, channels: tuple[str, ...],
                    n_cpus: int) -> tuple[list[Sample], dict[str, tuple[int, str]]]:
    """Samples of `units` (in order) and {unit name: (exit code, why)} for those that could not be prepared.

    Units run in `min(n_cpus, len(units))` spawned processes, each with its share of the threads.
    """
    n_workers = max(1, min(n_cpus, len(units)))
    n_threads = max(1, n_cpus // n_workers)
    args = [(unit, cache_dir, grid, channels, n_threads) for unit in units]
    if n_workers == 1:
        results = [_prepare_safely(*a) for a in args]
    else:
        # spawn, not fork: torch's and ITK's thread pools do not survive a fork.
        with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_prepare_safely, *zip(*args)))
    samples, failed = [], {}
    for unit, result in zip(units, results):
        if isinstance(result, tuple):
            failed[unit.name] = result
            log.error("%s: left out of training (exit %d): %s", unit.name, *result)
            continue
        samples.append(Sample(unit, result.image, result.brain_mask, result.lesion, site_of(unit)))
    return samples, failed


# --- non-FCD lesion mimics ----------------------------------------------------------------------------------


def mimic_copies(samples: list[Sample], indices: np.ndarray, fraction: float, seed: int, grid: Grid,
                 channels: tuple[str, ...]) -> dict[int, Sample]:
    """{sample index: a copy of that sample with one non-FCD lesion (`bids_fcd.mimics`: MS-like plaques, a chronic
    infarct or a glioma with oedema, kinds in turn), labels and lesion target unchanged} for a `fraction` of the
    samples at `indices` that can hold one: controls, and patients whose lesion mask is known (a mimic must stay
    clear of the lesion). Needs T1w and FLAIR channels; {} without them or at fraction 0.

    Why: fine-tuning on FCD patients against healthy controls teaches that what is bright on FLAIR is FCD. The
    shipped model, fine-tuned by the group level on 120 synthetic participants without mimics, called the real
    stroke and MS brains FCD, which it had called control. A copy joins only the training set of its
    participant's fold, so no participant is validated on a copy of itself trained on.
    """
    from bids_fcd.lesions import tissue_probabilities
    from bids_fcd.mimics import MIMIC_KINDS, mimic_copy
    from bids_fcd.synth import template_tissue_maps

    if fraction <= 0 or not {"T1w", "FLAIR"} <= set(channels):
        return {}
    t1w_channel, flair_channel = channels.index("T1w"), channels.index("FLAIR")
    eligible = [int(i) for i in indices if samples[i].label == 0 or samples[i].lesion is not None]
    chosen = np.random.default_rng([seed, 31]).permutation(eligible)[:round(fraction * len(eligible))]
    template_gm, template_wm, _ = template_tissue_maps(grid)
    copies = {}
    for order, index in enumerate(sorted(int(i) for i in chosen)):
        sample = samples[index]
        t1w, flair = sample.image[t1w_channel], sample.image[flair_channel]
        gm, wm = tissue_probabilities(t1w, sample.brain_mask, template_gm, template_wm, grid.spacing_mm)
        image = sample.image.copy()
        image[t1w_channel], image[flair_channel] = mimic_copy(
            np.random.default_rng([seed, 31, index]), t1w, flair, sample.brain_mask, sample.lesion, gm, wm,
            grid.spacing_mm, MIMIC_KINDS[order % len(MIMIC_KINDS)])
        copies[index] = Sample(sample.unit, image, sample.brain_mask, sample.lesion, sample.site)
    return copies


def implant_copies(samples: list[Sample], indices: np.ndarray, fraction: float, seed: int, grid: Grid,
                   channels: tuple[str, ...]) -> dict[int, Sample]:
    """{sample index: a copy of that control with one simulated FCD type II lesion (`bids_fcd.lesions`, as the
    shipped model was trained on), labelled FCD with the lesion as its mask} for a `fraction` of the controls at
    `indices`. Needs T1w and FLAIR channels; {} without them or at fraction 0. A control with no room for a lesion
    (no grey/white junction in the neocortical territory, away from FLAIR-bright tissue) gets none.

    Why: the shipped model learnt FCD in template anatomy and two real heads; on real anatomy from scanners it never
    saw it finds far fewer implanted lesions (MODEL_CARD.md). The cohort's own controls carry its scanners' real
    anatomy and contrast with no lesion masks to draw, and a cohort with few patients gets lesions to learn from.
    Not yet shown to help: on the two real heads allowed here this design left detection in those heads unchanged
    (benchmarks/results/model_candidates.md). A copy joins only the training set of its participant's fold.
    """
    from bids_fcd.lesions import bright_lesion_region, implant_fcd, sample_lesion_params, tissue_probabilities
    from bids_fcd.synth import neocortical_territory, template_tissue_maps

    if fraction <= 0 or not {"T1w", "FLAIR"} <= set(channels):
        return {}
    t1w_channel, flair_channel = channels.index("T1w"), channels.index("FLAIR")
    eligible = [int(i) for i in indices if samples[i].label == 0]
    chosen = np.random.default_rng([seed, 37]).permutation(eligible)[:round(fraction * len(eligible))]
    template_gm, template_wm, _ = template_tissue_maps(grid)
    territory = neocortical_territory(grid)
    copies = {}
    for index in sorted(int(i) for i in chosen):
        sample = samples[index]
        t1w, flair = sample.image[t1w_channel], sample.image[flair_channel]
        gm, wm = tissue_probabilities(t1w, sample.brain_mask, template_gm, template_wm, grid.spacing_mm)
        try:
            params = sample_lesion_params(np.random.default_rng([seed, 37, index]), gm, wm, grid.spacing_mm,
                                          exclude_mask=bright_lesion_region(flair, sample.brain_mask,
                                                                            grid.spacing_mm),
                                          territory_mask=territory)
        except ValueError as err:
            log.warning("%s: no simulated FCD copy (%s)", sample.unit.name, err)
            continue
        new_t1w, new_flair, lesion = implant_fcd(t1w, flair, gm, wm, params, grid.spacing_mm)
        image = sample.image.copy()
        inside = sample.brain_mask.astype(bool)  # the model reads nothing outside the brain: keep it as it was
        image[t1w_channel] = np.where(inside, new_t1w, t1w)
        image[flair_channel] = np.where(inside, new_flair, flair)
        copies[index] = Sample(replace(sample.unit, label=1), image, sample.brain_mask,
                               (lesion.astype(bool) & inside).astype(np.float16), sample.site)
    return copies


def as_model_input(samples: list[Sample], config: ModelConfig) -> list[Sample]:
    """The samples as `config`'s network reads them (`preprocess.model_input`: histogram-standardised when the
    model was trained so); the same samples otherwise. After `mimic_copies`, which works on normalised intensities."""
    from bids_fcd.preprocess import model_input

    if not config.histogram_landmarks:
        return samples
    return [replace(s, image=model_input(s.image, s.brain_mask, config)) for s in samples]


def with_copies(samples: list[Sample], indices: np.ndarray, *copy_sets: dict[int, Sample]) -> list[Sample]:
    """The samples at `indices`, then, for each set of copies (mimics, implants), the copies of those of them that
    have one."""
    return [samples[i] for i in indices] + [copies[i] for copies in copy_sets for i in indices if i in copies]


# --- splits -------------------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """Which samples are cross-validated, which form the final test set, and why.

    Attributes:
        fold: per sample, its validation fold 0..K-1 in the cross-validation, or -1 for the final test set.
        test_honoured: True when participants.tsv's `split` = test (holding both classes) is the test set.
        official_test: per sample, whether participants.tsv marks it `test` (reported separately when the
            split could not be honoured).
        warning: why the split was not honoured, or None.
    """

    fold: np.ndarray
    n_folds: int
    test_honoured: bool
    official_test: np.ndarray
    warning: str | None = None
    notes: list[str] = field(default_factory=list)

    def fold_indices(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) sample indices of fold `k`."""
        return np.flatnonzero((self.fold >= 0) & (self.fold != k)), np.flatnonzero(self.fold == k)

    @property
    def cv_indices(self) -> np.ndarray:
        return np.flatnonzero(self.fold >= 0)

    @property
    def test_indices(self) -> np.ndarray:
        return np.flatnonzero(self.fold == -1)


def strata_labels(labels: np.ndarray, sites: np.ndarray, n_folds: int) -> np.ndarray:
    """Label x site strata; those under `MIN_STRATUM * n_folds` members join "<label>|other"."""
    combined = np.array([f"{label}|{site}" for label, site in zip(labels, sites)])
    counts = Counter(combined)
    return np.array([s if counts[s] >= MIN_STRATUM * n_folds else f"{s.split('|')[0]}|other"
                     for s in combined])


def stratified_group_folds(labels: np.ndarray, sites: np.ndarray, groups: np.ndarray, n_folds: int,
                           seed: int) -> np.ndarray:
    """Fold index per row: stratified by label x site, rows of one group (participant) in one fold.

    Uses sklearn's StratifiedGroupKFold on per-row label x site strata with the participant as the group, so a
    participant's sessions (one label) land in one fold even when their sites differ.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    strata = strata_labels(labels, sites, n_folds)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(labels), -1, dtype=int)
    for k, (_, validation) in enumerate(splitter.split(np.zeros(len(labels)), strata, groups)):
        fold[validation] = k
    assert_no_leakage(fold, groups)
    return fold


def assert_no_leakage(fold: np.ndarray, groups: np.ndarray) -> None:
    """Every participant (all its sessions) is in exactly one fold; AssertionError names offenders."""
    leaked = sorted({g for g in np.unique(groups) if len(np.unique(fold[groups == g])) > 1})
    if leaked:
        raise AssertionError(f"participants in more than one fold (leakage): {leaked}")


def plan_splits(samples: list[Sample], n_folds: int, seed: int) -> SplitPlan:
    """The folds of the group level; see `SplitPlan`.

    When participants.tsv's `split` has a `test` part holding both classes, it is the final test set and the
    K folds cover the rest. Otherwise (ds004199 as published: 28 patients and no control in `test`) a warning
    is recorded and the K folds cover everyone; the official test patients are reported on their own. K is
    lowered, with a note, when a class has fewer participants than K.
    """
    labels = np.array([s.label for s in samples])
    sites = np.array([s.site for s in samples])
    groups = np.array([s.participant_id for s in samples])
    official = np.array([s.unit.split == "test" for s in samples], dtype=bool)
    test_classes = set(labels[official])
    honoured = test_classes == {0, 1}
    warning = None
    if official.any() and not honoured:
        present = ", ".join("FCD" if c else "control" for c in sorted(test_classes))
        warning = (f"participants.tsv `split` = test holds only {present} participants "
                   f"({int(official.sum())}), so it cannot be a test set for subject-level classification: "
                   "cross-validating over everyone and reporting lesion detection on the official test "
                   "patients separately")
    pool = ~official if honoured else np.ones(len(samples), dtype=bool)
    notes = []
    per_class = [len(np.unique(groups[pool & (labels == c)])) for c in (0, 1)]
    if min(per_class) < 2:
        raise ValueError(f"cross-validation needs at least 2 participants per class, got {per_class[0]} "
                         f"control(s) and {per_class[1]} FCD")
    if n_folds > min(per_class):
        notes.append(f"--n_folds {n_folds} lowered to {min(per_class)}: the smaller class has "
                     f"{min(per_class)} participants")
        n_folds = min(per_class)
    fold = np.full(len(samples), -1, dtype=int)
    fold[pool] = stratified_group_folds(labels[pool], sites[pool], groups[pool], n_folds, seed)
    assert_no_leakage(fold, groups)
    return SplitPlan(fold=fold, n_folds=n_folds, test_honoured=honoured, official_test=official,
                     warning=warning,
                     notes=notes)


# --- datasets and batches -----------------------------------------------------------------------------------


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integers (seed, fold, epoch, index ...): augmentation depends on these keys only."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class VolumeDataset(Dataset):
    """Samples as tensors; items are requested as (index, seed) so augmentation replays from the seed.

    Each item: image (C, X, Y, Z) float32, brain_mask (1, X, Y, Z) float32, lesion (1, X, Y, Z) float32 (zeros
    when unknown), label float32, voxel_target and has_lesion bool, index int.
    """

    def __init__(self, samples: list[Sample], transform=None):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        sample = self.samples[index]
        image = torch.from_numpy(np.ascontiguousarray(sample.image, dtype=np.float32))
        mask = torch.from_numpy(sample.brain_mask.astype(np.float32))[None]
        lesion = (torch.zeros_like(mask) if sample.lesion is None
                  else torch.from_numpy(sample.lesion.astype(np.float32))[None])
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, mask, lesion = self.transform(image, mask, lesion)
        return {"image": image, "brain_mask": mask, "lesion": lesion,
                "label": torch.tensor(float(sample.label)), "voxel_target": torch.tensor(sample.voxel_target),
                "has_lesion": torch.tensor(sample.lesion is not None and sample.label == 1),
                "index": torch.tensor(index)}


class ResidentSamples:
    """Samples stacked once on a device, for the paths without CPU augmentation: a batch is an index_select,
    with no per-volume conversion and no host-to-device copy per step (13 MB a volume at full size, ~2 GB for
    ds004199's training folds on a GPU). Batches have `VolumeDataset`'s keys and dtypes.
    """

    def __init__(self, samples: list[Sample], device: torch.device):
        shape = samples[0].brain_mask.shape
        self.image = torch.from_numpy(np.stack([s.image for s in samples])).to(device)  # (N, C, X, Y, Z)
        self.brain_mask = torch.from_numpy(np.stack([s.brain_mask for s in samples]))[:, None].to(device)
        lesions = [np.zeros(shape, np.float16) if s.lesion is None else s.lesion for s in samples]
        self.lesion = torch.from_numpy(np.stack(lesions).astype(np.float16))[:, None].to(device)
        self.label = torch.tensor([float(s.label) for s in samples], device=device)
        self.voxel_target = torch.tensor([s.voxel_target for s in samples], device=device)
        self.has_lesion = torch.tensor([s.lesion is not None and s.label == 1 for s in samples],
                                       device=device)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.image.device)
        return {"image": self.image[index], "brain_mask": self.brain_mask[index].float(),
                "lesion": self.lesion[index].float(), "label": self.label[index],
                "voxel_target": self.voxel_target[index], "has_lesion": self.has_lesion[index],
                "index": index}


class EpochBatches(Sampler):
    """Batches of (index, seed) keys for one epoch: a permutation fixed by (seed, fold, epoch).

    Under DistributedDataParallel each rank takes every `world`-th item of the permutation (padded by wrapping
    around, so that all ranks run the same number of steps). Shuffling and augmentation therefore depend only
    on (seed, fold, epoch), which is what makes a resumed run replay an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, fold: int, epoch: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        order = np.random.default_rng([seed, fold, epoch]).permutation(n) if shuffle else np.arange(n)
        per_rank = math.ceil(n / world)
        order = np.resize(order, per_rank * world)[rank::world]
        keys = [(int(i), sample_seed(seed, fold, epoch, int(i))) for i in order]
        self.batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# --- CPU augmentation: TorchIO ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentationRanges:
    """Ranges shared by the CPU and GPU paths (TorchIO's parametrisation), with the probability of each."""

    flip_probability: float = 0.5
    affine_probability: float = 0.75
    degrees: float = 10.0  # rotation about each axis, +-degrees
    scale: float = 0.1  # per-axis scaling, 1 +- scale
    translation_mm: float = 5.0
    bias_probability: float = 0.5
    bias_coefficient: float = 0.3  # log-field amplitude
    gamma_probability: float = 0.5
    log_gamma: float = 0.3  # gamma = exp(U(-log_gamma, log_gamma))
    noise_probability: float = 0.5
    noise_std: float = 0.05  # in normalised intensity units (brain 1st..99th percentile = 0..1)


class TorchIOAugmentation:
    """Per-volume CPU augmentation with TorchIO: LR flip, affine, bias field, gamma, noise.

    Called as transform(image (C, X, Y, Z), brain_mask (1, X, Y, Z), lesion (1, X, Y, Z)) with torch's global
    RNG seeded by the caller; intensity transforms touch only the image, and the image is 0 outside the
    (transformed) brain mask afterwards, as preprocessing leaves it.
    """

    def __init__(self, spacing_mm: float, ranges: AugmentationRanges = AugmentationRanges()):
        import torchio as tio

        self.spacing_mm = spacing_mm
        intensity = {"include": ["image"]}
        self.transform = tio.Compose([
            tio.RandomFlip(axes=(0,), flip_probability=ranges.flip_probability),
            tio.RandomAffine(scales=ranges.scale, degrees=ranges.degrees, translation=ranges.translation_mm,
                             default_pad_value=0.0, p=ranges.affine_probability),
            tio.RandomBiasField(coefficients=ranges.bias_coefficient, order=3, p=ranges.bias_probability,
                                **intensity),
            tio.RandomGamma(log_gamma=ranges.log_gamma, p=ranges.gamma_probability, **intensity),
            tio.RandomNoise(std=(0.0, ranges.noise_std), p=ranges.noise_probability, **intensity),
        ])

    def __call__(self, image: torch.Tensor, brain_mask: torch.Tensor,
                 lesion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torchio as tio

        affine = np.diag([self.spacing_mm] * 3 + [1.0])
        subject = tio.Subject(image=tio.ScalarImage(tensor=image, affine=affine),
                              lesion=tio.ScalarImage(tensor=lesion, affine=affine),
                              brain_mask=tio.LabelMap(tensor=brain_mask, affine=affine))
        out = self.transform(subject)
        mask = (out["brain_mask"].data > 0.5).float()
        return out["image"].data.float() * mask, mask, out["lesion"].data.float().clamp(0, 1)


# --- GPU augmentation: sample -> params, apply(params) ------------------------------------------------------


class BatchAugmentation:
    """Batched augmentation on the batch's device; `sample` draws, `apply` replays.

    params (all CPU tensors, one row per volume):
        flip (N,) bool: left-right flip.
        affine (N,) bool, rotation_deg (N, 3), scale (N, 3), translation_vox (N, 3): the affine resampling,
            rotation about X, Y, Z in degrees, scaling per axis, shift in voxels of the model grid.
        bias (N, C, 3, 3, 3): log bias field at 3x3x3 control points (0 = none), upsampled trilinearly.
        gamma (N, C): exponent of sign(x) |x|^gamma (1 = none).
        noise_std (N,) and noise_seed (N,): Gaussian noise of that standard deviation from that seed.
    """

    def __init__(self, spacing_mm: float, ranges: AugmentationRanges = AugmentationRanges()):
        self.spacing_mm = spacing_mm
        self.ranges = ranges

    def sample(self, generator: torch.Generator, n: int, n_channels: int) -> dict[str, torch.Tensor]:
        r = self.ranges

        def uniform(*shape: int, bound: float) -> torch.Tensor:
            return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

        def chance(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        affine = chance(r.affine_probability)
        bias_on = chance(r.bias_probability)
        gamma_on = chance(r.gamma_probability)
        noise_on = chance(r.noise_probability)
        return {
            "flip": chance(r.flip_probability),
            "affine": affine,
            "rotation_deg": uniform(n, 3, bound=r.degrees) * affine[:, None],
            "scale": 1 + uniform(n, 3, bound=r.scale) * affine[:, None],
            "translation_vox": uniform(n, 3, bound=r.translation_mm / self.spacing_mm) * affine[:, None],
            "bias": uniform(n, n_channels, 3, 3, 3, bound=r.bias_coefficient) * per_volume(bias_on),
            "gamma": torch.where(gamma_on[:, None], uniform(n, n_channels, bound=r.log_gamma).exp(),
                                 torch.ones(n, n_channels)),
            "noise_std": torch.rand(n, generator=generator) * r.noise_std * noise_on,
            "noise_seed": torch.randint(0, 2**62, (n,), generator=generator),
        }

    def apply(self, image: torch.Tensor, brain_mask: torch.Tensor, lesion: torch.Tensor,
              params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment image (N, C, X, Y, Z), brain_mask and lesion (N, 1, X, Y, Z) as `params` say."""
        device = image.device
        flip = params["flip"].to(device)
        if flip.any():
            image = torch.where(per_volume(flip), image.flip(FLIP_AXIS_X), image)
            brain_mask = torch.where(per_volume(flip), brain_mask.flip(FLIP_AXIS_X), brain_mask)
            lesion = torch.where(per_volume(flip), lesion.flip(FLIP_AXIS_X), lesion)
        chosen = params["affine"].nonzero().flatten().to(device)
        if len(chosen):
            theta = affine_theta(params["rotation_deg"], params["scale"], params["translation_vox"],
                                 image.shape[2:])[params["affine"]].to(device=device, dtype=image.dtype)
            grid = F.affine_grid(theta, [len(chosen), 1, *image.shape[2:]], align_corners=False)
            resample = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}
            image = image.index_copy(0, chosen, F.grid_sample(image[chosen], grid, **resample))
            brain_mask = brain_mask.index_copy(0, chosen, F.grid_sample(brain_mask[chosen], grid, **resample))
            lesion = lesion.index_copy(0, chosen, F.grid_sample(lesion[chosen], grid, **resample))
        brain_mask = (brain_mask >= 0.5).to(image.dtype)
        field = F.interpolate(params["bias"].to(device=device, dtype=image.dtype), size=image.shape[2:],
                              mode="trilinear", align_corners=True)  # (N, C, X, Y, Z)
        image = image * field.exp()
        gamma = params["gamma"].to(device=device, dtype=image.dtype)[:, :, None, None, None]
        image = image.sign() * image.abs().pow(gamma)
        noise = torch.stack([
            torch.randn(image.shape[1:], generator=torch.Generator(device).manual_seed(int(s)), device=device)
            for s in params["noise_seed"]]).to(image.dtype)
        image = image + noise * per_volume(params["noise_std"].to(device=device, dtype=image.dtype))
        return image * brain_mask, brain_mask, lesion.clamp(0, 1)


def per_volume(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1, 1): one value per volume, broadcast over (N, C, X, Y, Z)."""
    return values[:, None, None, None, None]


def affine_theta(rotation_deg: torch.Tensor, scale: torch.Tensor, translation_vox: torch.Tensor,
                 shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, 3, 4) `affine_grid` matrices for a rotation and scaling about the grid centre plus a shift.

    The map (output voxel -> input voxel, centred voxel coordinates) is R(rx, ry, rz) diag(scale) p + t. It is
    conjugated into `affine_grid`'s normalised coordinates (u = 2 p / size) and reversed axis order (its
    coordinates run W, H, D = Z, Y, X), so rotations stay rigid on non-cubic grids.
    """
    rx, ry, rz = torch.deg2rad(rotation_deg.double()).unbind(dim=1)
    one, zero = torch.ones_like(rx), torch.zeros_like(rx)

    def stack(rows: list[list[torch.Tensor]]) -> torch.Tensor:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)  # (N, 3, 3)

    rot_x = stack([[one, zero, zero], [zero, rx.cos(), -rx.sin()], [zero, rx.sin(), rx.cos()]])
    rot_y = stack([[ry.cos(), zero, ry.sin()], [zero, one, zero], [-ry.sin(), zero, ry.cos()]])
    rot_z = stack([[rz.cos(), -rz.sin(), zero], [rz.sin(), rz.cos(), zero], [zero, zero, one]])
    linear = rot_z @ rot_y @ rot_x @ torch.diag_embed(scale.double())  # (N, 3, 3) voxel space, X Y Z
    half = torch.tensor(shape, dtype=torch.float64) / 2
    linear = linear * half[None, None, :] / half[None, :, None]  # S^-1 A S
    shift = translation_vox.double() / half[None, :]
    reverse = [2, 1, 0]
    theta = torch.cat([linear[:, reverse][:, :, reverse], shift[:, reverse, None]], dim=2)  # (N, 3, 4)
    return theta.float()
