"""The participant level end to end: per-participant exit codes and the whole output tree."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fcd.cli import main
from bids_fcd.config import ModelConfig
from bids_fcd.models import build_model, save_checkpoint
from bids_fcd.synth import make_cohort
from bids_fcd.validation import run_validator
from tests.bids_factory import make_dataset
from tests.browser import chromium, rendered_colours, screenshot

TINY = ModelConfig(grid_spacing_mm=3.0, grid_shape=(64, 64, 64), arch_params={"width": 0.5},
                   name="tiny-test-model", model_version="test")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained small-grid model: the tests check the plumbing, not the accuracy."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(build_model(TINY), TINY, path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort") / "bids", n=2, seed=3)


@pytest.fixture(scope="module")
def finished_run(cohort, tiny_model, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("run") / "out"
    code = main([str(cohort), str(out), "participant", "--model", str(tiny_model), "--n_cpus", "2",
                 "--n_passes", "2"])
    return out, code


def test_all_participants_succeed(finished_run):
    out, code = finished_run
    assert code == 0, (out / "logs").iterdir() and [p.read_text() for p in (out / "logs").glob("crash-*")]


def test_every_contract_output_exists_for_every_participant(finished_run, cohort):
    out, _ = finished_run
    for subject_dir in sorted(cohort.glob("sub-*")):
        subject = subject_dir.name
        t1w = next((subject_dir / "anat").glob("*_T1w.nii.gz")).name.removesuffix("_T1w.nii.gz")
        flair = next((subject_dir / "anat").glob("*_FLAIR.nii.gz")).name.removesuffix("_FLAIR.nii.gz")
        anat = out / subject / "anat"
        expected = [
            f"{t1w}_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz",
            f"{t1w}_space-MNI152NLin2009aSym_desc-preproc_T1w.json",
            f"{flair}_space-MNI152NLin2009aSym_desc-preproc_FLAIR.nii.gz",
            f"{flair}_space-MNI152NLin2009aSym_desc-preproc_FLAIR.json",
            f"{t1w}_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz",
            f"{t1w}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt",
            f"{flair}_from-FLAIR_to-T1w_mode-image_xfm.txt",
            f"{t1w}_label-FCD_probseg.nii.gz",
            f"{t1w}_label-FCD_probseg.json",
            f"{t1w}_space-MNI152NLin2009aSym_label-FCD_probseg.nii.gz",
            f"{t1w}_label-FCD_desc-saliency_probseg.nii.gz",
            f"{t1w}_space-MNI152NLin2009aSym_label-FCD_desc-saliency_probseg.nii.gz",
            f"{t1w}_label-FCD_desc-uncertainty_probseg.nii.gz",
            f"{t1w}_desc-fcd_prediction.json",
        ]
        missing = [name for name in expected if not (anat / name).is_file()]
        assert missing == []
        assert (out / f"{subject}.html").is_file() and (out / "logs" / f"{subject}.log").is_file()
        assert not list(out.rglob(".tmp-*")), "a temporary file was left behind"


def test_native_maps_are_on_the_input_t1w_grid_and_in_range(finished_run, cohort):
    out, _ = finished_run
    for t1w_path in sorted(cohort.glob("sub-*/anat/*_T1w.nii.gz")):
        source = nib.load(t1w_path)
        stem = t1w_path.name.removesuffix("_T1w.nii.gz")
        anat = out / t1w_path.parent.relative_to(cohort)
        for desc in ("", "_desc-saliency", "_desc-uncertainty"):
            image = nib.load(anat / f"{stem}_label-FCD{desc}_probseg.nii.gz")
            assert image.shape == source.shape and np.allclose(image.affine, source.affine, atol=1e-4)
            data = image.get_fdata()
            assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
            assert int(image.header["sform_code"]) == int(image.header["qform_code"]) == 1  # scanner
        template_images = sorted(anat.glob(f"{stem}_space-MNI152NLin2009aSym_*.nii.gz"))
        assert len(template_images) >= 4  # preproc T1w and FLAIR, brain mask, probability, saliency
        for template_space in template_images:  # MNI coordinates, as fMRIPrep writes them
            header = nib.load(template_space).header
            assert int(header["sform_code"]) == int(header["qform_code"]) == 4, template_space.name


def test_prediction_json_has_the_contract_fields(finished_run):
    out, _ = finished_run
    for path in out.glob("sub-*/anat/*_desc-fcd_prediction.json"):
        prediction = json.loads(path.read_text())
        assert 0 <= prediction["fcd_probability"] <= 1
        assert prediction["predicted"] == ("fcd" if prediction["fcd_probability"] >= prediction["threshold"]
                                           else "control")
        assert {"voxel_threshold", "model", "clusters"} <= set(prediction)
        assert prediction["model"]["name"] == "tiny-test-model"
        for cluster in prediction["clusters"]:
            assert {"id", "volume_mm3", "peak_mm", "centroid_mm", "peak_probability", "mean_probability",
                    "atlas", "region"} <= set(cluster)


def test_report_holds_what_a_reader_needs(finished_run):
    """The issue's list: notice, subject probability and threshold, candidates, overlays, QC, model and version."""
    import html

    from bids_fcd.report import NOTICE

    out, _ = finished_run
    for path in out.glob("sub-*/anat/*_desc-fcd_prediction.json"):
        prediction = json.loads(path.read_text())
        page = html.unescape((out / f"{path.parts[-3]}.html").read_text())
        assert NOTICE in page
        assert f"FCD probability <strong>{prediction['fcd_probability']:.4f}</strong>" in page
        assert f"(threshold {prediction['threshold']:.4f}): <strong>{prediction['predicted']}</strong>" in page
        assert "Model <code>tiny-test-model</code> version test" in page
        assert all(f"Preprocessing QC:</strong> {warning}" in page for warning in prediction["qc_warnings"])
        for cluster in prediction["clusters"][:3]:
            assert cluster["region"] in page and f"candidate {cluster['id']}: T1w + saliency" in page
        if not prediction["clusters"]:
            assert "No candidate cluster" in page and "saliency peak: T1w + saliency" in page
        for section in ("Candidate lesions", "Probability and saliency", "Preprocessing quality", "flair_to_t1w"):
            assert section in page


