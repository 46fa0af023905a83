"""Non-FCD lesions simulated on image arrays: what the detector must learn *not* to call FCD.

The shipped model's worst false positives were real lesions of other kinds (measured on unseen real brains: the
gliotic rim of a chronic stroke, juxtacortical MS plaques, the oedema around gliomas), all bright on FLAIR like
FCD. Training on these mimics, labelled control, teaches the network what separates them from FCD type II:
sharp-edged ovoid plaques in the white matter, a CSF-filled cavity inside a gliotic rim, a mass with oedema
spreading through the white matter, against FCD's thickened, blurred cortex with a subcortical funnel.

Three kinds, one call each (`implant_mimic`):
- ``plaques``: MS-like ovoid white-matter lesions, periventricular, deep and juxtacortical; FLAIR-bright,
  sharp-edged, from T1-isointense (most plaques) to T1-dark ("black holes", a minority) (Filippi et al. 2016,
  Lancet Neurol 15:292).
- ``infarct``: a chronic territorial infarct reaching the cortex: a core turned to CSF (dark on T1w and FLAIR,
  encephalomalacia) inside a rim of gliosis (FLAIR-bright, T1-dark).
- ``tumour``: a glioma-like mass: FLAIR-bright oedema spreading through the white matter around a T1-dark
  core, sometimes with a ring that is bright on contrast-enhanced T1w.

Like `bids_fcd.lesions`, every change is a fraction of the image's own tissue intensities, so it works on raw
scanner units and after normalisation alike, on any isotropic grid. Arrays are (X, Y, Z); inputs are not
modified.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bids_fcd.lesions import enclosed_csf, random_rotation
from bids_fcd.preprocess import normalise_intensity

MIMIC_KINDS = ("plaques", "infarct", "tumour")
MIMIC_CLEARANCE_MM = 10.0  # a mimic stays this far from an FCD lesion, so no voxel is both
PLAQUE_RADIUS_MM = (1.5, 5.0)
PLAQUES_PER_BRAIN = (3, 15)
PLAQUE_T1_DROP = (0.0, 0.45)  # fraction of the white matter-CSF T1w range: isointense .. black hole
INFARCT_RADIUS_MM = (8.0, 22.0)
TUMOUR_OEDEMA_RADIUS_MM = (12.0, 30.0)
OEDEMA_EDGE_MM = 2.0  # oedema fades out over about this distance (Gaussian sigma)
# Positions of plaques: a white-matter voxel this close to the cortex is juxtacortical, this close to the
# ventricles' CSF periventricular.
JUXTACORTICAL_MM = 3.0
PERIVENTRICULAR_MM = 6.0


def implant_mimic(
    rng: np.random.Generator,
    t1w: np.ndarray,
    flair: np.ndarray,
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
    spacing_mm: float,
    kind: str,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Implant one non-FCD lesion of `kind` (see MIMIC_KINDS). Returns new (t1w, flair) float32 and its mask (uint8).

    `avoid` (bool, optional): voxels the mimic must stay clear of, e.g. an FCD lesion grown by a margin, so that
    a voxel is never both. The mask is for checks and figures; its voxels are not FCD, so a training target
    keeps them at 0.
    """
    if kind not in MIMIC_KINDS:
        raise ValueError(f"unknown mimic kind {kind!r}; expected one of {MIMIC_KINDS}")
    levels = _Levels(np.asarray(t1w), np.asarray(flair), np.asarray(gm_prob), np.asarray(wm_prob))
    free = np.ones(t1w.shape, dtype=bool) if avoid is None else ~avoid.astype(bool)
    implant = {"plaques": _plaques, "infarct": _infarct, "tumour": _tumour}[kind]
    t1_change, flair_change, mask = implant(rng, gm_prob, wm_prob, spacing_mm, levels, free)
    return ((np.asarray(t1w, dtype=np.float32) + t1_change).astype(np.float32),
            (np.asarray(flair, dtype=np.float32) + flair_change).astype(np.float32), mask.astype(np.uint8))


