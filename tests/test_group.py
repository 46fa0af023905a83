"""End to end: `group` on a tiny synthetic cohort writes every output, and `participant` uses its model.

Preprocessing is replaced by model-grid samples from the synthetic generator (`tests.group_factory`), so the
whole group level (folds, training, out-of-fold thresholds, test set, audit, report) runs in about a minute.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bids_fcd import cli, data, evaluate, exit_codes
from bids_fcd.models import build_model, load_checkpoint, save_checkpoint
from tests import browser
from tests.group_factory import (
    TINY_CONFIG,
    TINY_GRID,
    fake_preprocess_unit,
    tiny_participant,
    write_tiny_bids,
)

N_PARTICIPANTS = 12
GROUP_ARGS = ["--skip_bids_validator", "--n_folds", "2", "--epochs", "2", "--batch_size", "2", "--n_cpus",
              "1",
              "--n_passes", "1", "--embedding", "pca", "--deterministic", "--seed", "5"]
EXPECTED = ["folds.tsv", "model.pt", "model.json", "predictions.tsv", "metrics.json", "MODEL_CARD.md",
            "report.html", "combat_estimates.json", "fold-0/log.tsv", "fold-0/checkpoint_best.pt",
            "fold-0/checkpoint_latest.pt", "fold-1/log.tsv", "fold-1/checkpoint_best.pt", "final/log.tsv",
            "final/checkpoint_latest.pt", "figures/roc.png", "figures/pr.png", "figures/confusion.png",
            "figures/training_curves.png", "figures/cohort.png", "figures/embeddings.png",
            "figures/shortcut_audit.png", "figures/probabilities.png", "figures/calibration.png",
            "figures/froc.png"]


def run_group(bids: Path, out: Path, start: Path, *extra: str) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "preprocess_unit", fake_preprocess_unit)
        return cli.main([str(bids), str(out), "group", "--model", str(start), *GROUP_ARGS, *extra])


@pytest.fixture(scope="session")
def starting_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny model: its config (32^3 grid of 6 mm) is what the group level trains."""
    path = tmp_path_factory.mktemp("start") / "start.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model(TINY_CONFIG), TINY_CONFIG, path)
    return path


@pytest.fixture(scope="session")
def group_run(tmp_path_factory, starting_model) -> tuple[int, Path, Path]:
    """(exit code, OUTPUT_DIR, BIDS_DIR) of one group run whose `split` test part holds both classes."""
    root = tmp_path_factory.mktemp("group")
    bids = write_tiny_bids(root / "bids", N_PARTICIPANTS)
    out = root / "out"
    return run_group(bids, out, starting_model), out, bids


def test_group_level_exits_0_and_writes_every_output(group_run):
    code, out, _ = group_run
    assert code == 0
    missing = [name for name in EXPECTED if not (out / "group" / name).is_file()]
    assert not missing
    assert {"group", "group/"} & set((out / ".bidsignore").read_text().split())


def test_folds_are_leakage_free_and_the_split_is_the_test_set(group_run):
    _, out, bids = group_run
    folds = pd.read_csv(out / "group" / "folds.tsv", sep="\t", dtype=str)
    assert folds["participant_id"].is_unique and len(folds) == N_PARTICIPANTS
    participants = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, encoding="utf-8-sig")
    test_ids = set(participants.loc[participants["split"] == "test", "participant_id"])
    assert set(folds.loc[folds["fold"] == "test", "participant_id"]) == test_ids
    assert set(folds.loc[folds["fold"] != "test", "fold"]) == {"0", "1"}


def test_model_is_a_weights_only_checkpoint_with_the_chosen_thresholds(group_run):
    _, out, _ = group_run
    state = torch.load(out / "group" / "model.pt", weights_only=True)
    assert set(state) == {"state_dict", "config_json"}
    model, config = load_checkpoint(out / "group" / "model.pt")
    metrics = json.loads((out / "group" / "metrics.json").read_text())
    assert config.subject_threshold == metrics["protocol"]["subject_threshold"]
    assert config.voxel_threshold == metrics["protocol"]["voxel_threshold"]
    assert "Youden" in config.training["threshold_rule"]
    assert config.grid_shape == TINY_CONFIG.grid_shape
    assert config.grid_spacing_mm == TINY_CONFIG.grid_spacing_mm
    assert config.training["dataset"]["n_units"] == N_PARTICIPANTS and "torch" in config.versions
    on_disk = json.loads((out / "group" / "model.json").read_text())
    assert on_disk["subject_threshold"] == config.subject_threshold
    with torch.no_grad():
        outputs = model(torch.zeros(1, 2, *TINY_CONFIG.grid_shape))
    assert outputs["voxel_logits"].shape == (1, 1, *TINY_CONFIG.grid_shape)


