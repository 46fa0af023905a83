"""Simulated FCD type II on a small folded-brain phantom: size, place, and the imaging signs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from bids_fcd.lesions import VOLUME_RANGE_ML, LesionParams, implant_fcd, sample_lesion_params

SHAPE = (40, 48, 36)
SPACING_MM = 1.5


@pytest.fixture(scope="module")
def phantom() -> dict[str, np.ndarray]:
    """A ~35 mL brain: folded 3 mm cortex over white matter around an enclosed 2 mL ventricle, with
    MPRAGE-like T1w (WM > GM > CSF) and FLAIR (GM > WM > CSF) in arbitrary scanner units plus 1 % noise."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"))
    offset_mm = (index - (np.array(SHAPE, dtype=np.float32)[:, None, None, None] - 1) / 2) * SPACING_MM
    radius = np.sqrt((offset_mm**2).sum(axis=0))
    polar = np.arccos(np.clip(offset_mm[2] / np.maximum(radius, 1e-3), -1, 1))
    azimuth = np.arctan2(offset_mm[1], offset_mm[0])
    wm_radius = 16.0 + 3.0 * np.sin(5 * polar) * np.sin(4 * azimuth)  # gyri and sulci

    def inside(edge_mm: np.ndarray | float) -> np.ndarray:
        return np.clip((edge_mm - radius) / SPACING_MM + 0.5, 0.0, 1.0)

    ventricle = inside(8.0)
    wm = np.clip(inside(wm_radius) - ventricle, 0.0, 1.0)
    gm = np.clip(inside(wm_radius + 3.0) - inside(wm_radius), 0.0, 1.0)
    csf = 1.0 - gm - wm
    rng = np.random.default_rng(0)
    t1w = 400.0 * (1.0 * wm + 0.6 * gm + 0.2 * csf) + 4.0 * rng.standard_normal(SHAPE)
    flair = 300.0 * (1.0 * wm + 1.25 * gm + 0.15 * csf) + 3.0 * rng.standard_normal(SHAPE)
    return {"gm": gm, "wm": wm, "t1w": t1w.astype(np.float32), "flair": flair.astype(np.float32)}


def _draw(phantom: dict, seed: int, **kwargs) -> LesionParams:
    return sample_lesion_params(np.random.default_rng(seed), phantom["gm"], phantom["wm"], SPACING_MM, **kwargs)


