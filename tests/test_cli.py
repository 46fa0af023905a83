"""Every exit code of the contract that needs no model, in the contract's order of checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_fcd.cli import main
from tests.bids_factory import make_dataset

REPO = Path(__file__).resolve().parents[1]
PAIR = ["anat/sub-01_T1w.nii.gz", "anat/sub-01_FLAIR.nii.gz"]


@pytest.fixture
def bids_dir(tmp_path) -> Path:
    return make_dataset(tmp_path / "bids", {"sub-01": PAIR})


def test_version_comes_from_the_version_file(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bids_fcd {(REPO / 'version').read_text().strip()}"


@pytest.mark.parametrize("extra", [["--no_such_option"], ["--n_cpus", "0"], ["--device", "tpu"],
                                   ["--participant_label", "../etc"], ["--bids_filter_file", "/no/such.json"],
                                   ["--seed", "-1"], ["--seed", str(2**32)]])
def test_usage_errors_exit_64_not_argparse_2(bids_dir, tmp_path, extra):
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", *extra]) == 64


def test_missing_positional_is_64(capsys):
    assert main([]) == 64
    assert "usage" in capsys.readouterr().err


def test_usage_is_checked_before_the_analysis_level(bids_dir, tmp_path):
    assert main([str(bids_dir), str(tmp_path / "out"), "nonsense", "--bogus"]) == 64


def test_unknown_analysis_level_is_17(bids_dir, tmp_path):
    assert main([str(bids_dir), str(tmp_path / "out"), "session"]) == 17


def test_missing_bids_dir_is_66(tmp_path):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66


def test_bids_dir_without_dataset_description_is_66(bids_dir, tmp_path):
    (bids_dir / "dataset_description.json").unlink()
    assert main([str(bids_dir), str(tmp_path / "out"), "participant"]) == 66


def test_output_below_a_regular_file_is_73(bids_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main([str(bids_dir), str(blocker / "out"), "participant"]) == 73


@pytest.mark.parametrize("inside", ["", "derivatives/fcd"])
def test_output_equal_to_or_inside_input_is_73(bids_dir, inside):
    assert main([str(bids_dir), str(bids_dir / inside), "participant"]) == 73


def test_work_dir_below_a_file_or_inside_the_input_is_73(bids_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for work_dir in (blocker / "work", bids_dir / "scratch"):
        assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--work_dir", str(work_dir)]) == 73
    assert not (bids_dir / "scratch").exists()


def test_a_validator_that_cannot_run_is_16_with_the_hint(bids_dir, tmp_path, caplog, monkeypatch):
    from bids_fcd import validation

    monkeypatch.setattr(validation, "validator_command", lambda: ["echo", "no JSON here"])
    assert main([str(bids_dir), str(tmp_path / "out"), "participant"]) == 16
    assert "could not run" in caplog.text and "--skip_bids_validator" in caplog.text


def test_validation_errors_in_a_selected_participant_are_16(bids_dir, tmp_path, caplog):
    (bids_dir / "sub-01" / "anat" / "sub-01_notbids.nii.gz").write_bytes(b"")
    assert main([str(bids_dir), str(tmp_path / "out"), "participant"]) == 16
    assert "--skip_bids_validator" in caplog.text and "sub-01_notbids" in caplog.text


def test_validation_errors_outside_the_selection_are_only_warnings(tmp_path, caplog):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": PAIR, "sub-02": [p.replace("01", "02") for p in PAIR]})
    (bids_dir / "sub-02" / "anat" / "sub-02_notbids.nii.gz").write_bytes(b"")
    code = main([str(bids_dir), str(tmp_path / "out"), "participant", "--participant_label", "01"])
    assert code != 16
    assert "not blocking" in caplog.text and "sub-02_notbids" in caplog.text


def test_unknown_participant_is_18_naming_it(bids_dir, tmp_path, caplog):
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--participant_label", "sub-42",
                 "--skip_bids_validator"]) == 18
    assert "sub-42" in caplog.text


def test_filter_selecting_nothing_is_18(bids_dir, tmp_path, caplog):
    filters = tmp_path / "filter.json"
    filters.write_text(json.dumps({"flair": {"acquisition": "none"}}))
    assert main([str(bids_dir), str(tmp_path / "out"), "participant", "--bids_filter_file", str(filters),
                 "--skip_bids_validator"]) == 18
    assert "flair" in caplog.text


def test_run_py_is_the_entry_point_and_maps_exit_codes(bids_dir, tmp_path):
    completed = subprocess.run([sys.executable, str(REPO / "run.py"), str(bids_dir), str(tmp_path / "out"), "x"],
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 17
    completed = subprocess.run([sys.executable, str(REPO / "run.py"), "-v"], capture_output=True, text=True,
                               check=False)
    assert completed.returncode == 0 and "bids_fcd" in completed.stdout