def mimic_copy(
    rng: np.random.Generator,
    t1w: np.ndarray,
    flair: np.ndarray,
    brain: np.ndarray,
    lesion: np.ndarray | None,
    gm_prob: np.ndarray,
    wm_prob: np.ndarray,
    spacing_mm: float,
    kind: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (t1w, flair) of a preprocessed brain with one non-FCD lesion of `kind` inside `brain` and
    MIMIC_CLEARANCE_MM clear of its FCD `lesion` (None: no lesion), renormalised as the pipeline would (a large
    FLAIR-bright mimic moves the brain's intensity percentiles). The lesion target is unchanged: mimic voxels are
    not FCD."""
    brain = brain.astype(bool)
    avoid = ~brain
    if lesion is not None:
        avoid |= ndimage.binary_dilation(lesion > 0, iterations=round(MIMIC_CLEARANCE_MM / spacing_mm))
    t1w, flair, _ = implant_mimic(rng, t1w, flair, gm_prob, wm_prob, spacing_mm, kind, avoid=avoid)
    return normalise_intensity(t1w, brain), normalise_intensity(flair, brain)


class _Levels:
    """Median T1w and FLAIR intensities of nearly pure grey matter, white matter and CSF inside the brain."""

    def __init__(self, t1w: np.ndarray, flair: np.ndarray, gm: np.ndarray, wm: np.ndarray):
        pure_gm, pure_wm = (gm > 0.75) & (wm < 0.15), wm > 0.85
        tissue = gm + wm
        csf = (tissue < 0.2) & ndimage.binary_erosion(tissue > 0.05, iterations=2)  # inside the head
        if csf.sum() < 50:
            csf = tissue < np.percentile(tissue[tissue > 0], 2)
        self.t1 = {name: float(np.median(t1w[m])) for name, m in (("gm", pure_gm), ("wm", pure_wm), ("csf", csf))}
        self.flair = {name: float(np.median(flair[m])) for name, m in (("gm", pure_gm), ("wm", pure_wm),
                                                                      ("csf", csf))}
        # FLAIR's grey/white contrast is weak: a lesion's rise is a fraction of white matter (as in lesions.py).
        self.flair_unit = max(abs(self.flair["wm"]), abs(self.flair["gm"] - self.flair["wm"]))
        self.t1_range = self.t1["wm"] - self.t1["csf"]


def _plaques(rng, gm, wm, spacing_mm, levels: _Levels, free):
    """Several ovoid plaques, each sharp-edged and FLAIR-bright, T1-isointense to T1-dark, anywhere in the white
    matter: a model that saw only T1-dark plaques learnt "FLAIR-bright white matter with normal T1w is FCD"."""
    white = (wm > 0.6) & free
    cortex_distance_mm = ndimage.distance_transform_edt(gm < 0.5) * spacing_mm
    ventricle_distance_mm = ndimage.distance_transform_edt(~enclosed_csf(gm, wm, spacing_mm, 0.0)) * spacing_mm
    places = {
        "juxtacortical": white & (cortex_distance_mm <= JUXTACORTICAL_MM),
        "periventricular": white & (ventricle_distance_mm <= PERIVENTRICULAR_MM),
        "deep": white & (cortex_distance_mm > JUXTACORTICAL_MM) & (ventricle_distance_mm > PERIVENTRICULAR_MM),
    }
    places = {name: np.argwhere(where) for name, where in places.items() if where.any()}
    t1_change = np.zeros(gm.shape, np.float32)
    flair_change = np.zeros(gm.shape, np.float32)
    mask = np.zeros(gm.shape, bool)
    for _ in range(int(rng.integers(PLAQUES_PER_BRAIN[0], PLAQUES_PER_BRAIN[1] + 1))):
        voxels = places[list(places)[int(rng.integers(len(places)))]]
        box, distance = _random_ellipsoid(rng, voxels, PLAQUE_RADIUS_MM, 0.5, gm.shape, spacing_mm)
        plaque = (distance <= 1.0) & (gm[box] + wm[box] > 0.5) & free[box]
        weight = ndimage.gaussian_filter(plaque.astype(np.float32), 0.5)  # sharp edge: half a voxel
        t1_change[box] -= weight * rng.uniform(*PLAQUE_T1_DROP) * levels.t1_range
        flair_change[box] += weight * rng.uniform(0.4, 1.2) * levels.flair_unit
        mask[box] |= plaque
    return t1_change, flair_change, mask


def _infarct(rng, gm, wm, spacing_mm, levels: _Levels, free):
    """A cortical-subcortical cavity of CSF (dark on both) inside a gliotic rim (FLAIR-bright, T1-dark)."""
    box, distance = _random_ellipsoid(rng, np.argwhere((gm > 0.5) & free), INFARCT_RADIUS_MM, 0.5, gm.shape,
                                      spacing_mm, roughness=0.25)
    tissue = (gm[box] + wm[box]) > 0.3
    rim_mm = rng.uniform(2.0, 5.0)
    core = (distance <= 1.0) & tissue & free[box]
    grown = ndimage.binary_dilation(core, iterations=max(1, round(rim_mm / spacing_mm))) & tissue & free[box]
    rim = grown & ~core
    core_weight = ndimage.gaussian_filter(core.astype(np.float32), 0.7) * rng.uniform(0.6, 1.0)
    rim_weight = ndimage.gaussian_filter(rim.astype(np.float32), 0.7)
    t1_here = gm[box] * levels.t1["gm"] + wm[box] * levels.t1["wm"]
    flair_here = gm[box] * levels.flair["gm"] + wm[box] * levels.flair["wm"]
    t1_change = np.zeros(gm.shape, np.float32)
    flair_change = np.zeros(gm.shape, np.float32)
    t1_change[box] = core_weight * (levels.t1["csf"] - t1_here) - rim_weight * rng.uniform(0.1, 0.3) * levels.t1_range
    flair_change[box] = (core_weight * (levels.flair["csf"] - flair_here)
                         + rim_weight * rng.uniform(0.4, 1.2) * levels.flair_unit)
    mask = np.zeros(gm.shape, bool)
    mask[box] = grown
    return t1_change, flair_change, mask


def _tumour(rng, gm, wm, spacing_mm, levels: _Levels, free):
    """A mass: FLAIR-bright, T1-dark oedema through the white matter around a dark core, sometimes ring-enhancing."""
    box, distance = _random_ellipsoid(rng, np.argwhere((wm > 0.8) & free), TUMOUR_OEDEMA_RADIUS_MM, 0.6, gm.shape,
                                      spacing_mm, roughness=0.3)
    inside = (gm[box] + wm[box] > 0.3) & free[box]
    oedema = (distance <= 1.0) & inside
    # Oedema spreads along the white matter and spares most of the cortex.
    oedema_weight = ndimage.gaussian_filter(oedema.astype(np.float32), max(0.5, OEDEMA_EDGE_MM / spacing_mm))
    oedema_weight *= np.clip(wm[box] + 0.3 * gm[box], 0, 1)
    core_fraction = rng.uniform(0.25, 0.6)
    core = (distance <= core_fraction) & inside
    core_weight = ndimage.gaussian_filter(core.astype(np.float32), 0.7)
    t1_change = np.zeros(gm.shape, np.float32)
    flair_change = np.zeros(gm.shape, np.float32)
    t1_change[box] = -(oedema_weight * rng.uniform(0.1, 0.3) + core_weight * rng.uniform(0.2, 0.6)) * levels.t1_range
    flair_change[box] = (oedema_weight * rng.uniform(0.6, 1.5) - core_weight * rng.uniform(0.0, 0.8)) * levels.flair_unit
    if rng.random() < 0.5:  # contrast-enhanced T1w: a bright ring at the core's edge
        ring = ndimage.binary_dilation(core, iterations=max(1, round(rng.uniform(1.5, 4.0) / spacing_mm))) & ~core
        t1_change[box] += ndimage.gaussian_filter(ring.astype(np.float32), 0.5) * rng.uniform(0.4, 1.0) * levels.t1_range
    mask = np.zeros(gm.shape, bool)
    mask[box] = oedema
    return t1_change, flair_change, mask


def _random_ellipsoid(rng, voxels: np.ndarray, radius_range_mm: tuple[float, float], min_aspect: float, shape,
                      spacing_mm: float, roughness: float = 0.0):
    """An ellipsoid centred on one of `voxels` (N, 3), its longest radius drawn in `radius_range_mm` and the other
    two at `min_aspect`..1 of it: `_ellipsoid_distance` of it."""
    centre = voxels[rng.integers(len(voxels))]
    radii_mm = rng.uniform(*radius_range_mm) * np.array([1.0, *rng.uniform(min_aspect, 1.0, size=2)])
    return _ellipsoid_distance(rng, shape, centre, radii_mm, spacing_mm, roughness)


def _ellipsoid_distance(rng, shape, centre, radii_mm, spacing_mm, roughness: float = 0.0):
    """A box around `centre` and each voxel's normalised distance in a randomly rotated ellipsoid (1 = surface),
    optionally roughened by smooth noise so that edges are irregular."""
    reach_vox = int(np.ceil(max(radii_mm) * (1.0 + roughness) / spacing_mm)) + 3
    box = tuple(slice(max(int(c) - reach_vox, 0), min(int(c) + reach_vox + 1, n)) for c, n in zip(centre, shape))
    axes = [(np.arange(s.start, s.stop, dtype=np.float32) - c) * spacing_mm for s, c in zip(box, centre)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"))
    rotated = np.tensordot(random_rotation(rng).T, offsets, axes=1)
    distance = np.sqrt(((rotated / np.asarray(radii_mm, np.float32)[:, None, None, None]) ** 2).sum(axis=0))
    if roughness > 0:
        noise = ndimage.gaussian_filter(rng.standard_normal(distance.shape).astype(np.float32),
                                        max(1.0, 0.3 * min(radii_mm) / spacing_mm))
        distance *= 1.0 + roughness * noise / max(float(noise.std()), 1e-6)
    return box, distance
