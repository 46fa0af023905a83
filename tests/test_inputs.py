"""Input discovery on the real ds004199 tree and on small hand-made layouts."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from bids_fcd.inputs import (
    InputError,
    LabelSpec,
    discover,
    read_filter_file,
    read_participants_table,
    validate_labels,
)
from tests.bids_factory import make_dataset


def expected_ds004199(root):
    """What every participant should get, read independently from the published participants.tsv."""
    with open(root / "participants.tsv", encoding="utf-8-sig") as handle:
        rows = {r["participant_id"]: r for r in csv.DictReader(handle, delimiter="\t")}
    return rows


def test_ds004199_every_participant_gets_its_t1w_flair_mask_and_label(ds004199):
    units = discover(ds004199)
    rows = expected_ds004199(ds004199)
    assert len(units) == 170 == len(rows)
    for unit in units:
        anat = ds004199 / f"sub-{unit.subject}" / "anat"
        t1w = sorted(anat.glob("*_T1w.nii.gz"))
        flair = sorted(p for p in anat.glob("*_FLAIR.nii.gz"))
        roi = sorted(anat.glob("*_roi.nii.gz"))
        assert [unit.t1w] == t1w and [unit.flair] == flair
        assert unit.t1w_entities["acquisition"] != unit.flair_entities["acquisition"]
        assert unit.lesion_mask == (roi[0] if roi else None)
        assert unit.lesion_mask_space == ("FLAIR" if roi else None)
        row = rows[f"sub-{unit.subject}"]
        assert unit.label == (1 if row["group"] == "fcd" else 0)
        assert unit.split == row["split"]
    assert sum(u.label for u in units) == 85
    assert sum(u.lesion_mask is not None for u in units) == 85


def test_ds004199_mask_named_after_missing_flair_is_paired_by_grid(ds004199, caplog):
    (unit,) = discover(ds004199, participant_labels=["00048"])
    assert unit.lesion_mask.name == "sub-00048_acq-32ch10_FLAIR_roi.nii.gz"
    assert unit.flair.name == "sub-00048_acq-T2sel_FLAIR.nii.gz"
    assert "names an image that does not exist" in caplog.text


def test_participants_table_tolerates_bom_and_keeps_split(ds004199):
    assert (ds004199 / "participants.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    table = read_participants_table(ds004199)
    assert "00001" in table.index and {"group", "split"} <= set(table.columns)


def test_labels_with_and_without_prefix_select_the_same_participant(ds004199):
    labels = validate_labels(["sub-00003", "00005"], "sub-", "participant")
    units = discover(ds004199, participant_labels=labels)
    assert [u.subject for u in units] == ["00003", "00005"]


def test_unknown_participant_label_is_exit_18_naming_it(ds004199):
    with pytest.raises(InputError, match="sub-99999") as info:
        discover(ds004199, participant_labels=["00001", "99999"])
    assert info.value.exit_code == 18


@pytest.mark.parametrize("label", ["../x", "01/anat", "a b", "sub-"])
def test_labels_that_are_not_alphanumeric_are_usage_errors(label):
    with pytest.raises(InputError) as info:
        validate_labels([label], "sub-", "participant")
    assert info.value.exit_code == 64


def test_filter_file_selects_and_an_empty_selection_is_exit_18(tmp_path):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_acq-a_T1w.nii.gz", "anat/sub-01_acq-b_T1w.nii.gz",
                                                       "anat/sub-01_FLAIR.nii.gz"]})
    (unit,) = discover(root, filters={"t1w": {"acquisition": "b"}})
    assert unit.t1w.name == "sub-01_acq-b_T1w.nii.gz"
    with pytest.raises(InputError, match="t1w") as info:
        discover(root, filters={"t1w": {"acquisition": "zzz"}})
    assert info.value.exit_code == 18


def test_several_candidates_pick_highest_resolution_then_lowest_run(tmp_path, caplog):
    from tests.bids_factory import write_image

    caplog.set_level(logging.INFO)
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_FLAIR.nii.gz"]})
    anat = root / "sub-01" / "anat"
    write_image(anat / "sub-01_run-1_T1w.nii.gz", zooms=(2, 2, 2))
    write_image(anat / "sub-01_run-2_T1w.nii.gz", zooms=(1, 1, 1))
    write_image(anat / "sub-01_run-3_T1w.nii.gz", zooms=(1, 1, 1))
    (unit,) = discover(root)
    assert unit.t1w.name == "sub-01_run-2_T1w.nii.gz"
    assert "chose sub-01_run-2_T1w.nii.gz" in caplog.text


def test_sessions_are_separate_units_and_can_be_restricted(tmp_path):
    files = [f"ses-{s}/anat/sub-01_ses-{s}_{m}.nii.gz" for s in ("pre", "post") for m in ("T1w", "FLAIR")]
    root = make_dataset(tmp_path / "bids", {"sub-01": files})
    assert [u.name for u in discover(root)] == ["sub-01_ses-post", "sub-01_ses-pre"]
    (unit,) = discover(root, session_labels=["pre"])
    assert unit.session == "pre" and "ses-pre" in unit.flair.name
    with pytest.raises(InputError) as info:
        discover(root, session_labels=["nope"])
    assert info.value.exit_code == 18
    # One unknown label among known ones is still named, not silently dropped.
    with pytest.raises(InputError, match="ses-nope") as info:
        discover(root, session_labels=["pre", "nope"])
    assert info.value.exit_code == 18


def test_label_column_and_positive_value_are_configurable_and_na_is_excluded(tmp_path):
    participants = [{"participant_id": "sub-01", "dx": "patient"}, {"participant_id": "sub-02", "dx": "control"},
                    {"participant_id": "sub-03", "dx": "n/a"}]
    layout = {f"sub-0{i}": [f"anat/sub-0{i}_T1w.nii.gz", f"anat/sub-0{i}_FLAIR.nii.gz"] for i in (1, 2, 3)}
    root = make_dataset(tmp_path / "bids", layout, participants)
    units = discover(root, label_spec=LabelSpec(column="dx", positive="patient"))
    assert [u.label for u in units] == [1, 0, None]


def test_derivative_masks_are_found_and_paired_by_grid(tmp_path):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    from tests.bids_factory import write_image

    mask = write_image(root / "derivatives" / "masks" / "sub-01" / "anat" / "sub-01_label-FCD_mask.nii.gz")
    (unit,) = discover(root)
    assert unit.lesion_mask == mask and unit.lesion_mask_space == "FLAIR"


def test_missing_flair_is_reported_as_none_not_an_error(tmp_path):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    (unit,) = discover(root)
    assert unit.flair is None and unit.t1w is not None


@pytest.mark.parametrize("content,match", [
    ("not json", "cannot read"), (json.dumps({"bold": {}}), "unknown"), (json.dumps({"t1w": 3}), "object of objects"),
    # Keys the app sets per participant: overriding them would give sub-01's outputs sub-02's images.
    (json.dumps({"t1w": {"subject": "02"}, "flair": {"subject": "02"}}), r"\['subject'\]"),
    (json.dumps({"t1w": {"suffix": "FLAIR"}}), "suffix"),
    (json.dumps({"t1w": {"acquisition": "a", "foo": "bar"}}), r"\['foo'\], which are not BIDS entities")])
def test_bad_filter_file_is_a_usage_error(tmp_path, content, match):
    path = tmp_path / "filter.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match) as info:
        read_filter_file(path)
    assert info.value.exit_code == 64


def test_filter_that_excludes_a_participants_images_says_so(tmp_path):
    from bids_fcd.participant import MissingImageError, require_images

    root = make_dataset(tmp_path / "bids", {
        "sub-01": ["anat/sub-01_acq-a_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"],
        "sub-02": ["anat/sub-02_acq-b_T1w.nii.gz", "anat/sub-02_FLAIR.nii.gz"]})
    first, second = discover(root, filters={"t1w": {"acquisition": "a"}})
    assert first.t1w.name == "sub-01_acq-a_T1w.nii.gz" and second.t1w is None
    with pytest.raises(MissingImageError, match=r"passes the --bids_filter_file query \(it excludes "
                                                 r"\['sub-02_acq-b_T1w.nii.gz'\]\)"):
        require_images(second, ("T1w", "FLAIR"))


@pytest.mark.parametrize("content,match", [(b"participant_id\tgroup\nsub-01\tf\xe9d\n", "not UTF-8"),
                                           (b"", "not a readable tab-separated table")])
def test_unreadable_participants_table_is_bad_input_naming_it(tmp_path, content, match):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    (root / "participants.tsv").write_bytes(content)
    with pytest.raises(InputError, match=f"participants.tsv: {match}") as info:
        discover(root)
    assert info.value.exit_code == 65


@pytest.mark.parametrize("description", ["{not json", json.dumps({"BIDSVersion": "1.9.0"})])
def test_dataset_description_pybids_cannot_use_is_bad_input_naming_it(tmp_path, description):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    (root / "dataset_description.json").write_text(description)
    with pytest.raises(InputError, match="dataset_description.json") as info:
        discover(root)
    assert info.value.exit_code == 65


def test_mask_named_after_an_image_on_another_grid_is_skipped_with_a_warning(tmp_path, caplog):
    from tests.bids_factory import write_image

    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    write_image(root / "sub-01" / "anat" / "sub-01_FLAIR_roi.nii.gz", shape=(20, 20, 20))
    (unit,) = discover(root)
    assert unit.lesion_mask is None and unit.flair is not None
    assert "does not have the shape of sub-01_FLAIR.nii.gz" in caplog.text
    # Same shape, slightly different header: paired by name (the image's affine is used).
    write_image(root / "sub-01" / "anat" / "sub-01_FLAIR_roi.nii.gz", zooms=(2.0, 2.0, 2.01))
    (unit,) = discover(root)
    assert unit.lesion_mask.name == "sub-01_FLAIR_roi.nii.gz" and unit.lesion_mask_space == "FLAIR"


def test_split_values_other_than_train_or_test_are_warned(tmp_path, caplog):
    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]},
                        [{"participant_id": "sub-01", "group": "fcd", "split": "holdout"}])
    (unit,) = discover(root)
    assert unit.split is None and "split 'holdout' is neither train nor test" in caplog.text


def test_a_broken_symlink_is_named_as_such(tmp_path):
    from bids_fcd.participant import MissingImageError, require_images

    root = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]})
    (unit,) = discover(root)
    unit.t1w.unlink()
    unit.t1w.symlink_to(tmp_path / "annex" / "not-fetched.nii.gz")
    with pytest.raises(MissingImageError, match="broken symlink to .*not-fetched.nii.gz .*datalad get"):
        require_images(unit, ("T1w", "FLAIR"))