def test_group_level_samples_come_from_the_participant_levels_cache_in_parallel(finished_run, cohort):
    """`data.prepare_samples` as the group level calls it (2 spawned workers): every unit is read from the cache
    the participant run filled, none preprocessed again, and each patient's mask is mapped to the model grid."""
    from bids_fcd.data import prepare_samples
    from bids_fcd.inputs import discover
    from bids_fcd.template import model_grid

    out, _ = finished_run
    entries = sorted(p.name for p in (out / "cache").iterdir())
    units = discover(cohort)
    samples, failed = prepare_samples(units, out / "cache", model_grid(TINY.grid_spacing_mm, TINY.grid_shape),
                                      TINY.channels, n_cpus=2)
    assert failed == {} and [s.unit.name for s in samples] == [u.name for u in units]
    assert any(s.lesion is not None for s in samples), "the cohort should hold a patient with a mask"
    assert sorted(p.name for p in (out / "cache").iterdir()) == entries
    for sample in samples:
        assert sample.image.shape == (2, *TINY.grid_shape)
        assert (sample.lesion is not None) == (sample.unit.lesion_mask is not None)
        if sample.lesion is not None:
            assert (sample.lesion >= 0.5).sum() > 0


def test_output_dataset_passes_the_official_validator(finished_run):
    out, _ = finished_run
    errors = [i for i in run_validator(out) if i["severity"] == "error"]
    assert errors == []


def test_cache_is_reused_on_a_second_run(finished_run, cohort, tiny_model, caplog):
    out, _ = finished_run
    entries = sorted(p.name for p in (out / "cache").iterdir())
    assert main([str(cohort), str(out), "participant", "--model", str(tiny_model), "--skip_bids_validator",
                 "--participant_label", "00001", "--n_passes", "1"]) == 0
    assert sorted(p.name for p in (out / "cache").iterdir()) == entries


def test_a_second_run_with_the_same_seed_writes_identical_outputs(finished_run, cohort, tiny_model, tmp_path):
    """What users rely on when they rerun a participant: the same inputs and seed give the same numbers,
    preprocessing included. Compared on sub-00002, which no other test reruns."""
    out, _ = finished_run
    again = tmp_path / "out"
    assert main([str(cohort), str(again), "participant", "--model", str(tiny_model), "--n_cpus", "2",
                 "--n_passes", "2", "--skip_bids_validator"]) == 0
    first_dir, second_dir = out / "sub-00002" / "anat", again / "sub-00002" / "anat"
    names = sorted(p.name for p in first_dir.iterdir())
    assert names == sorted(p.name for p in second_dir.iterdir())
    for name in names:
        if name.endswith(".nii.gz"):
            first, second = nib.load(first_dir / name), nib.load(second_dir / name)
            assert np.array_equal(first.get_fdata(), second.get_fdata()), name
            assert np.array_equal(first.affine, second.affine), name
        else:
            assert (first_dir / name).read_text() == (second_dir / name).read_text(), name


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    out, _ = finished_run
    report = min(out.glob("sub-*.html"))
    png = screenshot(report, tmp_path / "report.png")
    assert rendered_colours(png) > 500, "the report rendered (nearly) blank: are its figures missing?"
    for source in __import__("re").findall(r'src="([^"]+)"', report.read_text()):
        assert (out / source).is_file()


