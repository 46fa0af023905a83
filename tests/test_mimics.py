"""Non-FCD lesion mimics on the template's anatomy at 3 mm: where each kind lies and how it looks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_fcd.lesions import VOLUME_RANGE_ML
from bids_fcd.mimics import MIMIC_KINDS, implant_mimic
from bids_fcd.synth import template_tissue_maps
from bids_fcd.template import model_grid

SPACING_MM = 3.0


@pytest.fixture(scope="module")
def brain() -> dict[str, np.ndarray]:
    """Template grey/white matter on a coarse grid, rendered MPRAGE-like and FLAIR-like in scanner units."""
    gm, wm, mask = template_tissue_maps(model_grid(SPACING_MM, (56, 64, 56)))
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    rng = np.random.default_rng(0)
    t1w = 400.0 * (1.0 * wm + 0.6 * gm + 0.2 * csf) + 4.0 * rng.standard_normal(gm.shape)
    flair = 300.0 * (1.0 * wm + 1.25 * gm + 0.15 * csf) + 3.0 * rng.standard_normal(gm.shape)
    return {"gm": gm, "wm": wm, "t1w": t1w.astype(np.float32), "flair": flair.astype(np.float32)}


def _implant(brain: dict, kind: str, seed: int, avoid: np.ndarray | None = None):
    return implant_mimic(np.random.default_rng(seed), brain["t1w"], brain["flair"], brain["gm"], brain["wm"],
                         SPACING_MM, kind, avoid=avoid)


@pytest.mark.parametrize("kind", MIMIC_KINDS)
def test_changes_stay_at_the_mimic_and_inputs_are_untouched(brain, kind):
    before = brain["t1w"].copy(), brain["flair"].copy()
    t1w, flair, mask = _implant(brain, kind, seed=1)
    assert np.array_equal(before[0], brain["t1w"]) and np.array_equal(before[1], brain["flair"])
    assert mask.dtype == np.uint8 and mask.any()
    changed = (np.abs(t1w - brain["t1w"]) > 1.0) | (np.abs(flair - brain["flair"]) > 1.0)
    near = ndimage.binary_dilation(mask > 0, iterations=3)
    assert changed[mask > 0].mean() > 0.5
    assert not (changed & ~near).any()


@pytest.mark.parametrize("seed", range(3))
def test_plaques_are_small_flair_bright_t1_dark_white_matter_lesions(brain, seed):
    t1w, flair, mask = _implant(brain, "plaques", seed)
    inside = mask > 0
    assert brain["wm"][inside].mean() > 0.5
    assert ndimage.label(inside)[1] >= 2  # several separate plaques
    assert (flair - brain["flair"])[inside].mean() > 0 > (t1w - brain["t1w"])[inside].mean()


def test_plaques_range_from_t1_isointense_to_t1_dark(brain):
    # Most MS plaques are T1-isointense; a model that saw only dark ones called bright white matter with a normal
    # T1w FCD. Each plaque's mean T1w drop, as a fraction of the white matter-CSF range (400 * 0.8 here):
    drops = []
    for seed in range(4):
        t1w, _, mask = _implant(brain, "plaques", seed)
        labels, n = ndimage.label(mask > 0)
        drops += [float((brain["t1w"] - t1w)[labels == i].mean()) / 320.0 for i in range(1, n + 1)]
    assert len(drops) >= 10
    assert min(drops) < 0.04 and max(drops) > 0.15
    assert min(drops) > -0.02  # never T1-bright


@pytest.mark.parametrize("seed", range(3))
def test_an_infarct_reaches_the_cortex_with_a_dark_cavity_inside_a_bright_rim(brain, seed):
    t1w, flair, mask = _implant(brain, "infarct", seed)
    inside = mask > 0
    flair_change = (flair - brain["flair"])[inside]
    assert (brain["gm"][inside] > 0.5).any()
    assert flair_change.min() < -0.2 * 300 and flair_change.max() > 0.2 * 300  # cavity and gliosis
    assert (t1w - brain["t1w"])[inside].mean() < 0


@pytest.mark.parametrize("seed", range(3))
def test_a_tumour_is_a_mass_larger_than_any_simulated_fcd(brain, seed):
    t1w, flair, mask = _implant(brain, "tumour", seed)
    inside = mask > 0
    assert inside.sum() * SPACING_MM**3 / 1000.0 > VOLUME_RANGE_ML[1]
    assert (flair - brain["flair"])[inside].mean() > 0 > (t1w - brain["t1w"])[inside].mean()


@pytest.mark.parametrize("kind", MIMIC_KINDS)
def test_a_mimic_keeps_clear_of_the_avoided_voxels(brain, kind):
    avoid = np.zeros(brain["gm"].shape, bool)
    avoid[:, :32] = True  # the whole back half of the head
    for seed in range(3):
        _, _, mask = _implant(brain, kind, seed, avoid=avoid)
        assert mask.any() and not (mask.astype(bool) & avoid).any()


def test_the_same_seed_gives_the_same_mimic_and_unknown_kinds_are_refused(brain):
    first, second = _implant(brain, "infarct", 7), _implant(brain, "infarct", 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="unknown mimic kind"):
        _implant(brain, "haemorrhage", 0)
