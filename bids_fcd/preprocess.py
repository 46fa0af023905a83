"""Preprocessing: raw T1w + FLAIR -> model-ready template-space arrays, and the way back.

Spaces and conventions used throughout:

- nibabel affines map voxel indices -> scanner (or template) RAS+ mm.
- SimpleITK images and transforms live in LPS mm (ITK's convention): `LPS = diag(-1, -1, 1) @ RAS`.
- A registration transform maps points of its *fixed* image to its *moving* image (the direction
  antsApplyTransforms and fMRIPrep's `from-T1w_to-<tpl>_mode-image_xfm.txt` use). So
  `xfm_t1w_to_template` maps template LPS points -> T1w LPS points, and resampling the T1w with it gives the
  T1w on a template grid.

The stage: load + validate + reorient to RAS -> N4 bias correction -> deepbet brain extraction of the T1w
-> rigid FLAIR->T1w and affine T1w->template -> one interpolation per image onto the model grid ->
`normalise_intensity` inside the brain mask.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bids_fcd.config import ModelConfig
from bids_fcd.derivatives import atomic_path
from bids_fcd.template import Grid, load_template

ROBUST_PERCENTILES = (1.0, 99.0)
NORMALISED_RANGE = (-0.5, 3.0)  # normalised intensities are clipped to this, bounding outliers
# The percentiles TorchIO's HistogramStandardization reads of an image (cutoffs 1 and 99, quartiles, deciles)
HISTOGRAM_PERCENTILES = (1.0, 10.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 90.0, 99.0)
VOXEL_SIZE_LIMITS_MM = (0.1, 10.0)
MIN_VOXELS_PER_AXIS = 8
# sform and qform further apart than this anywhere in the image are warned about. Not a matrix tolerance: the qform
# stores a rotation as a float32 quaternion whose real part is recomputed from the other three, so near a 180-degree
# rotation (an LPS-stored scan) a header written by nibabel or dcm2niix differs from its own sform by ~1e-3 per
# matrix entry, 0.1-0.3 mm across a head; a real disagreement moves the scan by millimetres.
FORMS_DISAGREE_MM = 0.5
# deepbet masks outside this are failures (template mask instead); 600 mL lets a young child's brain through
BRAIN_VOLUME_LIMITS_ML = (600.0, 2200.0)
N4_SHRUNK_SPACING_MM = 6.0
REGISTRATION_SPACING_MM = 2.0
REGISTRATION_SEED = 20261
# Mattes MI on a regular grid of a quarter of the voxels (jittered by the seed). With 10 % random samples the
# metric was rough enough that gradient descent stopped after ~12 steps: FLAIRs of real pairs moved by known
# motions were left up to 1.9 mm off, and the T1w-template fit of a moved head differed from the upright one's by
# up to 2.3 mm; with this, 1.1 and 1.2 mm, for ~0.2 and ~0.3 s more (benchmarks/bench_registration.py).
REGISTRATION_SAMPLING = 0.25
# Head orientations tried before the affine: each Euler angle in -30..30 degrees, 15-degree steps. Moments
# alone leave a head tilted 30 degrees misregistered (FSL FLIRT and ANTs' antsAI search rotations too).
ROTATION_SEARCH_STEP_DEG = 15.0
ROTATION_SEARCH_STEPS = 2
ROTATION_SEARCH_SPACING_MM = 8.0
QC_SMOOTHING_MM = 3.0
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_log = logging.getLogger(__name__)


class InvalidImageError(Exception):
    """An input image that is not a usable 3D scalar MRI volume (the CLI maps it to exit code 65)."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(str(path), problem)
        self.path = Path(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"invalid image {self.path}: {self.problem}"


@dataclass(eq=False)  # arrays have no single truth value; compare fields explicitly
class Preprocessed:
    """One participant's model-ready arrays on the model grid, and how they relate to the input files.

    Attributes:
        t1w: (X, Y, Z) float32 on `grid`, bias-corrected, `normalise_intensity`-scaled, 0 outside the brain.
        flair: the same for the FLAIR, or None without one.
        brain_mask: (X, Y, Z) uint8 on `grid`, 1 inside the brain.
        grid: the model grid (template RAS+ mm).
        xfm_t1w_to_template: affine mapping template LPS mm points -> T1w scanner LPS mm points.
        xfm_flair_to_t1w: rigid mapping T1w LPS mm points -> FLAIR scanner LPS mm points, or None.
        brain_extraction: "deepbet", or "template-fallback" when deepbet failed or gave an implausible mask.
        qc: numbers for the report: the registration quality of `alignment_qc`, `brain_volume_ml` (the
            native-space brain mask), and `seconds` / `cpu_seconds`, {step: wall / CPU seconds}.
    """

    t1w: np.ndarray
    flair: np.ndarray | None
    brain_mask: np.ndarray
    grid: Grid
    xfm_t1w_to_template: sitk.Transform
    xfm_flair_to_t1w: sitk.Transform | None
    brain_extraction: str
    qc: dict = field(default_factory=dict)


def normalise_intensity(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """Robust-percentile normalisation ("robust-percentile" in ModelConfig.normalisation).

    The 1st and 99th percentiles of the brain's intensities map to 0 and 1, so scanners' arbitrary units and
    a few hot voxels do not move the scale, while FLAIR-bright lesions stay above 1. Outside the brain is 0;
    values are clipped to NORMALISED_RANGE. Returns float32 of the input's shape.
    """
    inside = brain_mask > 0
    low, high = np.percentile(volume[inside], ROBUST_PERCENTILES) if inside.any() else (0.0, 1.0)
    scaled = (volume - low) / max(high - low, 1e-6)
    scaled = np.clip(scaled, *NORMALISED_RANGE)
    scaled[~inside] = 0.0
    return scaled.astype(np.float32)


def histogram_landmarks(images: Sequence[np.ndarray], brain_masks: Sequence[np.ndarray],
                        channels: Sequence[str]) -> dict[str, list[float]]:
    """Nyul-Udupa landmarks of normalised training volumes: per channel, the mean of each volume's in-brain
    HISTOGRAM_PERCENTILES. What TorchIO's `HistogramStandardization.train` computes for files, here for arrays
    already on the 1st..99th percentile = 0..1 scale (its standard range), so the mean needs no rescaling.

    images: (C, X, Y, Z) each, channel order `channels`; brain_masks: (X, Y, Z) bool each.
    """
    values = np.array([[np.percentile(image[c][brain > 0], HISTOGRAM_PERCENTILES) for c in range(len(channels))]
                       for image, brain in zip(images, brain_masks)])  # (volumes, channels, percentiles)
    return {name: [round(float(v), 5) for v in values[:, c].mean(axis=0)] for c, name in enumerate(channels)}


def standardise_histograms(image: np.ndarray, brain_mask: np.ndarray, landmarks: dict[str, Sequence[float]],
                           channels: Sequence[str]) -> np.ndarray:
    """Map each channel's in-brain histogram onto `landmarks` (TorchIO's HistogramStandardization: piecewise
    linear between the image's percentiles and the landmarks, extended linearly beyond them, so a lesion above
    the 99th percentile keeps its contrast). Why: scanners differ in the shape of the histogram, not only its
    range (real FLAIR's in-brain median sits at 0.53-0.74 after `normalise_intensity`, the generator's at
    0.74-0.85), and a model should not have to learn every shape. Idempotent up to interpolation, so an input
    standardised already passes through unchanged. Returns float32, 0 outside the brain, clipped to
    NORMALISED_RANGE.
    """
    import torch
    import torchio as tio  # imported here, as in data.py: slow to import, and only models trained so need it

    inside = np.asarray(brain_mask) > 0
    subject = tio.Subject(brain=tio.LabelMap(tensor=torch.from_numpy(inside[None].astype(np.uint8))),
                          **{name: tio.ScalarImage(tensor=torch.from_numpy(np.asarray(image[c], np.float32)[None]))
                             for c, name in enumerate(channels)})
    transform = tio.HistogramStandardization({name: np.asarray(landmarks[name], dtype=float) for name in channels},
                                             masking_method="brain")
    standardised = transform(subject)
    out = np.stack([standardised[name].data[0].numpy() for name in channels])
    return np.where(inside, np.clip(out, *NORMALISED_RANGE), 0.0).astype(np.float32)


def model_input(image: np.ndarray, brain_mask: np.ndarray, config: ModelConfig) -> np.ndarray:
    """What `config`'s network reads: the normalised channels, histogram-standardised when the model was trained
    so (`config.histogram_landmarks`); the input itself otherwise."""
    if not config.histogram_landmarks:
        return image
    return standardise_histograms(image, brain_mask, config.histogram_landmarks, config.channels)


# ---------------------------------------------------------------------------------------------------------
# The stage's entry point
# ---------------------------------------------------------------------------------------------------------


def preprocess(
    t1w_path: Path,
    flair_path: Path | None,
    grid: Grid,
    n_threads: int = 1,
    logger: logging.Logger | None = None,
) -> Preprocessed:
    """Bring a T1w (and FLAIR) onto the template-space model grid.

    Each image is interpolated once (cubic B-spline), through the composition of its transforms. `n_threads`
    bounds SimpleITK's and torch's threads for the call, except that bias correction and registration always run
    on one (`_ONE_THREAD`). `qc["seconds"]` and `qc["cpu_seconds"]` hold each step's wall and CPU time (all
    threads).

    Raises:
        InvalidImageError: an input is unreadable, not one 3D volume, empty, or has absurd voxel sizes.
    """
    log = logger or _log
    seconds: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}
    with _threads(n_threads):
        with _timer(seconds, "load"):
            t1w = _to_sitk(*load_ras(t1w_path))
            flair = _to_sitk(*load_ras(flair_path)) if flair_path is not None else None
        with _timer(seconds, "n4"), _threads(_ONE_THREAD):
            t1w = n4_bias_correct(t1w)
            flair = n4_bias_correct(flair) if flair is not None else None
        with _timer(seconds, "brain_extraction"):
            mask_t1w, problem = extract_brain(t1w)
        with (_timer(seconds, "register_t1w_to_template"), _registration_of(t1w_path, "the template"),
              _threads(_ONE_THREAD)):
            if problem is None:
                brain_extraction = "deepbet"
                xfm_t1w_to_template = register_t1w_to_template(t1w * sitk.Cast(mask_t1w, sitk.sitkFloat32))
            else:
                log.warning("%s: deepbet brain extraction unusable (%s); using the template brain mask",
                            t1w_path, problem)
                brain_extraction = "template-fallback"
                xfm_t1w_to_template = register_t1w_to_template(t1w, fixed_mask=_template_mask_sitk())
                mask_t1w = _resample(_template_mask_sitk(), t1w, xfm_t1w_to_template.GetInverse()) >= 0.5
        xfm_flair_to_t1w = None
        if flair is not None:
            with (_timer(seconds, "register_flair_to_t1w"), _registration_of(flair_path, "its T1w"),
                  _threads(_ONE_THREAD)):
                xfm_flair_to_t1w = register_flair_to_t1w(t1w, flair, mask_t1w)
        with _timer(seconds, "resample"):
            reference = grid_image(grid)
            if brain_extraction == "deepbet":
                mask_grid = _resample(sitk.Cast(mask_t1w, sitk.sitkFloat32), reference, xfm_t1w_to_template)
                brain_mask = _array(mask_grid) >= 0.5
            else:
                brain_mask = template_on_grid(grid, "brain_mask") >= 0.5
            t1w_grid = _array(_resample(t1w, reference, xfm_t1w_to_template, sitk.sitkBSpline))
            flair_grid = None
            if flair is not None:  # template -> T1w -> FLAIR in one transform: one interpolation
                xfm_template_to_flair = compose(xfm_t1w_to_template, xfm_flair_to_t1w)
                flair_grid = _array(_resample(flair, reference, xfm_template_to_flair, sitk.sitkBSpline))
    with _timer(seconds, "normalise"):
        t1w_grid = normalise_intensity(t1w_grid, brain_mask)
        flair_grid = normalise_intensity(flair_grid, brain_mask) if flair_grid is not None else None
    qc = alignment_qc(t1w_grid, flair_grid, brain_mask, grid)
    qc["brain_volume_ml"] = float(sitk.GetArrayViewFromImage(mask_t1w).sum() * np.prod(t1w.GetSpacing()) / 1e3)
    qc["seconds"], qc["cpu_seconds"] = seconds["wall"], seconds["cpu"]
    log.info("%s: preprocessed in %.1f s (%s); Dice vs template brain %.3f, T1w-template r %.3f",
             t1w_path, sum(seconds["wall"].values()), brain_extraction, qc["dice_brain_mask_vs_template"],
             qc["t1w_template_correlation"])
    return Preprocessed(
        t1w=t1w_grid,
        flair=flair_grid,
        brain_mask=brain_mask.astype(np.uint8),
        grid=grid,
        xfm_t1w_to_template=xfm_t1w_to_template,
        xfm_flair_to_t1w=xfm_flair_to_t1w,
        brain_extraction=brain_extraction,
        qc=qc,
    )


def channels_array(pre: Preprocessed, channels: tuple[str, ...]) -> np.ndarray:
    """The model input (C, X, Y, Z) float32, channels in `ModelConfig.channels` order ("T1w", "FLAIR")."""
    volumes = {"T1w": pre.t1w, "FLAIR": pre.flair}
    for name in channels:
        if name not in volumes:
            raise ValueError(f"unknown channel {name!r}; known: {sorted(volumes)}")
        if volumes[name] is None:
            raise ValueError(f"channel {name!r} is required but this participant was preprocessed without it")
    return np.stack([volumes[name] for name in channels]).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------


def load_ras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI as one 3D float32 volume reoriented to the closest RAS+ axes.

    Returns (data, affine): data (X, Y, Z) float32 with non-finite voxels set to 0, and its voxel -> scanner
    RAS+ mm affine (scanner coordinates are unchanged by the reorientation).

    Raises:
        InvalidImageError: unreadable or corrupt file, more than one volume, not scalar, fewer than
            8 voxels along an axis, voxel sizes outside 0.1..10 mm, or no finite non-constant intensities.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel and its gzip backends raise many unrelated types for a damaged file
        raise InvalidImageError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.floating):
        raise InvalidImageError(path, f"voxels are {data.dtype}, not scalar intensities")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InvalidImageError(path, f"shape {data.shape} is not one 3D volume")
    if min(data.shape) < MIN_VOXELS_PER_AXIS:
        raise InvalidImageError(path, f"shape {data.shape} has fewer than {MIN_VOXELS_PER_AXIS} voxels on an axis")
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InvalidImageError(path, "its affine is singular or not finite")
    sform, sform_code = image.header.get_sform(coded=True) if hasattr(image.header, "get_sform") else (None, 0)
    qform, qform_code = image.header.get_qform(coded=True) if hasattr(image.header, "get_qform") else (None, 0)
    if sform_code and qform_code and (apart := forms_apart_mm(sform, qform, data.shape[:3])) > FORMS_DISAGREE_MM:
        # nibabel (and so this app) uses the sform; tools that prefer the qform would place the scan elsewhere
        _log.warning("%s: its sform and qform disagree (they place voxels up to %.1f mm apart); the sform is used",
                     path, apart)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = VOXEL_SIZE_LIMITS_MM
    if np.any(zooms < low) or np.any(zooms > high):
        raise InvalidImageError(path, f"voxel size {np.round(zooms, 4).tolist()} mm is outside {low}..{high} mm")
    data = data.astype(np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        raise InvalidImageError(path, "has no finite intensities (all NaN or infinite)")
    if not finite.all():
        _log.warning("%s: %d NaN or infinite voxels (%.1f %%) set to 0", path, (~finite).sum(),
                     100.0 * (~finite).mean())
    data[~finite] = 0.0
    if data.min() == data.max():
        raise InvalidImageError(path, f"is constant (every voxel is {data.flat[0]:g})")
    orientation = nib.io_orientation(affine)
    data = nib.orientations.apply_orientation(data, orientation)
    affine = affine @ nib.orientations.inv_ornt_aff(orientation, image.shape[:3])
    return np.ascontiguousarray(data), affine


# ---------------------------------------------------------------------------------------------------------
# Steps on SimpleITK images (LPS mm)
# ---------------------------------------------------------------------------------------------------------


def forms_apart_mm(sform: np.ndarray, qform: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance between where the sform and the qform put a corner voxel of the image (an affine map's
    largest displacement over a box is at a corner)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    return float(np.linalg.norm(corners @ (sform - qform)[:3].T, axis=1).max())


def n4_bias_correct(image: sitk.Image) -> sitk.Image:
    """N4 bias-field correction, estimated on a copy averaged down to ~6 mm and applied at full resolution.

    The field (3 fitting levels) is fitted inside an Otsu head mask; intensities are shifted to be
    non-negative first, as N4 works on log intensities. Measured on the real volumes, this keeps the white
    matter's coefficient of variation within 0.003 of a 4 mm / 4-level fit at a quarter to a tenth of its cost.
    """
    low = float(sitk.GetArrayViewFromImage(image).min())
    if low < 0:
        image = image - low
    small = _bin_shrink(image, N4_SHRUNK_SPACING_MM)
    mask = sitk.OtsuThreshold(small, 0, 1, 200) * sitk.Cast(small > 0, sitk.sitkUInt8)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([50] * 3)  # a 4th, finer level began to flatten grey/white contrast
    n4.Execute(small, mask)
    field = sitk.Exp(n4.GetLogBiasFieldAsImage(image))
    return sitk.Cast(image / sitk.Cast(field, image.GetPixelID()), sitk.sitkFloat32)


def extract_brain(t1w: sitk.Image) -> tuple[sitk.Image, str | None]:
    """deepbet brain mask of the T1w (uint8, on its grid), and None or why it is unusable."""
    data, affine = _ras(t1w)
    try:
        _, mask_image, _ = _deepbet().run(nib.Nifti1Image(data, affine))
    except Exception as err:  # noqa: BLE001 - any deepbet failure (assertions, torch, cc3d) means: fall back
        return sitk.Image(t1w.GetSize(), sitk.sitkUInt8), f"{type(err).__name__}: {err}"
    mask = np.asarray(mask_image.dataobj).astype(np.uint8)
    volume_ml = mask.sum() * np.prod(t1w.GetSpacing()) / 1000.0
    mask_sitk = _to_sitk(mask, affine)
    mask_sitk.CopyInformation(t1w)
    low, high = BRAIN_VOLUME_LIMITS_ML
    if not low <= volume_ml <= high:
        return mask_sitk, f"mask volume {volume_ml:.0f} mL is outside {low:.0f}..{high:.0f} mL"
    return mask_sitk, None


@contextlib.contextmanager
def _registration_of(path: Path, target: str):
    """ITK's registration errors (e.g. no sample points in a tiny field of view) as bad input naming the image."""
    try:
        yield
    except RuntimeError as err:
        raise InvalidImageError(path, f"cannot be registered to {target} (field of view or grid too small?): "
                                      f"{str(err).strip()[-300:]}") from err


def register_t1w_to_template(t1w_brain: sitk.Image, fixed_mask: sitk.Image | None = None) -> sitk.AffineTransform:
    """Affine registration of the (brain-extracted) T1w to nilearn's brain-only template, at 2 mm.

    Mattes mutual information, started from the best head orientation of a coarse rotation search
    (`initial_head_orientation`), three levels (8, 4, 2 mm); the T1w is first averaged down to ~2 mm, as finer
    detail only costs time at this resolution.
    Returns the transform mapping template LPS mm points -> T1w LPS mm points.
    """
    fixed = _template_registration_target()
    moving = _bin_shrink(t1w_brain, REGISTRATION_SPACING_MM)
    orientation = initial_head_orientation(fixed, moving, fixed_mask)
    initial = sitk.AffineTransform(orientation.GetMatrix(), orientation.GetTranslation(), orientation.GetCenter())
    method = _registration_method(shrink=[4, 2, 1], sigmas_mm=[4.0, 2.0, 0.0])
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInitialTransform(initial, inPlace=False)
    return _as_affine(method.Execute(fixed, moving))


def initial_head_orientation(fixed: sitk.Image, moving: sitk.Image,
                             fixed_mask: sitk.Image | None = None) -> sitk.Euler3DTransform:
    """The rigid start that best matches the head to the template: centres of mass, then the best rotation."""
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    return best_rotation(fixed, moving, start, fixed_mask)


def best_rotation(fixed: sitk.Image, moving: sitk.Image, start: sitk.Euler3DTransform,
                  fixed_mask: sitk.Image | None = None) -> sitk.Euler3DTransform:
    """`start` turned to the best of a coarse grid of rotations about its centre, so that a tilted head does
    not converge to a wrong fit.

    SimpleITK's exhaustive optimiser scores every combination of Euler angles in +-30 degrees (15-degree steps,
    125 in all, `start` itself among them) by Mattes MI at 8 mm, in about a second; the registration then
    refines from the best one. This is the coarse search FLIRT and antsAI run.
    """
    start = sitk.Euler3DTransform(start)
    shrink = max(1, round(ROTATION_SEARCH_SPACING_MM / fixed.GetSpacing()[0]))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.5, REGISTRATION_SEED)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    steps = ROTATION_SEARCH_STEPS
    method.SetOptimizerAsExhaustive(numberOfSteps=[steps, steps, steps, 0, 0, 0],
                                    stepLength=np.deg2rad(ROTATION_SEARCH_STEP_DEG))
    method.SetOptimizerScales([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    method.SetShrinkFactorsPerLevel([shrink])
    method.SetSmoothingSigmasPerLevel([ROTATION_SEARCH_SPACING_MM / 2])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=True)
    method.Execute(fixed, moving)
    return start


def register_flair_to_t1w(t1w: sitk.Image, flair: sitk.Image, brain_mask: sitk.Image) -> sitk.AffineTransform:
    """Rigid registration of the FLAIR to the T1w (Mattes MI inside the dilated T1w brain mask), at 2 mm.

    Both are in the same session's scanner space, so the search starts from the identity and turns about the
    brain's centre of mass: the same coarse rotation search as for the template (`best_rotation`), as a head
    that moved between the scans by more than ~20 degrees otherwise converged to a wrong fit. Both images are
    averaged down to ~2 mm first: on the real volumes this recovers a known motion to within 0.5 mm, at a
    seventh of the full-resolution cost.
    Returns the transform mapping T1w LPS mm points -> FLAIR LPS mm points.
    """
    index, size = _bounding_box(brain_mask, margin_mm=10.0)
    fixed = _bin_shrink(sitk.RegionOfInterest(t1w, size, index), REGISTRATION_SPACING_MM)
    moving = _bin_shrink(flair, REGISTRATION_SPACING_MM)
    mask = sitk.Resample(sitk.BinaryDilate(brain_mask, [3, 3, 3]), fixed, sitk.Transform(),
                         sitk.sitkNearestNeighbor)
    identity = sitk.Euler3DTransform()
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(brain_mask)
    identity.SetCenter(stats.GetCentroid(1))
    method = _registration_method(shrink=[4, 2, 1], sigmas_mm=[4.0, 2.0, 0.0])
    method.SetMetricFixedMask(mask)
    method.SetInitialTransform(best_rotation(fixed, moving, identity, mask), inPlace=False)
    return _as_affine(method.Execute(fixed, moving))


def _registration_method(shrink: list[int], sigmas_mm: list[float]) -> sitk.ImageRegistrationMethod:
    """Mattes MI (`REGISTRATION_SAMPLING` of the voxels on a jittered grid, fixed seed), regular-step gradient
    descent with steps in ~mm."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(REGISTRATION_SAMPLING, REGISTRATION_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01, numberOfIterations=200,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas_mm)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _bin_shrink(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Average blocks of voxels so that each axis' spacing approaches `spacing_mm` (never finer than now)."""
    return sitk.BinShrink(image, [max(1, round(spacing_mm / s)) for s in image.GetSpacing()])


# ---------------------------------------------------------------------------------------------------------
# Transforms as 4x4 matrices, and resampling
# ---------------------------------------------------------------------------------------------------------


def transform_matrix(xfm: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of a linear SimpleITK transform (LPS mm in -> LPS mm out).

    Registration returns a CompositeTransform (of one transform here); its members multiply in order.
    """
    xfm = xfm.Downcast()
    if isinstance(xfm, sitk.CompositeTransform):
        matrix = np.eye(4)
        for i in range(xfm.GetNumberOfTransforms()):  # the last added is applied first
            matrix = matrix @ transform_matrix(xfm.GetNthTransform(i))
        return matrix
    linear = np.array(xfm.GetMatrix()).reshape(3, 3)
    centre = np.array(xfm.GetCenter())
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.array(xfm.GetTranslation()) + centre - linear @ centre
    return matrix


def ras_matrix(xfm: sitk.Transform) -> np.ndarray:
    """The 4x4 matrix of a linear SimpleITK transform in RAS+ mm (nibabel's convention; ITK works in LPS)."""
    return LPS_FROM_RAS @ transform_matrix(xfm) @ LPS_FROM_RAS


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    """A SimpleITK AffineTransform from a 4x4 LPS mm -> LPS mm matrix."""
    xfm = sitk.AffineTransform(3)
    xfm.SetMatrix(matrix[:3, :3].ravel().tolist())
    xfm.SetTranslation(matrix[:3, 3].tolist())
    return xfm


def compose(first: sitk.Transform, then: sitk.Transform) -> sitk.AffineTransform:
    """The affine applying `first`, then `then`, to a point (e.g. template -> T1w, then T1w -> FLAIR)."""
    return affine_transform(transform_matrix(then) @ transform_matrix(first))


def _as_affine(xfm: sitk.Transform) -> sitk.AffineTransform:
    return affine_transform(transform_matrix(xfm))


def grid_image(grid: Grid) -> sitk.Image:
    """An empty float32 SimpleITK image with the model grid's geometry (for use as a resampling reference)."""
    image = sitk.Image([int(s) for s in grid.shape], sitk.sitkFloat32)
    _set_geometry(image, grid.affine)
    return image


def _resample(image: sitk.Image, reference: sitk.Image, xfm: sitk.Transform,
              interpolator: int = sitk.sitkLinear) -> sitk.Image:
    return sitk.Resample(image, reference, xfm, interpolator, 0.0, sitk.sitkFloat32)


# ---------------------------------------------------------------------------------------------------------
# The way back: model grid -> input files' grids and scanner coordinates
# ---------------------------------------------------------------------------------------------------------


def template_to_native(volume_template: np.ndarray, pre: Preprocessed, t1w_path: Path,
                       order: int = 1) -> nib.Nifti1Image:
    """Resample a model-grid map onto the grid and affine of the original input T1w file.

    For probability, saliency and uncertainty maps. `order` is the spline order (0 nearest, 1 linear); outside
    the model grid is 0. Returns float32 with the input T1w's shape (spatial axes) and affine.
    """
    native = nib.load(t1w_path)
    # native voxel -> scanner RAS -> LPS -> template LPS -> template RAS -> model grid voxel
    matrix = np.linalg.inv(pre.grid.affine) @ np.linalg.inv(ras_matrix(pre.xfm_t1w_to_template)) @ native.affine
    data = ndimage.affine_transform(np.asarray(volume_template, dtype=np.float32), matrix[:3, :3],
                                    matrix[:3, 3], output_shape=native.shape[:3], order=order, mode="constant",
                                    cval=0.0)
    # a fresh header: the T1w's scaling, intent and display range (cal_min/max) would mislabel a 0..1 map
    return nib.Nifti1Image(data.astype(np.float32), native.affine)


def mask_to_template(mask_path: Path, space: str, pre: Preprocessed, t1w_path: Path,
                     flair_path: Path | None) -> np.ndarray:
    """A lesion mask on the T1w or FLAIR grid (`space` "T1w" / "FLAIR") -> the model grid, for training.

    Returns float32 in 0..1: the fraction of each model voxel covered by the mask (linear interpolation of the
    binary mask); threshold at 0.5 for a binary mask. The mask must have the shape of the image it is named
    after, whose affine is used (masks are often saved with a slightly different header).
    """
    if space not in ("T1w", "FLAIR"):
        raise ValueError(f"space must be 'T1w' or 'FLAIR', not {space!r}")
    reference_path = t1w_path if space == "T1w" else flair_path
    if space == "FLAIR" and (flair_path is None or pre.xfm_flair_to_t1w is None):
        raise ValueError(f"{mask_path} is in FLAIR space but there is no registered FLAIR")
    try:
        mask = np.asanyarray(nib.load(mask_path).dataobj)
    except Exception as err:  # as in load_ras
        raise InvalidImageError(mask_path, f"cannot be read ({type(err).__name__}: {err})") from err
    reference = nib.load(reference_path)
    mask = mask.reshape(mask.shape[:3]) if mask.ndim > 3 and np.prod(mask.shape[3:]) == 1 else mask
    if mask.shape != reference.shape[:3]:
        raise InvalidImageError(mask_path, f"shape {mask.shape} differs from {reference_path} {reference.shape[:3]}")
    xfm = pre.xfm_t1w_to_template if space == "T1w" else compose(pre.xfm_t1w_to_template, pre.xfm_flair_to_t1w)
    # model grid voxel -> template RAS -> LPS -> native LPS -> RAS -> mask voxel
    matrix = np.linalg.inv(reference.affine) @ ras_matrix(xfm) @ pre.grid.affine
    binary = (np.nan_to_num(mask.astype(np.float32)) > 0).astype(np.float32)
    resampled = ndimage.affine_transform(binary, matrix[:3, :3], matrix[:3, 3], output_shape=pre.grid.shape,
                                         order=1, mode="constant", cval=0.0)
    return np.clip(resampled, 0.0, 1.0).astype(np.float32)


def template_points_to_scanner(points_mm: np.ndarray, pre: Preprocessed) -> np.ndarray:
    """(N, 3) template RAS+ mm points -> the T1w's scanner RAS+ mm (for cluster peaks and centroids)."""
    points = np.atleast_2d(np.asarray(points_mm, dtype=float))
    homogeneous = np.c_[points, np.ones(len(points))]
    return (homogeneous @ ras_matrix(pre.xfm_t1w_to_template).T)[:, :3]


def write_transform(xfm: sitk.Transform, path: Path) -> None:
    """Write a transform as ITK text (`#Insight Transform File V1.0`), readable by antsApplyTransforms;
    atomically, like every output."""
    with atomic_path(path) as temporary:
        sitk.WriteTransform(xfm, str(temporary))


# ---------------------------------------------------------------------------------------------------------
# Quality control
# ---------------------------------------------------------------------------------------------------------


# Where a QC measure says "look before you trust this participant": below (or outside) what the 10 real brains
# here measured (8 unseen + 2 training: t1w_template_correlation 0.50-0.85, Dice 0.95-0.97, FLAIR/T1w gradient
# correlation 0.57-0.87, brain 1070-1660 mL; ds004199's youngest participants are 3 years old, ~1000 mL). A
# QA run put pure noise at r 0.40, a 25-degree misregistration at Dice 0.91, another person's FLAIR at gradient
# correlation 0.51. Warnings, not failures: a real scan just outside these ranges should still be predicted,
# with the reader told.
QC_BOUNDS = {
    "t1w_template_correlation": (0.45, None, ("the T1w does not look like the template after registration: not "
                                              "a whole-brain T1w, a partial field of view, or a failed registration")),
    "dice_brain_mask_vs_template": (0.93, None, ("the brain mask disagrees with the template's: brain extraction "
                                                 "or registration may have failed")),
    "flair_t1w_gradient_correlation": (0.55, None, ("the FLAIR's edges do not follow the T1w's: FLAIR "
                                                    "misregistered, or from another session or person")),
    # a deepbet mask of 2000-2200 mL is used, and warned of
    "brain_volume_ml": (BRAIN_VOLUME_LIMITS_ML[0], 2000.0,
                        "implausible brain volume: brain extraction may have failed"),
}


def qc_warnings(qc: dict, brain_extraction: str) -> list[str]:
    """Sentences for the log, report and prediction JSON where preprocessing QC says the result may be wrong."""
    warnings_found = []
    if brain_extraction != "deepbet":
        warnings_found.append("brain extraction failed on this T1w: the template's brain mask was used instead")
    for key, (low, high, meaning) in QC_BOUNDS.items():
        value = qc.get(key)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low:g}-{high:g}" if high is not None else f">= {low:g}"
            warnings_found.append(f"{key} {value:.3f} (expected {bounds}): {meaning}")
    return warnings_found


def alignment_qc(t1w: np.ndarray, flair: np.ndarray | None, brain_mask: np.ndarray, grid: Grid) -> dict:
    """Registration quality of model-grid arrays, as numbers that a wrong transform drives down.

    - dice_brain_mask_vs_template: Dice of `brain_mask` and the template's brain mask (0.95-0.97 on the real
      volumes; 0.88 when the affine is 15 degrees and 6 mm off). Ranges in brackets: the stroke, MS and healthy
      scans of the tests; `QC_BOUNDS` gives those of all 10 real brains here, z-scored gliomas included.
    - t1w_template_correlation: Pearson r of the T1w and the template T1w, both smoothed with a 3 mm Gaussian
      (the scale an affine can match; cortical folding differs between people), inside the template brain
      (0.79-0.85 on the real volumes; 0.56-0.59 when 15 degrees and 6 mm off).
    - flair_t1w_gradient_correlation: Pearson r of the FLAIR's and T1w's gradient magnitudes inside the brain;
      contrast-independent, it falls when edges stop coinciding (0.72-0.86 on the real volumes; 0.49-0.66
      with the FLAIR 3 mm off).
    - flair_t1w_mutual_info: normalised mutual information (Studholme, 1..2) of FLAIR and T1w in the brain.
    """
    template_mask = template_on_grid(grid, "brain_mask") >= 0.5
    sigma = QC_SMOOTHING_MM / grid.spacing_mm
    smooth_t1w = ndimage.gaussian_filter(t1w.astype(np.float32), sigma)
    smooth_template = ndimage.gaussian_filter(template_on_grid(grid, "T1w"), sigma)
    mask = brain_mask > 0
    qc = {
        "dice_brain_mask_vs_template": _dice(mask, template_mask),
        "t1w_template_correlation": _correlation(smooth_t1w[template_mask], smooth_template[template_mask]),
    }
    if flair is not None:
        qc["flair_t1w_gradient_correlation"] = _correlation(_gradient_magnitude(flair)[mask],
                                                            _gradient_magnitude(t1w)[mask])
        qc["flair_t1w_mutual_info"] = _normalised_mutual_information(flair[mask], t1w[mask])
    return qc


def qc_figures(pre: Preprocessed, out_dir: Path, prefix: str) -> dict[str, Path]:
    """SVG figures for the participant report: three orthogonal slices of the model grid each.

    - "t1w_to_template": the registered T1w, with the template's grey/white-matter edges (red);
    - "flair_to_t1w": the registered FLAIR, with the T1w's grey/white-matter edges (red), if a FLAIR;
    - "brain_mask": the registered T1w, with the brain mask (red) and the template's brain mask (cyan).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to disturb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    brain = pre.brain_mask > 0
    template_t1w = template_on_grid(pre.grid, "T1w")
    template_mask = template_on_grid(pre.grid, "brain_mask")
    smooth_t1w = ndimage.gaussian_filter(pre.t1w, 1.0)
    panels = {
        "t1w_to_template": (pre.t1w, [(template_t1w, float(np.median(template_t1w[template_mask >= 0.5])),
                                       "red", "template GM/WM edge")]),
        "brain_mask": (pre.t1w, [(brain.astype(np.float32), 0.5, "red", "brain mask"),
                                 (template_mask, 0.5, "cyan", "template brain")]),
    }
    if pre.flair is not None:
        panels["flair_to_t1w"] = (pre.flair, [(smooth_t1w, float(np.percentile(smooth_t1w[brain], 60)), "red",
                                               "T1w GM/WM edge")])
    centre = np.array(pre.grid.shape) // 2
    paths = {}
    for name, (background, contours) in panels.items():
        fig = Figure(figsize=(9, 3.2), facecolor="black")
        for axis, ax in enumerate(fig.subplots(1, 3)):
            index = [slice(None)] * 3
            index[axis] = int(centre[axis])
            ax.imshow(background[tuple(index)].T, cmap="gray", origin="lower", vmin=0, vmax=1.5)
            for volume, level, colour, _ in contours:
                ax.contour(volume[tuple(index)].T, levels=[level], colors=colour, linewidths=0.6)
            ax.set_axis_off()
        legend = ", ".join(f"{colour}: {label}" for _, _, colour, label in contours)
        fig.suptitle(f"{prefix}: {name.replace('_', ' ')} ({legend})", color="white", fontsize=9)
        path = out_dir / f"{prefix}_desc-{name.replace('_', '')}_qc.svg"
        with atomic_path(path) as temporary:
            fig.savefig(temporary, facecolor="black", bbox_inches="tight", format="svg")
        paths[name] = path
    return paths


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 0.0


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _gradient_magnitude(volume: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_gradient_magnitude(volume.astype(np.float32), sigma=1.0)


def _normalised_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    joint, _, _ = np.histogram2d(a.ravel(), b.ravel(), bins=bins)
    joint = joint / joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(0)) + entropy(joint.sum(1))) / entropy(joint)


# ---------------------------------------------------------------------------------------------------------
# Template, deepbet, numpy <-> SimpleITK
# ---------------------------------------------------------------------------------------------------------


def template_on_grid(grid: Grid, kind: str) -> np.ndarray:
    """A nilearn template image ("T1w", "brain_mask", ...) linearly resampled onto `grid`, float32."""
    return _template_on_grid(tuple(grid.shape), grid.affine.tobytes(), kind).copy()


@lru_cache(maxsize=8)
def _template_on_grid(shape: tuple[int, int, int], affine_bytes: bytes, kind: str) -> np.ndarray:
    grid = Grid(shape=shape, affine=np.frombuffer(affine_bytes).reshape(4, 4))
    template = load_template(kind)
    image = _to_sitk(template.get_fdata(dtype=np.float32), template.affine)
    return _array(_resample(image, grid_image(grid), sitk.Transform(3, sitk.sitkIdentity)))


@lru_cache(maxsize=1)
def _template_registration_target() -> sitk.Image:
    """nilearn's brain-only T1w template, averaged down to 2 mm (the fixed image of T1w -> template)."""
    template = load_template("T1w")
    image = _to_sitk(template.get_fdata(dtype=np.float32), template.affine)
    factor = round(REGISTRATION_SPACING_MM / image.GetSpacing()[0])
    return sitk.BinShrink(image, [factor] * 3)


@lru_cache(maxsize=1)
def _template_mask_sitk() -> sitk.Image:
    template = load_template("brain_mask")
    return _to_sitk((template.get_fdata() > 0.5).astype(np.uint8), template.affine)


@lru_cache(maxsize=2)
def _deepbet():
    """deepbet's model, with its weights named explicitly: they install into a generic `site-packages/data`."""
    import torch
    from deepbet.bet import BrainExtraction
    from deepbet.utils import DATA_PATH

    models = Path(DATA_PATH) / "models"
    model_path, bbox_path = models / "model.pt", models / "bbox_model.pt"
    for path in (model_path, bbox_path):
        if not path.is_file():
            raise FileNotFoundError(f"deepbet weights missing: {path}")
    with warnings.catch_warnings():  # its TorchScript weights warn that torch.jit.load is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return BrainExtraction(no_gpu=not torch.cuda.is_available(), model_path=str(model_path),
                               bbox_model_path=str(bbox_path))


def _to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A SimpleITK image (LPS) from an (X, Y, Z) array and its voxel -> RAS+ mm affine."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    _set_geometry(image, affine)
    return image


def _set_geometry(image: sitk.Image, affine: np.ndarray) -> None:
    lps = LPS_FROM_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    # ITK directions must be orthonormal; a sheared NIfTI affine keeps its (rare, tiny) shear only in nibabel
    u, _, vt = np.linalg.svd(lps[:3, :3] / spacing)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((u @ vt).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())


def _ras(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) array and voxel -> RAS+ mm affine of a SimpleITK image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return _array(image), LPS_FROM_RAS @ lps


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0).copy()


def _bounding_box(mask: sitk.Image, margin_mm: float) -> tuple[list[int], list[int]]:
    """(index, size) of the mask's bounding box grown by `margin_mm`, clipped to the image."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)
    margin = [int(np.ceil(margin_mm / s)) for s in mask.GetSpacing()]
    start = [max(0, b - m) for b, m in zip(box[:3], margin)]
    stop = [min(n, b + s + m) for b, s, m, n in zip(box[:3], box[3:], margin, mask.GetSize())]
    return start, [e - s for s, e in zip(start, stop)]


# Bias correction and registration run on one thread whatever `n_threads` is: ITK sums their threads' partial
# results in a varying order, and the registration's optimiser turns a 7th-digit difference into up to 0.2 mm on
# real scans (measured: the stroke T1w, N4 with 2 threads against 1 differed by 5e-7 and its template registration
# by 0.17 mm). On one thread a scan preprocesses the same however many participants share the CPUs. Brain
# extraction (torch) and resampling (per voxel) gave identical results on 1 and 2 threads, and keep all of them.
_ONE_THREAD = 1


@contextlib.contextmanager
def _threads(n_threads: int):
    """Limit SimpleITK and torch to `n_threads` for the block (both are process-wide settings)."""
    import torch

    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), torch.get_num_threads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, n_threads))
    torch.set_num_threads(max(1, n_threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous[0])
        torch.set_num_threads(previous[1])


@contextlib.contextmanager
def _timer(seconds: dict[str, dict[str, float]], step: str):
    """Add the block's wall and CPU seconds (all threads) to `seconds["wall"][step]`, `seconds["cpu"][step]`.

    CPU time says what a step costs when other processes compete for the cores; wall time what it took.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        for kind, elapsed in (("wall", time.perf_counter() - wall), ("cpu", time.process_time() - cpu)):
            seconds[kind][step] = round(seconds[kind].get(step, 0.0) + elapsed, 3)
