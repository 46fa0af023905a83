"""The synthetic cohort has ds004199's form, is seeded, and its template-space samples look preprocessed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fcd import synth
from bids_fcd.config import ModelConfig
from bids_fcd.lesions import sample_lesion_params
from bids_fcd.template import Grid, model_grid
from bids_fcd.validation import run_validator

N_PARTICIPANTS = 4
SEED = 3
SMALL_GRID = model_grid(4.0, (40, 48, 36))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return synth.make_cohort(tmp_path_factory.mktemp("synth") / "cohort", n=N_PARTICIPANTS, seed=SEED)


def _participants(root: Path) -> list[dict]:
    text = (root / "participants.tsv").read_bytes().decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_cohort_has_the_ds004199_layout(cohort):
    rows = _participants(cohort)
    expected = {".bidsignore", "README", "dataset_description.json", "participants.json", "participants.tsv"}
    for row in rows:
        site = next(s for s in synth.SITES if s.label == row["site"])
        subject = row["participant_id"]
        stems = [f"{subject}/anat/{subject}_acq-{site.t1w.acq}_T1w", f"{subject}/anat/{subject}_acq-{site.flair.acq}_FLAIR"]
        expected |= {f"{stem}{ext}" for stem in stems for ext in (".nii.gz", ".json")}
        if row["group"] == "fcd":
            expected.add(f"{stems[1]}_roi.nii.gz")
    assert set(_files(cohort)) == expected
    assert (cohort / ".bidsignore").read_text().split() == ["*_roi.nii.gz"]
    description = json.loads((cohort / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    readme = (cohort / "README").read_text()
    assert "nilearn" in readme and "ICBM152 2009a" in readme and "Copyright" in readme


def test_participants_tsv_has_a_bom_the_columns_and_half_patients(cohort):
    raw = (cohort / "participants.tsv").read_bytes()
    assert raw.startswith("\ufeff".encode()) and b"\r\n" in raw  # as ds004199 ships it
    rows = _participants(cohort)
    assert list(rows[0]) == ["participant_id", "group", "sex", "age", "site", "split"]
    assert [r["participant_id"] for r in rows] == [f"sub-{i:05d}" for i in range(1, N_PARTICIPANTS + 1)]
    assert sorted(r["group"] for r in rows) == ["fcd", "fcd", "hc", "hc"]
    assert {r["sex"] for r in rows} <= {"M", "F"} and all(r["age"].isdigit() for r in rows)
    levels = json.loads((cohort / "participants.json").read_text())
    assert set(levels["site"]["Levels"]) == {s.label for s in synth.SITES}


@pytest.mark.parametrize("n", [4, 5, 12, 30])
def test_test_split_holds_both_groups_and_sites_do_not_predict_the_group(n):
    rows = synth._draw_participants(np.random.default_rng(n), n)
    groups = [r["group"] for r in rows]
    assert groups.count("fcd") == (n + 1) // 2
    assert {r["group"] for r in rows if r["split"] == "test"} == {"fcd", "hc"}
    assert {r["group"] for r in rows if r["split"] == "train"} == {"fcd", "hc"}
    for group in ("fcd", "hc"):
        sites = [r["site"] for r in rows if r["group"] == group]
        counts = [sites.count(s.label) for s in synth.SITES]
        assert max(counts) - min(counts) <= 1  # each group dealt evenly round the sites


def test_roi_exists_only_for_patients_on_their_flair_grid(cohort):
    for row in _participants(cohort):
        anat = cohort / row["participant_id"] / "anat"
        flair_path = next(anat.glob("*_FLAIR.nii.gz"))
        rois = list(anat.glob("*_roi.nii.gz"))
        assert len(rois) == (row["group"] == "fcd")
        if not rois:
            continue
        assert rois[0].name == flair_path.name.replace("_FLAIR.nii.gz", "_FLAIR_roi.nii.gz")
        flair, roi = nib.load(flair_path), nib.load(rois[0])
        assert roi.shape == flair.shape and np.allclose(roi.affine, flair.affine)
        mask = np.asarray(roi.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        volume_ml = mask.sum() * np.prod(roi.header.get_zooms()) / 1000.0
        assert 0.4 <= volume_ml <= 9.0  # 0.5-8 mL drawn, give or take thick-slice partial volume
        # The lesion is FLAIR-bright against the brain around it.
        flair_data = flair.get_fdata()
        ring = np.zeros(mask.shape, dtype=bool)
        centre = np.argwhere(mask).mean(axis=0).astype(int)
        ring[tuple(slice(max(c - 12, 0), c + 13) for c in centre)] = True
        surroundings = flair_data[ring & (mask == 0) & (flair_data > np.percentile(flair_data, 60))]
        assert flair_data[mask > 0].mean() > np.median(surroundings)


def test_t1w_and_flair_are_on_different_oblique_grids_with_plausible_sidecars(cohort):
    for row in _participants(cohort):
        anat = cohort / row["participant_id"] / "anat"
        t1w, flair = nib.load(next(anat.glob("*_T1w.nii.gz"))), nib.load(next(anat.glob("*_FLAIR.nii.gz")))
        assert t1w.shape != flair.shape and not np.allclose(t1w.affine, flair.affine)
        for image in (t1w, flair):
            assert image.get_data_dtype() == np.int16
            linear = image.affine[:3, :3] / np.array(image.header.get_zooms())
            assert not np.allclose(np.abs(linear), np.eye(3))  # oblique, not a plain RAS grid
            assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1
        assert 1.2 <= min(t1w.header.get_zooms()) <= max(t1w.header.get_zooms()) <= 1.6
        assert max(flair.header.get_zooms()) / min(flair.header.get_zooms()) > 2 or flair.shape[0] != t1w.shape[0]
        for sidecar_path in anat.glob("*.json"):
            sidecar = json.loads(sidecar_path.read_text())
            for key in ("MagneticFieldStrength", "Manufacturer", "RepetitionTime", "EchoTime", "FlipAngle"):
                assert key in sidecar
            assert 0 < sidecar["EchoTime"] < sidecar["RepetitionTime"] < 20


@pytest.mark.slow
def test_brains_are_person_sized_so_brain_extraction_accepts_them(cohort):
    """The template brain is ~1.9 L; drawn at its own size, a quarter of the heads failed deepbet's volume check."""
    import SimpleITK as sitk

    from bids_fcd.preprocess import BRAIN_VOLUME_LIMITS_ML, extract_brain

    for t1w_path in sorted(cohort.glob("sub-*/anat/*_T1w.nii.gz")):
        image = sitk.ReadImage(str(t1w_path))
        mask, problem = extract_brain(image)
        volume_ml = sitk.GetArrayViewFromImage(mask).sum() * np.prod(image.GetSpacing()) / 1000.0
        assert problem is None, f"{t1w_path.name}: {problem}"
        assert BRAIN_VOLUME_LIMITS_ML[0] + 200 <= volume_ml <= BRAIN_VOLUME_LIMITS_ML[1] - 300, t1w_path.name