def _implant(phantom: dict, params: LesionParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return implant_fcd(phantom["t1w"], phantom["flair"], phantom["gm"], phantom["wm"], params, SPACING_MM)


@pytest.mark.parametrize("seed", range(6))
def test_lesion_volume_is_within_range_and_matches_the_draw(phantom, seed):
    params = _draw(phantom, seed)
    _, _, mask = _implant(phantom, params)
    volume_ml = mask.sum() * SPACING_MM**3 / 1000.0
    assert VOLUME_RANGE_ML[0] <= params.volume_ml <= VOLUME_RANGE_ML[1]
    assert 0.5 <= volume_ml <= 8.0
    assert volume_ml == pytest.approx(params.volume_ml, rel=0.1)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert ndimage.label(mask)[1] <= 2  # one irregular piece (and at most a detached bit of tail)


@pytest.mark.parametrize("seed", range(4))
def test_lesion_sits_at_the_grey_white_boundary(phantom, seed):
    params = _draw(phantom, seed)
    _, _, mask = _implant(phantom, params)
    gm_centre, wm_centre = phantom["gm"][params.centre_vox], phantom["wm"][params.centre_vox]
    assert 0.3 <= gm_centre <= 0.7 and 0.3 <= wm_centre <= 0.7
    inside = mask.astype(bool)
    # Both cortex and the white matter beneath it, and hardly any CSF.
    assert (phantom["gm"][inside] > 0.5).mean() > 0.2
    assert (phantom["wm"][inside] > 0.5).mean() > 0.2
    assert (phantom["gm"] + phantom["wm"])[inside].mean() > 0.85


@pytest.mark.parametrize("severity", [0.0, 0.5, 1.0])
def test_flair_is_brighter_inside_the_lesion_than_the_same_tissue_outside(phantom, severity):
    params = _draw(phantom, 1, severity=severity)
    _, flair, mask = _implant(phantom, params)
    inside = mask.astype(bool)
    for tissue in ("gm", "wm"):
        pure = phantom[tissue] > 0.8
        assert flair[inside & pure].mean() > flair[~inside & pure].mean() * 1.03


@pytest.mark.parametrize("severity", [0.0, 0.5, 1.0])
def test_t1w_grey_white_contrast_is_reduced_at_the_lesion(phantom, severity):
    params = _draw(phantom, 2, severity=severity)
    t1w, _, mask = _implant(phantom, params)
    inside = mask.astype(bool)
    grey, white = inside & (phantom["gm"] > 0.8), inside & (phantom["wm"] > 0.8)

    def contrast(image: np.ndarray) -> float:
        return float(image[white].mean() - image[grey].mean())

    assert contrast(t1w) < 0.9 * contrast(phantom["t1w"])


def test_stronger_severity_gives_a_more_conspicuous_lesion(phantom):
    rises = []
    for severity in (0.0, 1.0):
        params = replace(_draw(phantom, 3, severity=severity), shape_seed=5, volume_ml=2.0)
        _, flair, mask = _implant(phantom, params)
        inside = mask.astype(bool)
        rises.append(float((flair - phantom["flair"])[inside].mean()))
    assert rises[1] > 2 * rises[0] > 0


def test_cortical_thickening_alone_turns_the_white_matter_under_the_cortex_grey(phantom):
    """With every other sign switched off, thickening darkens T1w (towards cortex) only in white matter within
    its reach of the cortex, and more the thicker it is."""
    base = replace(_draw(phantom, 3, severity=0.5), shape_seed=5, volume_ml=3.0, blur_sigma_mm=0.0,
                   flair_gain=0.0, wm_t1_shift=0.0, transmantle=False, transmantle_target_vox=None)
    near_cortex = (phantom["wm"] > 0.5) & ndimage.binary_dilation(phantom["gm"] > 0.5, iterations=1)
    drops = []
    for thickening_mm in (0.0, 1.5, 3.0):
        t1w, _, mask = _implant(phantom, replace(base, thickening_mm=thickening_mm))
        drops.append(float((phantom["t1w"] - t1w)[mask.astype(bool) & near_cortex].mean()))
    assert abs(drops[0]) < 2.0 and 0 < drops[1] < drops[2]  # T1w units: WM 400, GM 240
    assert drops[2] > 20.0


def test_changes_follow_the_intensity_units(phantom):
    """Raw scanner units or rescaled: the lesion is the same fraction of the local tissue intensities."""
    params = _draw(phantom, 4, severity=0.7)
    t1w, flair, mask = _implant(phantom, params)
    t1w_scaled, flair_scaled, mask_scaled = implant_fcd(
        phantom["t1w"] / 400.0, phantom["flair"] / 300.0, phantom["gm"], phantom["wm"], params, SPACING_MM
    )
    np.testing.assert_array_equal(mask, mask_scaled)
    np.testing.assert_allclose(t1w_scaled * 400.0, t1w, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(flair_scaled * 300.0, flair, rtol=1e-4, atol=1e-2)


def test_implant_is_deterministic_and_leaves_its_inputs_alone(phantom):
    params = _draw(phantom, 5)
    before = phantom["t1w"].copy(), phantom["flair"].copy()
    first, second = _implant(phantom, params), _implant(phantom, params)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(phantom["t1w"], before[0])
    np.testing.assert_array_equal(phantom["flair"], before[1])
    assert first[0].dtype == first[1].dtype == np.float32
    outside = ndimage.binary_dilation(first[2], iterations=6) == 0
    np.testing.assert_array_equal(first[1][outside], phantom["flair"][outside])


def test_sampling_is_seeded_and_params_are_json_safe(phantom):
    assert _draw(phantom, 6) == _draw(phantom, 6)
    assert _draw(phantom, 6) != _draw(phantom, 7)
    assert json.loads(json.dumps(_draw(phantom, 6).to_dict()))["centre_vox"]


def test_exclude_mask_keeps_lesions_away(phantom):
    exclude = np.zeros(SHAPE, dtype=bool)
    exclude[: SHAPE[0] // 2] = True  # e.g. a tumour filling one side
    for seed in range(4):
        params = _draw(phantom, seed, exclude_mask=exclude)
        _, _, mask = _implant(phantom, params)
        assert not (mask.astype(bool) & exclude).any()


def test_territory_mask_holds_the_lesion_core(phantom):
    territory = np.zeros(SHAPE, dtype=bool)
    territory[SHAPE[0] // 2 :] = True
    for seed in range(6):
        params = _draw(phantom, seed, territory_mask=territory)
        assert territory[params.centre_vox]
        _, _, core = _implant(phantom, replace(params, transmantle=False, transmantle_target_vox=None))
        assert territory[core.astype(bool)].all()


def test_exclude_mask_covering_everything_is_an_error(phantom):
    with pytest.raises(ValueError, match="exclude_mask"):
        _draw(phantom, 0, exclude_mask=np.ones(SHAPE, dtype=bool))


def _brain_with_a_grey_lined_ventricle(with_cortex: bool) -> tuple[np.ndarray, np.ndarray]:
    """(gm, wm) of a 30 mm white-matter sphere around an 8 mm ventricle lined by 2 mm of grey matter (a caudate-like
    rim, >= 20 mm from the surface), with or without a 3 mm cortex outside."""
    shape = (56, 56, 56)
    radius = np.sqrt(sum((np.indices(shape)[a] - (shape[a] - 1) / 2) ** 2 for a in range(3))) * SPACING_MM

    def inside(edge_mm: float) -> np.ndarray:
        return np.clip((edge_mm - radius) / SPACING_MM + 0.5, 0.0, 1.0)

    rim = inside(10.0) - inside(8.0)
    cortex = inside(33.0) - inside(30.0) if with_cortex else 0.0
    return rim + cortex, inside(30.0) - inside(10.0)


def test_a_junction_with_only_a_ventricle_nearby_is_not_cortex():
    gm, wm = _brain_with_a_grey_lined_ventricle(with_cortex=False)
    with pytest.raises(ValueError, match="cortical"):  # ventricular CSF does not make the rim cortex
        sample_lesion_params(np.random.default_rng(0), gm, wm, SPACING_MM)
    gm, wm = _brain_with_a_grey_lined_ventricle(with_cortex=True)
    centres = [sample_lesion_params(np.random.default_rng(seed), gm, wm, SPACING_MM).centre_vox for seed in range(20)]
    depth_mm = [np.linalg.norm((np.array(c) - 27.5) * SPACING_MM) for c in centres]
    assert min(depth_mm) > 25.0  # every centre at the cortex's junction, none at the rim's


def test_transmantle_tail_runs_from_the_cortex_to_the_ventricle(phantom):
    drawn = next(p for seed in range(50) if (p := _draw(phantom, seed, severity=1.0)).transmantle)
    params = replace(drawn, volume_ml=0.6, wm_depth_mm=3.0)  # a small core, so the tail alone nears the ventricle
    assert (phantom["gm"] + phantom["wm"])[params.transmantle_target_vox] < 0.3
    target = np.zeros(SHAPE, dtype=bool)
    target[params.transmantle_target_vox] = True
    near_ventricle = ndimage.binary_dilation(target, iterations=2)
    _, flair, mask = _implant(phantom, params)
    tail_end = mask.astype(bool) & near_ventricle
    assert tail_end.any()
    assert flair[tail_end].mean() > phantom["flair"][tail_end].mean()
    without_tail = replace(params, transmantle=False, transmantle_target_vox=None)
    assert (_implant(phantom, without_tail)[2].astype(bool) & near_ventricle).sum() < tail_end.sum()


def _layered_brain(rng: np.random.Generator):
    """Concentric layers CSF / GM / WM (outside in) with T1w-like intensities and the true class maps."""
    shape = (40, 44, 36)
    radius = np.sqrt(sum(((np.indices(shape)[a] - (shape[a] - 1) / 2) / (shape[a] / 2)) ** 2 for a in range(3)))
    brain = radius < 0.95
    classes = np.where(radius < 0.55, 2, np.where(radius < 0.8, 1, 0))  # 2 WM, 1 GM, 0 CSF
    t1w = np.choose(classes, [0.1, 0.5, 0.9]) + rng.normal(0, 0.04, shape)
    return t1w.astype(np.float32), brain, classes


def test_tissue_probabilities_follow_t1w_intensity_classes():
    from bids_fcd.lesions import tissue_probabilities

    t1w, brain, classes = _layered_brain(np.random.default_rng(0))
    gm, wm = tissue_probabilities(t1w, brain, (classes == 1).astype(np.float32), (classes == 2).astype(np.float32),
                                  spacing_mm=1.5)
    inside = brain
    assert gm[inside & (classes == 1)].mean() > 0.9 and wm[inside & (classes == 2)].mean() > 0.9
    assert gm[inside & (classes == 2)].mean() < 0.1 and wm[inside & (classes == 0)].mean() < 0.1


def test_tissue_probabilities_hold_with_a_large_abnormal_region():
    # A contrast-enhanced mass brighter than white matter over a sixth of the brain: a mixture fitted to intensities
    # alone spends its brightest class on it and calls the white matter grey (recall 0.006); the template prior keeps the
    # classes where they are (here the template is shifted by 2 voxels, as an affine registration may leave it).
    from bids_fcd.lesions import tissue_probabilities

    t1w, brain, classes = _layered_brain(np.random.default_rng(1))
    mass = brain & (np.indices(t1w.shape)[0] < 25) & (classes == 2)
    t1w[mass] = 1.4 + np.random.default_rng(2).normal(0, 0.1, int(mass.sum()))
    shifted = np.roll(classes, 2, axis=1)
    gm, wm = tissue_probabilities(t1w, brain, (shifted == 1).astype(np.float32), (shifted == 2).astype(np.float32),
                                  spacing_mm=1.5)
    true_gm = brain & (classes == 1)
    assert (gm[true_gm] > 0.5).mean() > 0.9
    assert (wm[brain & (classes == 2) & ~mass] > 0.5).mean() > 0.9
    assert abs((gm[brain] > 0.5).mean() - true_gm.sum() / brain.sum()) < 0.05


def test_bright_lesion_region_covers_a_flair_bright_lesion_with_a_margin():
    from bids_fcd.lesions import bright_lesion_region

    rng = np.random.default_rng(1)
    flair = rng.normal(1.0, 0.05, size=(40, 40, 40)).astype(np.float32)
    flair[18:23, 18:23, 18:23] = 2.5
    brain = np.ones(flair.shape, dtype=bool)
    region = bright_lesion_region(flair, brain, spacing_mm=2.0)
    assert region[18:23, 18:23, 18:23].all()
    assert region[20, 20, 14] and not region[20, 20, 5]  # grown by about 10 mm (5 voxels), no further
    assert region.sum() < 0.2 * region.size


def test_bright_lesion_region_finds_a_moderately_bright_lesion_among_mixed_tissues():
    """Like sub-tcgadu7294 after normalisation: tumour FLAIR (1.25) below median + 4 SD of the brain's tissues
    together (CSF, white and grey matter), but well above grey and white matter themselves."""
    from bids_fcd.lesions import bright_lesion_region

    rng = np.random.default_rng(2)
    tissue = rng.choice([0.15, 0.6, 0.8], p=[0.15, 0.4, 0.45], size=(48, 48, 48))
    flair = (tissue + rng.normal(0.0, 0.04, size=tissue.shape)).astype(np.float32)
    flair[20:27, 20:27, 20:27] = 1.25 + rng.normal(0.0, 0.04, size=(7, 7, 7))
    brain = np.ones(flair.shape, dtype=bool)
    region = bright_lesion_region(flair, brain, spacing_mm=2.0)
    assert region[21:26, 21:26, 21:26].all()
    flair[20:27, 20:27, 20:27] = 0.8  # the same brain without its lesion: grey matter is not a lesion
    assert bright_lesion_region(flair, brain, spacing_mm=2.0).mean() < 0.02
