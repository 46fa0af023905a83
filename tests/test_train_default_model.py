"""The shipped model's training tool (tools/train_default_model.py): the steps that shape its data."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bids_fcd.config import ModelConfig
from bids_fcd.preprocess import HISTOGRAM_PERCENTILES

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_default_model.py"
_spec = importlib.util.spec_from_file_location("train_default_model", TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_flair_level_moves_the_brain_median_into_the_real_range_and_keeps_lesion_contrast():
    rng = np.random.default_rng(0)
    brain = np.zeros((20, 20, 20), bool)
    brain[3:17, 3:17, 3:17] = True
    lesion = np.zeros(brain.shape, np.uint8)
    lesion[8:11, 8:11, 8:11] = 1
    t1w = np.where(brain, 0.7, 0.0).astype(np.float32)
    flair = np.where(brain, 0.8 + 0.02 * rng.standard_normal(brain.shape), 0.0).astype(np.float32)
    flair[lesion > 0] *= 1.3
    volume = tool.Volume(np.stack([t1w, flair]), brain, lesion, 1, "synthetic")
    medians = []
    for seed in range(20):
        scaled = tool.with_flair_level(volume, np.random.default_rng(seed))
        medians.append(float(np.median(scaled.image[1][brain])))
        assert np.array_equal(scaled.image[0], t1w) and scaled.label == 1 and scaled.lesion is lesion
        ratio = scaled.image[1][lesion > 0].mean() / np.median(scaled.image[1][brain & (lesion == 0)])
        assert abs(ratio - 1.3) < 0.02
        assert not scaled.image[1][~brain].any()
    low, high = tool.FLAIR_MEDIAN_RANGE
    assert low - 1e-6 <= min(medians) and max(medians) <= high + 1e-6
    assert max(medians) - min(medians) > 0.5 * (high - low)  # spread over the range, not one level
    assert np.median(volume.image[1][brain]) > 0.79  # the input is untouched


def test_ensemble_joins_the_members_and_chooses_thresholds_on_its_own_calibration_outputs(tmp_path, monkeypatch):
    import torch

    from bids_fcd.models import build_model, load_checkpoint, save_checkpoint

    config = ModelConfig(grid_shape=(32, 32, 32), grid_spacing_mm=6.0, arch_params={"width": 0.25})
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(tmp_path / f"seed{seed}.pt")
        save_checkpoint(build_model(config), config.updated(training={"seed": seed}), members[-1])
    rng = np.random.default_rng(0)
    brain = np.zeros(config.grid_shape, bool)
    brain[4:28, 4:28, 4:28] = True
    calibration = []
    for label in (0, 1, 0, 1):
        lesion = np.zeros(config.grid_shape, np.uint8)
        lesion[10:14, 10:14, 10:14] = label
        calibration.append(tool.Volume(rng.standard_normal((2, *config.grid_shape)).astype(np.float32), brain,
                                       lesion, label, "synthetic"))
    asked = []
    monkeypatch.setattr(tool, "calibration_volumes", lambda args, grid: asked.append(args.seed) or calibration)

    out = tmp_path / "ensemble"
    assert tool.main(["--ensemble", *map(str, members), "--out", str(out), "--seed", "3", "--n_threads", "1"]) == 0
    model, saved = load_checkpoint(out / "model.pt")
    assert asked == [3] and saved.ensemble_size == 2 and len(model.members) == 2
    assert [member["seed"] for member in saved.training["members"]] == [0, 1]
    assert saved.training["n_calibration"] == 4 and "--ensemble" in saved.training["command"]
    assert saved.subject_threshold == saved.training["subject_threshold"]


def _volumes(n: int) -> list:
    brain = np.zeros((24, 24, 24), bool)
    brain[2:22, 2:22, 2:22] = True
    image = np.stack([np.where(brain, 0.8, 0.0), np.where(brain, 0.6, 0.0)]).astype(np.float32)
    return [tool.Volume(image.copy(), brain, np.zeros(brain.shape, np.uint8), (i + 1) % 2, "synthetic")
            for i in range(n)]


def test_no_distractors_leaves_the_controls_clean_and_the_random_stream_where_distractors_leave_it():
    wm = np.zeros((24, 24, 24), np.float32)
    wm[4:20, 4:20, 4:20] = 1.0
    with_them, without = _volumes(8), _volumes(8)
    rng_with, rng_without = np.random.default_rng(3), np.random.default_rng(3)
    tool.distract_controls(with_them, rng_with, wm, 1.5, apply=True)
    tool.distract_controls(without, rng_without, wm, 1.5, apply=False)
    changed = [i for i, v in enumerate(with_them) if not np.array_equal(v.image, _volumes(1)[0].image)]
    assert changed == [1, 5] and all(with_them[i].label == 0 for i in changed)  # every other control
    assert all(np.array_equal(v.image, _volumes(1)[0].image) for v in without)
    assert rng_with.integers(1 << 30) == rng_without.integers(1 << 30)  # the next volumes are drawn alike


@pytest.mark.parametrize("no_realism_mimics", [False, True])
@pytest.mark.parametrize("no_realism_levels", [False, True])
def test_phase_4_options_leave_out_its_mimics_or_its_flair_levels(monkeypatch, no_realism_mimics, no_realism_levels):
    mimicked, real_mimic_rngs, rescaled = [], [], []
    monkeypatch.setattr(tool, "template_tissue_maps", lambda grid: (None, None, None))
    monkeypatch.setattr(tool, "synthetic_volume", lambda rng, grid, with_lesion: _volumes(1)[0])
    monkeypatch.setattr(tool, "with_mimic", lambda v, *args: mimicked.append(args[-1]) or v)
    monkeypatch.setattr(tool, "real_volumes", lambda *args, mimic_rng=None: real_mimic_rngs.append(mimic_rng) or [])
    monkeypatch.setattr(tool, "with_flair_level", lambda v, rng: rescaled.append(v) or v)
    args = argparse.Namespace(seed=0, n_realism=8, no_realism_mimics=no_realism_mimics,
                              no_realism_levels=no_realism_levels, work_dir=Path("unused"), implants_per_brain=2,
                              realism_real_rounds=1)
    grid = argparse.Namespace(spacing_mm=1.5)

    volumes = tool.realism_volumes(args, grid, pipeline=_volumes(2))
    assert len(volumes) == 10
    if no_realism_mimics:
        assert mimicked == [] and real_mimic_rngs == [None]
    else:
        assert mimicked == ["plaques", "plaques", "tumour", "tumour"] and real_mimic_rngs[0] is not None
    assert len(rescaled) == (0 if no_realism_levels else 10)


def test_more_real_rounds_in_phase_4_add_draws_and_keep_the_first(monkeypatch):
    drawn = []
    monkeypatch.setattr(tool, "template_tissue_maps", lambda grid: (None, None, None))
    monkeypatch.setattr(tool, "synthetic_volume", lambda rng, grid, with_lesion: _volumes(1)[0])
    monkeypatch.setattr(tool, "with_mimic", lambda v, *args: v)
    monkeypatch.setattr(tool, "real_volumes",
                        lambda grid, cache, rng, n, mimic_rng=None: drawn.append(rng.integers(1 << 30)) or _volumes(3))
    grid = argparse.Namespace(spacing_mm=1.5)

    def volumes(rounds):
        drawn.clear()
        args = argparse.Namespace(seed=0, n_realism=4, no_realism_mimics=False, no_realism_levels=True,
                                  work_dir=Path("unused"), implants_per_brain=2, realism_real_rounds=rounds)
        return tool.realism_volumes(args, grid, pipeline=[]), list(drawn)

    one, first_draws = volumes(1)
    four, four_draws = volumes(4)
    assert len(one) == 4 + 3 and len(four) == 4 + 4 * 3
    assert four_draws[0] == first_draws[0] and len(set(four_draws)) == 4


def test_runs_with_other_training_data_never_share_a_phase_folder(tmp_path):
    def dirs(**options):
        flags = {"no_distractors": False, "no_realism_mimics": False, "no_realism_levels": False,
                 "histogram_standardisation": False, "realism_real_rounds": 1, **options}
        return tool.phase_dirs(argparse.Namespace(work_dir=tmp_path, **flags))

    default = dirs()
    assert [path.name for path in default.values()] == ["fit", "fit_whole", "fit_pipeline", "fit_realism"]
    without_distractors = dirs(no_distractors=True)
    assert all(without_distractors[phase] != default[phase] for phase in default)
    realism = {dirs(no_distractors=True, no_realism_mimics=m, no_realism_levels=lv)["realism"]
               for m in (False, True) for lv in (False, True)}
    assert len(realism) == 4 and default["realism"] not in realism
    standardised = dirs(no_distractors=True, histogram_standardisation=True)
    assert all(standardised[phase] not in (default[phase], without_distractors[phase]) for phase in default)
    assert dirs(realism_real_rounds=4)["realism"] != default["realism"]


def test_standardised_volumes_change_in_place_only_for_a_model_with_landmarks():
    brain = np.zeros((16, 16, 16), dtype=bool)
    brain[3:13, 3:13, 3:13] = True
    rng = np.random.default_rng(0)
    image = np.where(brain, rng.gamma(2.0, 0.2, size=(2, 16, 16, 16)), 0).astype(np.float32)
    volume = tool.Volume(image, brain, np.zeros(brain.shape, np.uint8), 0, "synthetic")
    assert tool.standardised([volume], ModelConfig())[0].image is image
    landmarks = {name: list(np.linspace(0.0, 1.0, len(HISTOGRAM_PERCENTILES))) for name in ("T1w", "FLAIR")}
    assert tool.standardised([volume], ModelConfig(histogram_landmarks=landmarks))[0] is volume
    assert np.allclose(np.percentile(volume.image[1][brain], HISTOGRAM_PERCENTILES), landmarks["FLAIR"], atol=0.02)