def test_fold_models_carry_the_group_thresholds_and_their_own_fold(group_run):
    _, out, _ = group_run
    _, group_config = load_checkpoint(out / "group" / "model.pt")
    for k in range(2):
        _, config = load_checkpoint(out / "group" / f"fold-{k}" / "checkpoint_best.pt")
        assert (config.name, config.model_version) == (group_config.name, group_config.model_version)
        assert (config.subject_threshold, config.voxel_threshold) == (group_config.subject_threshold,
                                                                      group_config.voxel_threshold)
        assert config.versions == group_config.versions and config.ensemble_size == 1
        assert config.training["fold"] == k and config.training["epoch"] >= 1


def test_voxel_threshold_keeps_out_of_fold_false_positives_in_bound(group_run):
    _, out, _ = group_run
    metrics = json.loads((out / "group" / "metrics.json").read_text())
    assert metrics["protocol"]["voxel_threshold_rule"] == evaluate.VOXEL_THRESHOLD_RULE
    table = pd.read_csv(out / "group" / "predictions.tsv", sep="\t", keep_default_na=False)
    out_of_fold = table[(table["fold"] != "test") & (table["n_false_positive"] != "")]
    mean_false_positives = out_of_fold["n_false_positive"].astype(int).mean()
    assert (mean_false_positives <= evaluate.MAX_FP_PER_PARTICIPANT
            or metrics["protocol"]["voxel_threshold"] == evaluate.VOXEL_THRESHOLDS[-1])


def test_predictions_table_has_one_row_per_unit(group_run):
    _, out, _ = group_run
    table = pd.read_csv(out / "group" / "predictions.tsv", sep="\t", keep_default_na=False)
    assert len(table) == N_PARTICIPANTS and table["participant_id"].is_unique
    for column in ("participant_id", "session", "label", "fold", "fcd_probability", "predicted", "n_clusters",
                   "lesion_detected", "dice", "site", "T1w_acq", "FLAIR_acq"):
        assert column in table.columns
    threshold = json.loads((out / "group" / "model.json").read_text())["subject_threshold"]
    clear = (table["fcd_probability"] - threshold).abs() > 1e-6  # the table rounds to 6 decimals
    expected = np.where(table["fcd_probability"] >= threshold, "fcd", "control")
    assert (table["predicted"] == expected)[clear].all()
    assert set(table.loc[table["label"] == "control", "lesion_detected"]) == {"n/a"}
    assert set(table.loc[table["label"] == "control", "lesion_volume_ml"]) == {"n/a"}
    patients = table[table["label"] == "fcd"]
    assert (patients["lesion_volume_ml"].astype(float) > 0).all()
    assert patients["lesion_flair_contrast"].astype(float).notna().all()
    assert (patients["lesion_edge_distance_mm"].astype(float) >= 0).all()
    # the map's peak inside the lesion agrees with the detection: a found lesion reaches the voxel cut
    voxel_threshold = json.loads((out / "group" / "model.json").read_text())["voxel_threshold"]
    peak = patients["lesion_peak_probability"].astype(float)
    assert peak.between(0, 1).all()
    assert (peak[patients["lesion_detected"] == "True"] >= voxel_threshold - 1e-4).all()
    assert set(table.loc[table["label"] == "control", "lesion_peak_probability"]) == {"n/a"}
    # metrics.json counts the out-of-fold misses from the same peaks, and the report shows them
    missed = json.loads((out / "group" / "metrics.json").read_text())["cross_validation"]["missed_lesions"]
    cv = patients[patients["fold"] != "test"]
    cv_missed = cv[cv["lesion_detected"] == "False"]["lesion_peak_probability"].astype(float)
    assert missed == {"n": len(cv_missed), "unseen": int((cv_missed < evaluate.UNSEEN_PEAK).sum()),
                      "under_the_cut": int((cv_missed >= evaluate.UNSEEN_PEAK).sum())}
    assert "lesions missed: unseen" in (out / "group" / "report.html").read_text()