def test_corrupt_t1w_alone_exits_65_with_a_crash_file(tmp_path, tiny_model):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    t1w = bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    t1w.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    out = tmp_path / "out"
    assert main([str(bids_dir), str(out), "participant", "--model", str(tiny_model), "--skip_bids_validator"]) == 65
    crash = (out / "logs" / "crash-sub-01.txt").read_text()
    assert "sub-01_T1w.nii.gz" in crash


def test_missing_flair_alone_exits_66(tmp_path, tiny_model):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--model", str(tiny_model)]) == 66


def test_mixed_failures_exit_1_and_the_summary_names_each(tmp_path, tiny_model, caplog):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"],
                                                "sub-02": ["anat/sub-02_T1w.nii.gz", "anat/sub-02_FLAIR.nii.gz"]})
    (bids_dir / "sub-02" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"\x00" * 400)
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--model", str(tiny_model),
                 "--skip_bids_validator"]) == 1
    assert "sub-01 failed (exit 66)" in caplog.text and "sub-02 failed (exit 65)" in caplog.text


def test_missing_model_file_is_66(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--model", str(tmp_path / "none.pt"),
                 "--skip_bids_validator"]) == 66


@pytest.mark.parametrize("blocked", ["sub-00001", "logs"])
def test_an_output_folder_blocked_by_a_file_is_an_io_error_74_not_raised(tmp_path, tiny_model, cohort, blocked):
    out = tmp_path / "out"
    out.mkdir()
    (out / blocked).write_text("a file where a folder must go")
    assert main([str(cohort), str(out), "participant", "--model", str(tiny_model), "--skip_bids_validator",
                 "--participant_label", "00001", "--n_passes", "1"]) == 74


def test_reruns_never_leave_a_failure_looking_finished(tmp_path, tiny_model, cohort, monkeypatch):
    out = tmp_path / "out"
    args = [str(cohort), str(out), "participant", "--skip_bids_validator", "--participant_label", "00001",
            "--n_passes", "1"]
    crash = out / "logs" / "crash-sub-00001.txt"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main([*args, "--model", str(broken)]) != 0
    assert crash.is_file()
    # A rerun that succeeds removes the earlier crash file.
    assert main([*args, "--model", str(tiny_model)]) == 0
    assert not crash.exists()
    finished = [out / "sub-00001.html", *(out / "sub-00001" / "anat").glob("*_desc-fcd_prediction.json")]
    assert len(finished) == 2 and all(path.is_file() for path in finished)
    # A rerun that fails part-way withdraws the earlier run's finishing marks (prediction JSON, report).
    from bids_fcd import cache

    def disk_error(*args, **kwargs):
        raise OSError("disk error while preprocessing")

    monkeypatch.setattr(cache, "load_or_preprocess", disk_error)
    assert main([*args, "--model", str(tiny_model)]) == 74
    assert crash.is_file() and not any(path.exists() for path in finished)


def test_a_probability_at_the_threshold_is_written_and_called_consistently(tmp_path, tiny_model, cohort,
                                                                           monkeypatch):
    """The call is made on the probability as written: 0.4999996 against 0.5 is written 0.5 and called fcd."""
    from bids_fcd import infer

    predict = infer.predict

    def just_below_threshold(*args, **kwargs):
        prediction = predict(*args, **kwargs)
        prediction.fcd_probability = TINY.subject_threshold - 4e-7
        return prediction

    monkeypatch.setattr(infer, "predict", just_below_threshold)
    out = tmp_path / "out"
    assert main([str(cohort), str(out), "participant", "--model", str(tiny_model), "--skip_bids_validator",
                 "--participant_label", "00001", "--n_passes", "1"]) == 0
    prediction = json.loads(next(out.rglob("*_desc-fcd_prediction.json")).read_text())
    assert prediction["fcd_probability"] == prediction["threshold"] and prediction["predicted"] == "fcd"
    assert "group level" in prediction["notice"]  # not the shipped model: no claim about how it was trained
    report = (out / "sub-00001.html").read_text()
    assert f"(threshold {TINY.subject_threshold:.4f})" in report and "the template peak in" in report
    assert "drawn from 0.05 up, below the candidate cut" in report
