"""Focal cortical dysplasia type II simulated on image arrays, on any isotropic grid.

Split the TorchIO way: `sample_lesion_params` makes every random choice and returns them as a loggable
`LesionParams`; `implant_fcd` applies those values deterministically (the same params on the same arrays give
the same result). Both take plain arrays indexed (X, Y, Z) with isotropic voxels of `spacing_mm`, plus grey-
and white-matter probability maps on the same grid, so the training code can call them on the fly on
template-space arrays of real brains.

Simulated signs of FCD type II (Colombo et al. 2003, AJNR 24:724; Blümcke et al. 2011, Epilepsia 52:158):
cortical thickening, blurring of the grey/white junction on T1w (juxtacortical white matter losing its
T1 brightness), FLAIR hyperintensity of the cortex and the subcortical white matter, and sometimes the
transmantle sign: a FLAIR-bright tail tapering from the lesion to the nearest ventricle. Every change is a
fraction of the image's own local grey/white intensities, so it works on raw scanner units, after
normalisation, and under a bias field alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

VOLUME_RANGE_ML = (0.5, 8.0)
# A voxel at the grey/white boundary holds both tissues: each probability inside this range.
BOUNDARY_PROBABILITY = (0.3, 0.7)
# Where grey + white probability is below this, the voxel is CSF or outside the brain.
LOW_TISSUE_PROBABILITY = 0.3
# A lesion centre must have subarachnoid CSF (not a ventricle's) within this distance (cortex is ~3 mm thick):
# keeps centres cortical. With any CSF, 4 % of the template's candidate junction voxels qualified through a
# ventricle alone, and periventricular white matter received "FCD" that looked like an MS plaque.
MAX_DISTANCE_TO_CSF_MM = 8.0
# Smallest enclosed CSF space that counts as a ventricle (template lateral ventricles hold ~7 mL each).
MIN_VENTRICLE_ML = 1.0
MAX_TRANSMANTLE_LENGTH_MM = 60.0
TAIL_START_MM = 4.0  # widest radius of a transmantle tail, where it leaves the lesion
TAIL_END_VOX = 0.75  # its radius at the ventricle: a voxel wide, so that the thin end stays connected
MAX_CENTRE_DRAWS = 500
# A real brain's own lesion: FLAIR this many robust SDs above its median (healthy synthetic brains through the
# pipeline: at most 2 mL; the real gliomas 20-150 mL, the MS brain 1 mL; the stroke's gliosis stays mostly below)
BRIGHT_LESION_MADS = 3.0


@dataclass(frozen=True)
class LesionParams:
    """The drawn values of one simulated lesion (all JSON-safe, so they can be logged and replayed).

    Attributes:
        centre_vox: lesion centre, voxel indices (X, Y, Z) on the grid it was drawn on; at the grey/white junction.
        volume_ml: volume of the lesion mask (core and transmantle tail together), in mL.
        severity: 0 (subtle) .. 1 (obvious); the other effect sizes were drawn around it.
        blur_sigma_mm: Gaussian blur of the grey/white junction inside the lesion, in mm.
        thickening_mm: how far the cortex grows into the underlying white matter, in mm.
        flair_gain: FLAIR rise as a fraction of the local white matter FLAIR intensity (cortex is ~1.2-1.3).
        wm_t1_shift: juxtacortical white matter T1w moved toward grey matter, as a fraction of the local
            grey/white T1w difference (0: unchanged, 1: as dark as cortex).
        wm_depth_mm: how deep below the cortex the lesion reaches into the white matter, in mm.
        elongation: ellipsoid semi-axis ratios (product 1), before the random noise perturbation.
        irregularity: weight of the smooth noise that roughens the ellipsoid (0: smooth ellipsoid).
        transmantle: whether a transmantle tail runs from the lesion to `transmantle_target_vox`.
        transmantle_target_vox: the nearest ventricle wall voxel (X, Y, Z), or None without a tail.
        shape_seed: seed of the lesion's orientation, noise field and noise re-injection.
    """

    centre_vox: tuple[int, int, int]
    volume_ml: float
    severity: float
    blur_sigma_mm: float
    thickening_mm: float
    flair_gain: float
    wm_t1_shift: float
    wm_depth_mm: float
    elongation: tuple[float, float, float]
    irregularity: float
    transmantle: bool
    transmantle_target_vox: tuple[int, int, int] | None
    shape_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def sample_lesion_params(
    rng: np.random.Generator,
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
    spacing_mm: float,
    exclude_mask: np.ndarray | None = None,
    territory_mask: np.ndarray | None = None,
    severity: float | None = None,
) -> LesionParams:
    """Draw a random FCD: where (a cortical grey/white junction voxel), how big, how conspicuous.

    Args:
        rng: the only source of randomness.
        gm_prob, wm_prob: grey/white matter probabilities (0..1), shape (X, Y, Z).
        spacing_mm: isotropic voxel size in mm.
        exclude_mask: voxels no part of the lesion may touch, its transmantle tail included (a tumour, its
            oedema, a resection cavity).
        territory_mask: voxels the lesion core must lie within (FCD type II is neocortical: e.g. everything but
            the cerebellum, brainstem, deep nuclei and mesial temporal lobe); a transmantle tail may leave it on
            its way to the ventricle. None: anywhere.
        severity: 0 (subtle) .. 1 (obvious); None draws it uniformly.

    Raises:
        ValueError: no cortical grey/white junction voxel leaves room for even the smallest lesion.
    """
    severity = float(rng.uniform(0.0, 1.0)) if severity is None else float(np.clip(severity, 0.0, 1.0))
    # Log-uniform: a 1 mL lesion is as likely as a 4 mL one, matching the skew of resected FCD volumes.
    volume_ml = float(np.exp(rng.uniform(*np.log(VOLUME_RANGE_ML))))

    def around(low: float, high: float, spread: float = 0.15) -> float:
        """A value between low (subtle) and high (obvious) at this severity, jittered by +-spread."""
        return float((low + (high - low) * severity) * rng.uniform(1.0 - spread, 1.0 + spread))

    elongation = rng.uniform(0.7, 1.4, size=3)
    elongation = tuple(float(a) for a in elongation / np.prod(elongation) ** (1.0 / 3.0))
    forbidden = _forbidden_for_core(exclude_mask, territory_mask)
    ventricles = enclosed_csf(gm_prob, wm_prob, spacing_mm, MIN_VENTRICLE_ML)
    surface_csf = ((gm_prob + wm_prob) < LOW_TISSUE_PROBABILITY) & ~ventricles
    while True:  # a lesion too big for the room it is allowed is drawn again, smaller
        try:
            centre = _draw_centre(rng, gm_prob, wm_prob, surface_csf, spacing_mm, _reach_mm(volume_ml), forbidden)
            break
        except ValueError:
            if volume_ml <= VOLUME_RANGE_ML[0]:
                raise
            volume_ml = max(volume_ml / 2.0, VOLUME_RANGE_ML[0])
    wants_tail = bool(rng.uniform() < 0.1 + 0.45 * severity)
    target = _nearest_ventricle(ventricles, centre, spacing_mm) if wants_tail else None
    if target is not None and exclude_mask is not None and _tail_hits(exclude_mask, centre, target, spacing_mm):
        target = None  # no tail rather than one through a tumour
    return LesionParams(
        centre_vox=centre,
        volume_ml=volume_ml,
        severity=severity,
        blur_sigma_mm=around(0.8, 2.2),
        thickening_mm=around(0.8, 3.5),
        flair_gain=around(0.12, 0.6),
        wm_t1_shift=around(0.25, 0.8),
        wm_depth_mm=around(3.0, 7.0),
        elongation=elongation,
        irregularity=float(rng.uniform(0.3, 0.8)),
        transmantle=target is not None,
        transmantle_target_vox=target,
        shape_seed=int(rng.integers(0, 2**31 - 1)),
    )


def implant_fcd(
    t1w: np.ndarray,
    flair: np.ndarray,
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
    params: LesionParams,
    spacing_mm: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply one drawn lesion. Returns new (t1w, flair) as float32 and the lesion mask as uint8 (0/1).

    All arrays share one (X, Y, Z) grid of isotropic `spacing_mm` voxels; the inputs are not modified. Only a
    box around the lesion is computed, so the cost depends on the lesion's size, not the volume's.
    """
    t1w_out = np.array(t1w, dtype=np.float32)
    flair_out = np.array(flair, dtype=np.float32)
    lesion_mask = np.zeros(t1w.shape, dtype=np.uint8)
    shape_rng = np.random.default_rng(params.shape_seed)
    radius_mm = _equivalent_radius_mm(params.volume_ml)
    margin_mm = _reach_mm(params.volume_ml) + 2.0 * params.blur_sigma_mm + 2.0 * spacing_mm
    box = _box(t1w.shape, params, margin_mm / spacing_mm)
    gm = np.asarray(gm_prob[box], dtype=np.float32)
    wm = np.asarray(wm_prob[box], dtype=np.float32)
    offsets_mm = _offsets_mm(box, params.centre_vox, spacing_mm)

    target_voxels = params.volume_ml * 1000.0 / spacing_mm**3
    tail_mask, tail_position = _transmantle_tail(params, gm, wm, offsets_mm, radius_mm, spacing_mm)
    core_voxels = round(max(target_voxels - float(tail_mask.sum()), target_voxels / 2))
    core_mask, texture = _irregular_core(shape_rng, params, gm, wm, offsets_mm, radius_mm, spacing_mm, core_voxels)
    mask = core_mask | tail_mask

    # Soft weights (about one voxel of transition, none beyond two) so the lesion fades into normal tissue.
    core_weight = ndimage.gaussian_filter(core_mask.astype(np.float32), 0.7, truncate=3.0)
    tail_weight = ndimage.gaussian_filter(tail_mask.astype(np.float32), 0.7, truncate=3.0)
    tail_weight *= 1.0 - 0.5 * tail_position

    reference = (gm > 0.75) & (wm < 0.15) & ~mask, (wm > 0.85) & ~mask
    t1_gm, t1_wm = _tissue_medians(t1w, t1w_out[box], reference, gm_prob, wm_prob)
    flair_gm, flair_wm = _tissue_medians(flair, flair_out[box], reference, gm_prob, wm_prob)
    t1_contrast = t1_gm - t1_wm
    flair_contrast = flair_gm - flair_wm
    # FLAIR grey/white contrast is weak and partial-volume bound: the lesion's rise is a fraction of local WM.
    flair_unit = max(abs(flair_wm), abs(flair_contrast))

    # Cortical thickening: grey matter grows into the white matter below it (never into CSF).
    thickening_vox = params.thickening_mm / spacing_mm
    ball_radius = max(1, int(np.ceil(thickening_vox)))
    gm_grown = ndimage.grey_dilation(gm, footprint=_ball(ball_radius))
    gm_gain = np.minimum(np.clip(gm_grown - gm, 0.0, None), wm) * core_weight
    gm_gain *= min(1.0, thickening_vox / ball_radius)
    gm_after = gm + gm_gain
    wm_after = wm - gm_gain
    wm_fraction = wm_after / np.maximum(gm_after + wm_after, 1e-3)

    t1_crop = t1w_out[box] + gm_gain * t1_contrast
    flair_crop = flair_out[box] + gm_gain * flair_contrast
    # Blurred junction: juxtacortical WM loses T1w brightness and the junction is smoothed; the pial surface
    # (no WM) stays sharp. Noise removed by the blur is put back so texture does not betray the lesion.
    junction_weight = core_weight * np.clip(2.0 * wm_after, 0.0, 1.0)
    t1_crop += core_weight * wm_after * params.wm_t1_shift * t1_contrast
    t1_crop += tail_weight * 0.5 * params.wm_t1_shift * t1_contrast
    sigma_vox = params.blur_sigma_mm / spacing_mm
    t1_crop = _blur_keeping_noise(shape_rng, t1_crop, junction_weight, sigma_vox, reference[1])
    flair_crop = _blur_keeping_noise(shape_rng, flair_crop, junction_weight, sigma_vox, reference[1])
    # FLAIR: brightest in the subcortical WM (the FCD IIb funnel), milder in the cortex, patchy throughout.
    patchiness = np.clip(1.0 + 0.3 * texture, 0.4, 1.4)
    flair_crop += core_weight * (0.4 + 0.6 * wm_fraction) * patchiness * params.flair_gain * flair_unit
    flair_crop += tail_weight * 0.7 * params.flair_gain * flair_unit

    t1w_out[box] = t1_crop
    flair_out[box] = flair_crop
    lesion_mask[box] = mask
    return t1w_out, flair_out, lesion_mask