def test_subject_threshold_carries_its_own_bootstrap_interval(group_run):
    _, out, _ = group_run
    protocol = json.loads((out / "group" / "metrics.json").read_text())["protocol"]
    interval = protocol["subject_threshold_ci95"]
    card = (out / "group" / "MODEL_CARD.md").read_text()
    if interval is None:  # the tiny cohort's resamples rarely hold both classes
        assert "the cut falls in" not in card
    else:
        assert 0.0 <= interval[0] <= interval[1] <= 1.0
        assert f"the cut falls in {interval[0]:.2f}-{interval[1]:.2f}" in card
        assert "the cut falls in" in (out / "group" / "report.html").read_text()


def test_metrics_have_confidence_intervals_sites_and_the_audit(group_run):
    _, out, _ = group_run
    metrics = json.loads((out / "group" / "metrics.json").read_text())
    cv = metrics["cross_validation"]
    for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity", "ppv", "f1", "brier"):
        assert set(cv["subject"][key]) == {"value", "ci95"}
    cv_rows = pd.read_csv(out / "group" / "predictions.tsv", sep="\t").query("fold != 'test'")
    brier = np.mean((cv_rows["fcd_probability"] - (cv_rows["label"] == "fcd")) ** 2)
    assert cv["subject"]["brier"]["value"] == pytest.approx(brier, abs=1e-3)  # the table rounds probabilities
    for key in ("detection_rate", "false_positives_per_participant", "dice"):
        assert key in cv["lesion"]
    assert set(cv["by_site"]) == {"siteA", "siteB"}
    table = pd.read_csv(out / "group" / "predictions.tsv", sep="\t")
    cv_patients = table[(table["fold"] != "test") & (table["label"] == "fcd")]
    by_volume = cv["lesion_by_volume"]
    assert list(by_volume) == evaluate.band_labels(evaluate.LESION_VOLUME_EDGES_ML, "mL")
    assert sum(band["n"] for band in by_volume.values()) == len(cv_patients)
    detected = sum(band["n"] * band["detection_rate"] for band in by_volume.values() if band["n"])
    assert detected == pytest.approx(cv_patients["lesion_detected"].astype(bool).sum())
    by_depth = cv["lesion_by_edge_distance"]
    assert list(by_depth) == evaluate.band_labels(evaluate.LESION_EDGE_DISTANCE_EDGES_MM, "mm")
    assert sum(band["n"] for band in by_depth.values()) == len(cv_patients)
    assert "test" in metrics and metrics["protocol"]["test_set"]
    cv_controls = table[(table["fold"] != "test") & (table["label"] == "control")]
    for section, patients, controls in ((cv, cv_patients, cv_controls),
                                        (metrics["test"], *(table[(table["fold"] == "test") & (table["label"] == label)]
                                                            for label in ("fcd", "control")))):
        points = section["froc"]["points"]
        assert [p["voxel_threshold"] for p in points] == list(evaluate.VOXEL_THRESHOLDS)
        # at the shipped voxel threshold the curve is the predictions table's own detection and false candidates
        at_cut = next(p for p in points if p["voxel_threshold"] == metrics["protocol"]["voxel_threshold"])
        assert at_cut["detection_rate"] == pytest.approx(patients["lesion_detected"].astype(bool).mean())
        assert at_cut["false_positive_clusters_per_control"] == pytest.approx(controls["n_clusters"].mean())
        assert set(section["froc"]["detection_within_fp"]) == {f"{b:g}" for b in evaluate.FROC_FP_BUDGETS}
    assert metrics["shortcut_audit"]["best"]["auroc"] is not None
    assert "harmonise" in metrics["harmonisation"] and metrics["cohort"]["n_fcd"] == N_PARTICIPANTS // 2
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]


def test_fold_logs_and_latest_checkpoints(group_run):
    _, out, _ = group_run
    for k in range(2):
        with open(out / "group" / f"fold-{k}" / "log.tsv") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["val_loss"]) > 0 for r in rows)
        latest = torch.load(out / "group" / f"fold-{k}" / "checkpoint_latest.pt", weights_only=True)
        assert latest["finished"] and latest["epoch"] == 2