def test_sites_differ_in_scanner_and_protocol():
    assert len({(s.t1w.acq, s.flair.acq) for s in synth.SITES}) == len(synth.SITES) >= 2
    assert len({s.scanner["MagneticFieldStrength"] for s in synth.SITES}) >= 2


def test_same_seed_gives_identical_files_in_parallel_too(cohort, tmp_path):
    again = synth.make_cohort(tmp_path / "again", n=N_PARTICIPANTS, seed=SEED, n_cpus=2)
    assert _files(again) == _files(cohort)
    for name in _files(cohort):
        assert (again / name).read_bytes() == (cohort / name).read_bytes(), name


def test_different_seeds_draw_different_participants():
    first = synth._draw_participants(np.random.default_rng([1, 0]), 12)
    second = synth._draw_participants(np.random.default_rng([2, 0]), 12)
    assert first != second


def test_cohort_passes_the_bids_validator(cohort):
    """The app's own validator call (it finds bids-validator-deno beside the interpreter, as a venv installs it)."""
    assert [i for i in run_validator(cohort) if i["severity"] == "error"] == []


def test_make_cohort_refuses_a_non_empty_directory_and_no_participants(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        synth.make_cohort(tmp_path, n=4, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        synth.make_cohort(tmp_path / "new", n=0, seed=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_cohorts_put_everyone_they_cannot_split_in_train(n):
    rows = synth._draw_participants(np.random.default_rng(0), n)
    assert [r["group"] for r in rows].count("fcd") == (n + 1) // 2
    for group in ("fcd", "hc"):
        members = [r for r in rows if r["group"] == group]
        assert len(members) < 2 or {r["split"] for r in members} == {"train", "test"}
        assert len(members) != 1 or members[0]["split"] == "train"


def test_cli_exit_codes(tmp_path, capsys):
    assert synth.main(["--help"]) == 0
    assert synth.main([str(tmp_path / "out"), "--n", "two"]) == 64
    assert synth.main([str(tmp_path / "out"), "--n", "0"]) == 64
    assert synth.main([str(tmp_path / "out"), "--n_cpus", "0"]) == 64
    assert synth.main([]) == 64
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert synth.main([str(tmp_path / "full")]) == 73
    below_a_file = tmp_path / "full" / "file" / "out"
    assert synth.main([str(below_a_file)]) == 73
    assert "cannot create output" in capsys.readouterr().err


def test_template_sample_looks_preprocessed():
    t1w, flair, brain_mask, lesion_mask = synth.synth_template_sample(np.random.default_rng(0), SMALL_GRID, True)
    for image in (t1w, flair):
        assert image.shape == SMALL_GRID.shape and image.dtype == np.float32
        inside = brain_mask > 0
        assert np.all(image[~inside] == 0)
        low, high = np.percentile(image[inside], [1, 99])
        assert low == pytest.approx(0.0, abs=1e-3) and high == pytest.approx(1.0, abs=1e-3)
    assert brain_mask.dtype == lesion_mask.dtype == np.uint8
    brain_ml = brain_mask.sum() * SMALL_GRID.voxel_volume_mm3 / 1000.0
    assert 1500 < brain_ml < 2300  # the template's mask holds CSF too: 1.88 L
    assert lesion_mask.any() and not (lesion_mask & (1 - brain_mask)).any()


def test_template_sample_without_lesion_has_an_empty_mask_and_is_seeded():
    first = synth.synth_template_sample(np.random.default_rng(1), SMALL_GRID, False)
    second = synth.synth_template_sample(np.random.default_rng(1), SMALL_GRID, False)
    assert not first[3].any()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    other = synth.synth_template_sample(np.random.default_rng(2), SMALL_GRID, False)
    assert not np.array_equal(first[0], other[0])


def test_template_sample_on_the_default_model_grid():
    config = ModelConfig()
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)
    t1w, flair, brain_mask, lesion_mask = synth.synth_template_sample(np.random.default_rng(5), grid, True)
    assert t1w.shape == flair.shape == brain_mask.shape == lesion_mask.shape == config.grid_shape
    assert 0.5 <= lesion_mask.sum() * grid.voxel_volume_mm3 / 1000.0 <= 8.0
    white_matter = synth.template_tissue_maps(grid)[1] > 0.5
    lesion = lesion_mask > 0
    assert flair[lesion & white_matter].mean() > flair[~lesion & white_matter].mean()


def test_neocortical_territory_leaves_out_what_fcd_type_ii_spares():
    def allowed(x: float, y: float, z: float) -> bool:
        at = Grid(shape=(1, 1, 1), affine=np.array([[1, 0, 0, x], [0, 1, 0, y], [0, 0, 1, z], [0, 0, 0, 1.0]]))
        return bool(synth.neocortical_territory(at)[0, 0, 0])

    assert not allowed(20, -65, -35)  # cerebellum
    assert not allowed(0, -30, -30)  # brainstem
    assert not allowed(-20, -18, 5)  # thalamus
    assert not allowed(25, -20, -15)  # hippocampus
    assert allowed(40, 20, 40)  # frontal cortex
    assert allowed(-50, -20, -20)  # lateral temporal cortex
    assert allowed(20, -95, 5)  # occipital pole
    assert allowed(38, 0, 5)  # insula


def test_template_lesions_stay_in_the_neocortical_territory_and_some_have_a_transmantle_tail():
    grid = model_grid(3.0, (56, 64, 56))
    gm, wm, _ = synth.template_tissue_maps(grid)
    territory = synth.neocortical_territory(grid)
    rng = np.random.default_rng(0)
    drawn = [sample_lesion_params(rng, gm, wm, grid.spacing_mm, territory_mask=territory) for _ in range(30)]
    assert all(territory[p.centre_vox] for p in drawn)
    tails = [p for p in drawn if p.transmantle]
    assert len(tails) >= 3
    assert any(not territory[p.transmantle_target_vox] for p in tails)  # reaching the deep ventricle


def test_scanner_effects_blur_bias_and_rician_noise():
    """A flat phantom with one bright edge: blur widens the edge, the bias field varies smoothly, the noise is
    Rician (never negative; mean raised in the dark background, as in magnitude images)."""
    from bids_fcd.synth import _random_warp, _scanner_effects

    phantom = np.zeros((40, 40, 40), np.float32)
    phantom[:, :, 20:] = 1.0
    sharp = _scanner_effects(np.random.default_rng(0), phantom, noise_sd=0.0, bias_sd=0.0, blur_vox=(0, 0, 0))
    np.testing.assert_allclose(sharp, phantom, atol=1e-6)
    blurred = _scanner_effects(np.random.default_rng(0), phantom, noise_sd=0.0, bias_sd=0.0, blur_vox=(0, 0, 2))
    assert 0.05 < blurred[20, 20, 17] < 0.5 and blurred[20, 20, 10] < 1e-3
    biased = _scanner_effects(np.random.default_rng(0), phantom, noise_sd=0.0, bias_sd=0.2, blur_vox=(0, 0, 0))
    inside = biased[:, :, 20:]
    # smooth, not noise: neighbouring voxels differ far less than the field varies over the volume
    assert 0.05 < inside.std() < 0.5 and np.median(np.abs(np.diff(inside, axis=0))) < inside.std() / 5
    noisy = _scanner_effects(np.random.default_rng(0), phantom, noise_sd=0.05, bias_sd=0.0, blur_vox=(0, 0, 0))
    assert noisy.min() >= 0 and 0.04 < noisy[:, :, 20:].std() < 0.08
    assert noisy[:, :, :20].mean() > 0.03  # Rician floor in the background
    warp = _random_warp(np.random.default_rng(0), sd_mm=2.0)
    assert warp.displacement_mm.shape[0] == 3 and abs(float(warp.displacement_mm.std()) - 2.0) < 1e-3