def tissue_probabilities(t1w: np.ndarray, brain: np.ndarray, template_gm: np.ndarray, template_wm: np.ndarray,
                         spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Grey and white matter probabilities of a real brain on the template grid, from its own T1w and the template.

    Each class's T1w intensity (median and robust SD) is read where the template, affinely aligned, says that class
    is nearly pure; a voxel's posterior is that Gaussian likelihood times the template's probability (smoothed by
    4 mm for registration error, floored at 0.05 so that the brain's own anatomy decides). A mixture fitted to the
    intensities alone merged or swapped classes in brains with a tumour, a contrast agent or unusual scaling
    (grey matter 3-17 % of the brain), and lesions implanted there missed the grey-white boundary.
    """
    sigma_vox = 4.0 / spacing_mm
    csf = np.clip(1.0 - template_gm - template_wm, 0.0, 1.0)
    priors = [np.maximum(ndimage.gaussian_filter(m.astype(np.float32), sigma_vox), 0.05)
              for m in (csf, template_gm, template_wm)]
    total = sum(priors)
    log_posterior = np.empty((3, int(brain.sum())), dtype=np.float64)
    values = t1w[brain].astype(np.float64)
    for k, prior in enumerate(priors):
        share = prior / total
        pure = brain & (share > 0.7)
        if pure.sum() < 50:
            pure = brain & (share >= np.percentile(share[brain], 90))
        centre = float(np.median(t1w[pure]))
        spread = max(_robust_sd(t1w[pure], centre), 1e-3 * max(float(np.ptp(values)), 1e-6))
        log_posterior[k] = -0.5 * ((values - centre) / spread) ** 2 - np.log(spread) + np.log(share[brain])
    log_posterior -= log_posterior.max(axis=0)
    posterior = np.exp(log_posterior)
    posterior /= posterior.sum(axis=0)
    gm, wm = np.zeros(t1w.shape, np.float32), np.zeros(t1w.shape, np.float32)
    gm[brain], wm[brain] = posterior[1], posterior[2]
    return gm, wm


def bright_lesion_region(flair: np.ndarray, brain: np.ndarray, spacing_mm: float) -> np.ndarray:
    """A real brain's own FLAIR-bright lesion (tumour, oedema, stroke gliosis, MS plaques), grown by 10 mm.

    FLAIR more than BRIGHT_LESION_MADS robust SDs (1.4826 x the median absolute deviation) above the brain's
    median; passed as `exclude_mask` so that implants stay away. The SD of the values below the 90th percentile,
    used before, spans grey matter, white matter and CSF at once: it found nothing in the training glioma brain
    sub-tcgadu7294 (a frontal tumour with oedema, 22 mL by this rule) nor in the unseen stroke and MS brains.
    """
    inside = flair[brain]
    median = float(np.median(inside))
    bright = brain & (flair > median + BRIGHT_LESION_MADS * _robust_sd(inside, median))
    bright = ndimage.binary_opening(bright, iterations=1)
    return ndimage.binary_dilation(bright, iterations=max(1, round(10.0 / spacing_mm)))


def _robust_sd(values: np.ndarray, centre: float) -> float:
    """The SD of a normal distribution with these values' median absolute deviation from `centre`: a spread that
    a minority of outliers (a lesion, another tissue) does not move."""
    return 1.4826 * float(np.median(np.abs(values - centre)))


def _equivalent_radius_mm(volume_ml: float) -> float:
    return float((3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


def _reach_mm(volume_ml: float) -> float:
    """How far from its centre the lesion core may extend (a hard bound): the core hugs the cortex, a zone
    that fills ~half of the space around the junction, so a sphere of twice the equivalent radius is ample."""
    return 2.0 * _equivalent_radius_mm(volume_ml) + 2.0


def _ball(radius_vox: int) -> np.ndarray:
    grid = np.mgrid[-radius_vox : radius_vox + 1, -radius_vox : radius_vox + 1, -radius_vox : radius_vox + 1]
    return (grid**2).sum(axis=0) <= radius_vox**2 + 0.5


def _crop_around(shape: tuple[int, ...], centre: tuple[int, int, int], half_vox: float) -> tuple[slice, ...]:
    half = int(np.ceil(half_vox))
    return tuple(slice(max(c - half, 0), min(c + half + 1, n)) for c, n in zip(centre, shape))


def _box(shape: tuple[int, ...], params: LesionParams, margin_vox: float) -> tuple[slice, ...]:
    """The voxels the lesion can touch: `margin_vox` around its centre, and its transmantle tail if any."""
    centre = np.array(params.centre_vox)
    low, high = centre - int(np.ceil(margin_vox)), centre + int(np.ceil(margin_vox)) + 1
    if params.transmantle and params.transmantle_target_vox is not None:
        target = np.array(params.transmantle_target_vox)
        low, high = np.minimum(low, target - 3), np.maximum(high, target + 4)
    return tuple(slice(max(int(lo), 0), min(int(hi), n)) for lo, hi, n in zip(low, high, shape))


def _offsets_mm(box: tuple[slice, ...], centre_vox: tuple[int, int, int], spacing_mm: float) -> np.ndarray:
    """(3, x, y, z) float32: each box voxel's offset from the lesion centre, in mm along the array axes."""
    axes = [(np.arange(s.start, s.stop, dtype=np.float32) - c) * spacing_mm for s, c in zip(box, centre_vox)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _irregular_core(
    rng: np.random.Generator,
    params: LesionParams,
    gm: np.ndarray,
    wm: np.ndarray,
    offsets_mm: np.ndarray,
    radius_mm: float,
    spacing_mm: float,
    n_voxels: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The lesion core: a noise-roughened ellipsoid cut to cortex and juxtacortical WM, of `n_voxels` voxels.

    The `n_voxels` best-scoring voxels of the cortex-and-juxtacortical zone are taken, so the volume is exact
    whatever the local folding, then only the connected piece holding the best voxel is kept. Returns the core
    mask and the smooth unit-variance noise that shaped it (reused for patchy signal inside).
    """
    rotated = np.tensordot(random_rotation(rng).T, offsets_mm, axes=1)
    scaled = rotated / np.asarray(params.elongation, dtype=np.float32)[:, None, None, None]
    distance = np.sqrt((scaled**2).sum(axis=0)) / radius_mm
    noise = ndimage.gaussian_filter(
        rng.standard_normal(gm.shape).astype(np.float32), max(1.0, 0.35 * radius_mm / spacing_mm)
    )
    noise /= max(float(noise.std()), 1e-6)
    score = -distance + params.irregularity * noise
    distance_to_cortex_mm = ndimage.distance_transform_edt(gm <= 0.5) * spacing_mm
    zone = (gm > 0.3) | ((wm > 0.3) & (distance_to_cortex_mm <= params.wm_depth_mm))
    zone &= (offsets_mm**2).sum(axis=0) <= _reach_mm(params.volume_ml) ** 2  # sampling kept this clear of exclusions
    zone_index = np.flatnonzero(zone)
    zone_score = score.ravel()[zone_index]
    core = np.zeros(gm.shape, dtype=bool)
    wanted = n_voxels
    for _ in range(4):  # grow the pick until the connected piece reaches the wanted volume
        if wanted >= zone_index.size:
            picked = zone_index
        else:
            picked = zone_index[np.argpartition(-zone_score, wanted)[:wanted]]
        core[:] = False
        core.flat[picked] = True
        labels, _ = ndimage.label(core)
        best = picked[np.argmax(score.ravel()[picked])]
        core = labels == labels.flat[best]
        shortfall = n_voxels - int(core.sum())
        if shortfall <= 0.02 * n_voxels or wanted >= zone_index.size:
            break
        wanted += shortfall
    return core, noise


def _transmantle_tail(
    params: LesionParams,
    gm: np.ndarray,
    wm: np.ndarray,
    offsets_mm: np.ndarray,
    radius_mm: float,
    spacing_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A funnel from the lesion centre to the ventricle wall, narrowing from ~0.4 lesion radii to ~1 voxel.

    Returns the tail mask and, per box voxel, its position along the tail (0 at the lesion, 1 at the ventricle).
    """
    position = np.zeros(gm.shape, dtype=np.float32)
    if not params.transmantle or params.transmantle_target_vox is None:
        return np.zeros(gm.shape, dtype=bool), position
    axis_mm = (np.asarray(params.transmantle_target_vox) - np.asarray(params.centre_vox)) * spacing_mm
    length_sq = max(float(axis_mm @ axis_mm), 1e-6)
    position = np.clip(np.tensordot(axis_mm, offsets_mm, axes=1) / length_sq, 0.0, 1.0).astype(np.float32)
    off_axis_mm = np.linalg.norm(offsets_mm - position[None] * axis_mm[:, None, None, None], axis=0)
    start_mm = float(np.clip(0.4 * radius_mm, 2.0, TAIL_START_MM))
    end_mm = TAIL_END_VOX * spacing_mm
    tail = (off_axis_mm <= start_mm + (end_mm - start_mm) * position) & (gm + wm > 0.5) & (position > 0)
    return tail, position


def _tissue_medians(
    image: np.ndarray,
    image_crop: np.ndarray,
    reference: tuple[np.ndarray, np.ndarray],
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
) -> tuple[float, float]:
    """Local (grey, white) matter intensities: medians of nearly pure voxels around the lesion.

    Falls back to the whole image when the box holds too few pure voxels (a lesion at the volume's edge).
    """
    gm_ref, wm_ref = reference
    if gm_ref.sum() >= 10 and wm_ref.sum() >= 10:
        return float(np.median(image_crop[gm_ref])), float(np.median(image_crop[wm_ref]))
    gm_all = (gm_prob > 0.75) & (wm_prob < 0.15)
    return float(np.median(image[gm_all])), float(np.median(image[wm_prob > 0.85]))


def _blur_keeping_noise(
    rng: np.random.Generator, image: np.ndarray, weight: np.ndarray, sigma_vox: float, pure_wm: np.ndarray
) -> np.ndarray:
    """Blend toward a blurred copy by `weight` (0..1), adding back the noise variance the blur removed."""
    blurred = ndimage.gaussian_filter(image, sigma_vox)
    noise_sd = float(np.std((image - blurred)[pure_wm])) if pure_wm.sum() >= 10 else 0.0
    # Blending keeps (1 - w)^2 of the noise variance; white noise of variance 1 - (1 - w)^2 restores it.
    restore_sd = noise_sd * np.sqrt(weight * (2.0 - weight))
    noise = rng.standard_normal(image.shape).astype(np.float32)
    return image + weight * (blurred - image) + restore_sd * noise


def _forbidden_for_core(exclude_mask: np.ndarray | None, territory_mask: np.ndarray | None) -> np.ndarray | None:
    """Voxels the lesion core may not touch: the excluded ones and those outside the territory."""
    forbidden = None if exclude_mask is None else exclude_mask.astype(bool)
    if territory_mask is not None:
        outside = ~territory_mask.astype(bool)
        forbidden = outside if forbidden is None else forbidden | outside
    return forbidden


def _draw_centre(
    rng: np.random.Generator,
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
    surface_csf: np.ndarray,
    spacing_mm: float,
    reach_mm: float,
    forbidden: np.ndarray | None,
) -> tuple[int, int, int]:
    """A random cortical grey/white junction voxel (`surface_csf`, the subarachnoid CSF, within
    `MAX_DISTANCE_TO_CSF_MM`) whose lesion would stay `reach_mm` clear of `forbidden`."""
    low, high = BOUNDARY_PROBABILITY
    boundary = (gm_prob >= low) & (gm_prob <= high) & (wm_prob >= low) & (wm_prob <= high)
    if not boundary.any():
        raise ValueError("no grey/white junction voxel: are gm_prob and wm_prob probabilities (0..1)?")
    candidates = np.flatnonzero(boundary if forbidden is None else boundary & ~forbidden)
    csf_radius = MAX_DISTANCE_TO_CSF_MM / spacing_mm
    for flat_index in rng.choice(candidates, size=min(MAX_CENTRE_DRAWS, candidates.size), replace=False):
        centre = tuple(int(i) for i in np.unravel_index(flat_index, gm_prob.shape))
        near = _crop_around(gm_prob.shape, centre, csf_radius)
        if not surface_csf[near].any():
            continue
        # The soft edge of the intensity change reaches two voxels beyond the mask.
        if forbidden is not None and _sphere_hits(forbidden, centre, reach_mm / spacing_mm + 2):
            continue
        return centre
    raise ValueError("no cortical grey/white junction voxel leaves room for a lesion inside territory_mask and "
                     "clear of exclude_mask")


def _sphere_hits(mask: np.ndarray, centre: tuple[int, int, int], radius_vox: float) -> bool:
    box = _crop_around(mask.shape, centre, radius_vox)
    axes = [np.arange(s.start, s.stop) - c for s, c in zip(box, centre)]
    distance_sq = sum(np.meshgrid(*[a.astype(np.float32) ** 2 for a in axes], indexing="ij", sparse=True))
    return bool((mask[box].astype(bool) & (distance_sq <= radius_vox**2)).any())


def _tail_hits(mask: np.ndarray, start: tuple[int, int, int], end: tuple[int, int, int], spacing_mm: float) -> bool:
    """Whether a transmantle tail (at most TAIL_START_MM wide, narrowing, plus its soft edge) would touch `mask`."""
    n_steps = int(np.ceil(np.linalg.norm(np.subtract(end, start)))) + 1  # a check per voxel along the way
    for position in np.linspace(0.0, 1.0, n_steps):
        point = tuple(int(i) for i in np.round(np.add(start, position * np.subtract(end, start))))
        radius_mm = TAIL_START_MM + (TAIL_END_VOX * spacing_mm - TAIL_START_MM) * position
        if _sphere_hits(mask, point, radius_mm / spacing_mm + 2):
            return True
    return False


def enclosed_csf(gm_prob: np.ndarray, wm_prob: np.ndarray, spacing_mm: float, min_ml: float) -> np.ndarray:
    """Ventricles: low-tissue components of at least `min_ml` that do not reach the array border (outside the
    head) through the sulci."""
    labels, _ = ndimage.label((gm_prob + wm_prob) < LOW_TISSUE_PROBABILITY)
    border = np.concatenate([np.take(labels, i, axis=a).ravel() for a in range(3) for i in (0, -1)])
    enclosed = np.bincount(labels.ravel()) * spacing_mm**3 >= min_ml * 1000.0
    enclosed[np.unique(border)] = False
    enclosed[0] = False
    return enclosed[labels]


def _nearest_ventricle(
    ventricles: np.ndarray, centre: tuple[int, int, int], spacing_mm: float
) -> tuple[int, int, int] | None:
    """The voxel of `ventricles` (`enclosed_csf`: CSF spaces enclosed by brain tissue, touching neither the array
    border nor, through the sulci, the subarachnoid space) nearest `centre`, or None if none is within
    MAX_TRANSMANTLE_LENGTH_MM."""
    reach_vox = MAX_TRANSMANTLE_LENGTH_MM / spacing_mm
    box = _crop_around(ventricles.shape, centre, reach_vox)
    ventricle = ventricles[box]
    if not ventricle.any():
        return None
    points = np.argwhere(ventricle) + [s.start for s in box]
    distance_sq = ((points - np.asarray(centre)) ** 2).sum(axis=1)
    nearest = int(np.argmin(distance_sq))
    if np.sqrt(distance_sq[nearest]) > reach_vox:
        return None
    return tuple(int(i) for i in points[nearest])