def test_model_card_and_report_link_existing_figures(group_run):
    _, out, _ = group_run
    card = (out / "group" / "MODEL_CARD.md").read_text()
    assert "Research use only" in card and "Shortcut audit" in card and "AUROC" in card
    page = (out / "group" / "report.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert len(links) == 10 and all((out / "group" / link).stat().st_size > 2000 for link in links)
    for section in ("Shortcut audit", "Harmonisation", "Cohort", "Metrics"):
        assert section in page


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(group_run, tmp_path):
    _, out, _ = group_run
    png = browser.screenshot(out / "group" / "report.html", tmp_path / "report.png", size="1200,2000")
    assert browser.rendered_colours(png) > 200


def test_rerun_resumes_finished_folds_and_reproduces_the_model(group_run, starting_model, monkeypatch):
    from bids_fcd import engine

    _, out, bids = group_run
    before = torch.load(out / "group" / "model.pt", weights_only=True)["state_dict"]
    monkeypatch.setattr(engine.EpochRunner, "train_epoch", lambda *a: pytest.fail("a finished fold trained"))
    assert run_group(bids, out, starting_model) == 0
    after = torch.load(out / "group" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fold_ensemble_is_the_folds_best_networks_and_predicts_the_test_set(tmp_path, starting_model):
    """`--final_model fold_ensemble`: no refit; model.pt averages the folds' best networks, and the participant
    level's prediction (`infer.predict` of the loaded model.pt) is the one predictions.tsv holds for the test set."""
    from bids_fcd.infer import predict
    from bids_fcd.models import FCDEnsemble

    bids = write_tiny_bids(tmp_path / "bids", N_PARTICIPANTS)
    out = tmp_path / "out"
    assert run_group(bids, out, starting_model, "--epochs", "1", "--final_model", "fold_ensemble") == 0
    group = out / "group"
    assert not (group / "final").exists()
    model, config = load_checkpoint(group / "model.pt")
    assert isinstance(model, FCDEnsemble) and config.ensemble_size == 2
    assert json.loads((group / "model.json").read_text())["ensemble_size"] == 2
    for k, member in enumerate(model.members):
        best = torch.load(group / f"fold-{k}" / "checkpoint_best.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(value, best[name]) for name, value in member.state_dict().items())
    metrics = json.loads((group / "metrics.json").read_text())
    assert "ensemble of the 2 folds" in metrics["protocol"]["final_model"]
    assert "ensemble of the 2 folds" in (group / "MODEL_CARD.md").read_text()
    table = pd.read_csv(group / "predictions.tsv", sep="\t", keep_default_na=False)
    test_rows = table[table["fold"] == "test"]
    assert len(test_rows) == 3
    for row in test_rows.itertuples():
        index = int(row.participant_id[4:]) - 1
        arrays = fake_preprocess_unit(tiny_participant(index, N_PARTICIPANTS), tmp_path, TINY_GRID,
                                      config.channels, 1)
        prediction = predict(model, config, arrays.image, arrays.brain_mask, torch.device("cpu"), n_passes=1,
                             seed=5)
        assert prediction.fcd_probability == pytest.approx(row.fcd_probability, abs=1e-5)


def test_split_with_patients_only_in_test_is_warned_and_reported_separately(tmp_path, starting_model,
                                                                             monkeypatch):
    """ds004199's layout: `test` holds only patients. Also: one unlabelled and one FLAIR-less participant, one
    whose images cannot be preprocessed."""
    from bids_fcd.preprocess import InvalidImageError

    def preprocess_failing_for_sub_05(unit, *args, preprocess=fake_preprocess_unit):
        if unit.subject == "05":
            raise InvalidImageError("sub-05_T1w.nii.gz", "truncated")
        return preprocess(unit, *args)

    monkeypatch.setattr("tests.test_group.fake_preprocess_unit", preprocess_failing_for_sub_05)
    bids = write_tiny_bids(tmp_path / "bids", 10)
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, encoding="utf-8-sig")
    table.loc[table["group"] == "hc", "split"] = "train"
    table.loc[table["participant_id"].isin(["sub-08", "sub-10"]), "split"] = "test"  # patients only
    table.loc[table["participant_id"] == "sub-01", "group"] = "n/a"
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    for path in (bids / "sub-03" / "anat").glob("*FLAIR*"):
        path.unlink()
    out = tmp_path / "out"
    code = run_group(bids, out, starting_model, "--epochs", "1")
    assert code == exit_codes.EXIT_PARTICIPANT_FAILED  # sub-03 and sub-05 could not be used
    metrics = json.loads((out / "group" / "metrics.json").read_text())
    assert "test" not in metrics and metrics["protocol"]["split_warning"]
    assert metrics["official_test_patients"]["subject"]["n"] == 2
    assert metrics["cohort"]["left_out"] == {
        "sub-03": {"exit_code": exit_codes.EXIT_MISSING_INPUT, "reason": "no FLAIR image"},
        "sub-05": {"exit_code": exit_codes.EXIT_BAD_DATA,
                   "reason": "InvalidImageError: invalid image sub-05_T1w.nii.gz: truncated"}}
    assert any("cannot be a test set" in w for w in metrics["warnings"])
    folds = pd.read_csv(out / "group" / "folds.tsv", sep="\t", dtype=str)
    assert "test" not in set(folds["fold"]) and len(folds) == 7  # sub-01 unlabelled, sub-03, sub-05 failed


@pytest.mark.slow
def test_participant_level_uses_the_group_model(group_run, tmp_path):
    """`participant --model OUTPUT_DIR/group/model.pt` on a real (synthetic) scan: real preprocessing."""
    from bids_fcd.synth import make_cohort

    _, out, _ = group_run
    bids = make_cohort(tmp_path / "cohort", 4, seed=3)
    result = tmp_path / "derivatives"
    code = cli.main([str(bids), str(result), "participant", "--participant_label", "00001", "--model",
                     str(out / "group" / "model.pt"), "--skip_bids_validator", "--n_passes", "1"])
    assert code == 0
    prediction = json.loads(next(result.rglob("*_desc-fcd_prediction.json")).read_text())
    model_json = json.loads((out / "group" / "model.json").read_text())
    assert prediction["threshold"] == model_json["subject_threshold"]
    assert prediction["threshold_rule"] == model_json["training"]["threshold_rule"]
    assert prediction["model"]["name"] == "bids_fcd-group"


def test_default_learning_rate_is_lower_when_fine_tuning():
    from bids_fcd.train import FINE_TUNE_LEARNING_RATE, SCRATCH_LEARNING_RATE, training_options

    args = cli.build_parser().parse_args(["bids", "out", "group"])
    assert training_options(args, fine_tune=True).learning_rate == FINE_TUNE_LEARNING_RATE < SCRATCH_LEARNING_RATE
    assert training_options(args, fine_tune=False).learning_rate == SCRATCH_LEARNING_RATE
    chosen = cli.build_parser().parse_args(["bids", "out", "group", "--learning_rate", "0.01"])
    assert training_options(chosen, fine_tune=True).learning_rate == 0.01


def test_bad_starting_model_or_network_fails_before_any_preprocessing(tmp_path, starting_model, monkeypatch):
    def no_preprocessing(*args):
        pytest.fail("preprocessed although the run cannot train")

    monkeypatch.setattr(data, "prepare_samples", no_preprocessing)
    bids = write_tiny_bids(tmp_path / "bids", 4)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert cli.main([str(bids), str(out), "group", "--model", str(tmp_path / "none.pt"), *GROUP_ARGS]) == 66
    assert cli.main([str(bids), str(out), "group", "--model", str(garbage), *GROUP_ARGS]) == 65
    for wrong in (["--architecture", "nonet"], ["--arch_params", '{"no_such_parameter": 1}']):
        assert cli.main([str(bids), str(out), "group", "--model", str(starting_model), *GROUP_ARGS, *wrong]) == 64
    assert cli.main([str(bids), str(out), "group", *GROUP_ARGS, "--n_folds", "1"]) == 64
    assert not (out / "group").exists()


def test_every_unit_failing_alike_exits_with_their_code(tmp_path, starting_model, monkeypatch):
    from bids_fcd.preprocess import InvalidImageError

    def unreadable(unit, *args):
        raise InvalidImageError(f"sub-{unit.subject}_T1w.nii.gz", "truncated")

    monkeypatch.setattr("tests.test_group.fake_preprocess_unit", unreadable)
    bids = write_tiny_bids(tmp_path / "bids", 4)
    assert run_group(bids, tmp_path / "out", starting_model) == exit_codes.EXIT_BAD_DATA


def test_label_errors_say_what_participants_tsv_holds(tmp_path, starting_model, caplog):
    bids = write_tiny_bids(tmp_path / "bids", 4)
    assert run_group(bids, tmp_path / "out", starting_model, "--label_column", "Group") == 18
    assert "no column 'Group'" in caplog.text and "group" in caplog.text
    caplog.clear()
    assert run_group(bids, tmp_path / "out", starting_model, "--positive_label", "FCD") == 18
    assert "holds ['fcd', 'hc']" in caplog.text


def test_an_empty_mask_on_a_patient_means_lesion_unknown(tmp_path, caplog):
    import nibabel as nib

    from bids_fcd.data import preprocess_unit
    from bids_fcd.inputs import discover
    from tests.bids_factory import make_dataset

    bids = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]},
                        [{"participant_id": "sub-01", "group": "fcd"}])
    flair = bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"
    image = nib.load(flair)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine),
             bids / "sub-01" / "anat" / "sub-01_FLAIR_roi.nii.gz")
    (unit,) = discover(bids)
    assert unit.lesion_mask is not None

    class Cached:  # what the cache returns, as far as preprocess_unit reads it
        brain_mask = np.ones(TINY_GRID.shape, np.uint8)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("bids_fcd.cache.load_or_preprocess", lambda *a, **k: Cached)
        patch.setattr("bids_fcd.preprocess.mask_to_template", lambda *a: np.zeros(TINY_GRID.shape))
        patch.setattr("bids_fcd.preprocess.channels_array", lambda pre, channels: np.zeros((2, *TINY_GRID.shape)))
        arrays = preprocess_unit(unit, tmp_path / "cache", TINY_GRID, ("T1w", "FLAIR"), 1)
    assert arrays.lesion is None and "marks no lesion" in caplog.text


def test_a_rerun_that_fails_in_training_leaves_no_earlier_finished_outputs(tmp_path, starting_model, monkeypatch):
    from bids_fcd import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    bids = write_tiny_bids(tmp_path / "bids", 6)
    group = tmp_path / "out" / "group"
    group.mkdir(parents=True)
    for name in train.FINISHED_OUTPUTS:
        (group / name).write_text("from an earlier run")
    monkeypatch.setattr(train, "train_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_group(bids, tmp_path / "out", starting_model)
    assert (group / "folds.tsv").is_file()
    assert not [name for name in train.FINISHED_OUTPUTS if (group / name).exists()]


@pytest.mark.parametrize("fraction", ["0.5", "0"])
def test_mimic_copies_train_only_in_their_own_participants_folds(tmp_path, starting_model, monkeypatch, fraction):
    from bids_fcd import train

    trained = {}  # fold id -> (training participants with repeats, validation participants)

    def recording_train_one(config, state, train_samples, val_samples, options, out_dir, fold_id, dist, **kw):
        trained[fold_id] = ([s.participant_id for s in train_samples], [s.participant_id for s in val_samples])
        return real_train_one(config, state, train_samples, val_samples, options, out_dir, fold_id, dist, **kw)

    real_train_one = train.train_one
    monkeypatch.setattr(train, "train_one", recording_train_one)
    bids = write_tiny_bids(tmp_path / "bids", 8)
    out = tmp_path / "out"
    assert run_group(bids, out, starting_model, "--epochs", "1", "--mimic_fraction", fraction) == 0
    folds = pd.read_csv(out / "group" / "folds.tsv", sep="\t", dtype=str)
    cv = folds[folds["fold"] != "test"]
    n_copies = 0
    for fold_id, (train_ids, val_ids) in trained.items():
        in_fold = set(cv["participant_id"]) if fold_id == max(trained) else set(cv[cv["fold"] != str(fold_id)]["participant_id"])
        assert set(train_ids) == in_fold and not set(val_ids) & set(train_ids), fold_id  # copies of their own only
        n_copies += len(train_ids) - len(set(train_ids))
    assert (n_copies > 0) == (fraction == "0.5")
    _, config = load_checkpoint(out / "group" / "model.pt")
    assert config.training["options"]["mimic_fraction"] == float(fraction)
    protocol = json.loads((out / "group" / "metrics.json").read_text())["protocol"]
    assert protocol["mimic_copies"].startswith(f"{n_copies // 2} cross-validation participant")  # one fold and the refit hold each
    assert protocol["mimic_copies"] in (out / "group" / "MODEL_CARD.md").read_text()


def test_implant_copies_train_as_fcd_only_in_their_own_controls_folds(tmp_path, starting_model, monkeypatch):
    from bids_fcd import train

    trained = {}  # fold id -> [(participant, label)] of the training set, validation participants

    def recording_train_one(config, state, train_samples, val_samples, options, out_dir, fold_id, dist, **kw):
        trained[fold_id] = ([(s.participant_id, s.label) for s in train_samples],
                            [s.participant_id for s in val_samples])
        return real_train_one(config, state, train_samples, val_samples, options, out_dir, fold_id, dist, **kw)

    real_train_one = train.train_one
    monkeypatch.setattr(train, "train_one", recording_train_one)
    bids = write_tiny_bids(tmp_path / "bids", 8)
    out = tmp_path / "out"
    assert run_group(bids, out, starting_model, "--epochs", "1", "--mimic_fraction", "0",
                     "--implant_fraction", "1") == 0
    folds = pd.read_csv(out / "group" / "folds.tsv", sep="\t", dtype=str)
    cv = folds[folds["fold"] != "test"]
    controls = set(cv[cv["label"] == "0"]["participant_id"])
    n_copies = 0
    for fold_id, (train_rows, val_ids) in trained.items():
        ids = [pid for pid, _ in train_rows]
        copies = [pid for pid in set(ids) if ids.count(pid) == 2]
        assert not set(val_ids) & set(ids), fold_id  # a copy trains only in its participant's own fold
        assert all(sorted(label for pid, label in train_rows if pid == c) == [0, 1] for c in copies), fold_id
        assert set(copies) == controls & set(ids), fold_id  # every training control, and no patient
        n_copies += len(copies)
    assert n_copies > 0
    _, config = load_checkpoint(out / "group" / "model.pt")
    assert config.training["options"]["implant_fraction"] == 1.0
    protocol = json.loads((out / "group" / "metrics.json").read_text())["protocol"]
    assert protocol["implant_copies"].startswith(f"{n_copies // 2} cross-validation control")  # a fold and the refit
    assert protocol["implant_copies"] in (out / "group" / "MODEL_CARD.md").read_text()


def test_pretrain_epochs_pretrains_each_folds_encoder(tmp_path, starting_model):
    bids = write_tiny_bids(tmp_path / "bids", 6)
    out = tmp_path / "out"
    assert run_group(bids, out, starting_model, "--epochs", "1", "--pretrain_epochs", "1", "--from_scratch") == 0
    for part in ("fold-0", "fold-1", "final"):
        assert (out / "group" / part / "pretrained_encoder.pt").is_file(), part


def test_a_cohort_whose_metadata_gives_the_label_away_is_warned_in_every_output(tmp_path, starting_model):
    """ds004199's trap, exaggerated: patients all young, controls all old. The metadata-only baseline reaches
    AUROC ~1, and the warning must reach metrics.json, report.html and the model card."""
    bids = write_tiny_bids(tmp_path / "bids", 12)
    table = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str, encoding="utf-8-sig")
    table["age"] = np.where(table["group"] == "fcd", "8", "55")
    table.to_csv(bids / "participants.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    assert run_group(bids, out, starting_model, "--epochs", "1") == 0
    metrics = json.loads((out / "group" / "metrics.json").read_text())
    warning = metrics["shortcut_audit"]["warning"]
    assert warning and warning.startswith("SHORTCUT RISK") and warning in metrics["warnings"]
    assert metrics["shortcut_audit"]["best"]["auroc"] >= 0.8
    assert warning in (out / "group" / "report.html").read_text().replace("&#x27;", "'")
    assert "**WARNING:** SHORTCUT RISK" in (out / "group" / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_torchrun_group_level_with_two_processes_on_a_real_cohort(tmp_path, starting_model):
    """The documented multi-process command, `torchrun --nproc_per_node=N run.py BIDS OUT group`, with two CPU
    processes (gloo) and real preprocessing: rank 0 preprocesses while rank 1 waits, both train, rank 0 writes."""
    import subprocess
    import sys

    from bids_fcd.synth import make_cohort

    bids = make_cohort(tmp_path / "bids", 6, seed=2)
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).resolve().parents[1] / "run.py"), str(bids), str(out), "group", "--model",
         str(starting_model), "--skip_bids_validator", "--n_folds", "2", "--epochs", "1", "--batch_size", "2",
         "--n_passes", "1", "--embedding", "pca", "--n_cpus", "2"],
        capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(pd.read_csv(out / "group" / "folds.tsv", sep="\t")) == 6
    assert len(pd.read_csv(out / "group" / "predictions.tsv", sep="\t")) == 6
    _, config = load_checkpoint(out / "group" / "model.pt")
    assert config.name == "bids_fcd-group" and config.grid_shape == TINY_CONFIG.grid_shape
    assert len(list((out / "cache").iterdir())) == 6  # preprocessed once, by rank 0
