"""Derivative names, dataset_description, .bidsignore, atomic writes, and the validator on the result."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from bids_fcd.config import TEMPLATE_SPACE
from bids_fcd.derivatives import (
    atomic_path,
    derivative_path,
    init_output_dataset,
    safe_join,
    source_dataset_entry,
    write_json,
    write_nifti,
)
from bids_fcd.validation import run_validator
from tests.bids_factory import make_dataset

T1W = {"acquisition": "iso08", "run": 2}
FLAIR = {"acquisition": "T2sel"}
CONTRACT_NAMES = [
    (T1W, {"space": TEMPLATE_SPACE, "desc": "preproc", "suffix": "T1w"},
     "sub-01_acq-iso08_run-2_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"),
    (FLAIR, {"space": TEMPLATE_SPACE, "desc": "preproc", "suffix": "FLAIR"},
     "sub-01_acq-T2sel_space-MNI152NLin2009aSym_desc-preproc_FLAIR.nii.gz"),
    (T1W, {"space": TEMPLATE_SPACE, "desc": "brain", "suffix": "mask"},
     "sub-01_acq-iso08_run-2_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz"),
    (T1W, {"from": "T1w", "to": TEMPLATE_SPACE, "mode": "image", "suffix": "xfm", "extension": ".txt"},
     "sub-01_acq-iso08_run-2_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt"),
    (FLAIR, {"from": "FLAIR", "to": "T1w", "mode": "image", "suffix": "xfm", "extension": ".txt"},
     "sub-01_acq-T2sel_from-FLAIR_to-T1w_mode-image_xfm.txt"),
    (T1W, {"label": "FCD", "suffix": "probseg"}, "sub-01_acq-iso08_run-2_label-FCD_probseg.nii.gz"),
    (T1W, {"space": TEMPLATE_SPACE, "label": "FCD", "suffix": "probseg"},
     "sub-01_acq-iso08_run-2_space-MNI152NLin2009aSym_label-FCD_probseg.nii.gz"),
    (T1W, {"label": "FCD", "desc": "saliency", "suffix": "probseg"},
     "sub-01_acq-iso08_run-2_label-FCD_desc-saliency_probseg.nii.gz"),
    (T1W, {"label": "FCD", "desc": "uncertainty", "suffix": "probseg"},
     "sub-01_acq-iso08_run-2_label-FCD_desc-uncertainty_probseg.nii.gz"),
    (T1W, {"desc": "fcd", "suffix": "prediction", "extension": ".json"}, "sub-01_acq-iso08_run-2_desc-fcd_prediction.json"),
]


@pytest.mark.parametrize("source,entities,expected", CONTRACT_NAMES)
def test_names_follow_the_contract(source, entities, expected):
    path = derivative_path(source, "01", None, **entities)
    assert path == Path("sub-01/anat") / expected


def test_session_goes_into_folder_and_name():
    path = derivative_path({}, "01", "pre", label="FCD", suffix="probseg")
    assert path == Path("sub-01/ses-pre/anat/sub-01_ses-pre_label-FCD_probseg.nii.gz")


def test_unknown_suffix_is_refused_rather_than_misnamed():
    with pytest.raises(ValueError):
        derivative_path({}, "01", None, suffix="bold")


def test_paths_outside_the_output_directory_are_refused(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        safe_join(tmp_path, Path("../escape.txt"))
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside"):
        safe_join(tmp_path, Path("link/escape.txt"))


def test_atomic_write_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    final = tmp_path / "a" / "out.json"
    with pytest.raises(RuntimeError), atomic_path(final) as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash mid-write")
    assert not final.exists() and list(final.parent.iterdir()) == []
    write_json(final, {"ok": True})
    assert json.loads(final.read_text()) == {"ok": True}


def test_atomic_writes_are_readable_by_others_as_the_umask_allows(tmp_path):
    """mkstemp creates private files; outputs shared with a lab (or read by a container's other user) must not be."""
    previous = os.umask(0o022)
    try:
        path = write_json(tmp_path / "out.json", {"ok": True})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_written_derivatives_pass_the_official_validator(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    out = tmp_path / "out"
    init_output_dataset(out, bids_dir)
    volume = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    for source, entities, _ in CONTRACT_NAMES:
        path = out / derivative_path(source, "01", None, **entities)
        if path.name.endswith(".nii.gz"):
            write_nifti(path, volume, np.diag([2.0, 2.0, 2.0, 1.0]))
        elif path.name.endswith(".json"):
            write_json(path, {"fcd_probability": 0.1})
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#Insight Transform File V1.0\n")
        if "desc-preproc" in path.name:
            write_json(path.with_name(path.name.replace(".nii.gz", ".json")),
                       {"SkullStripped": True, "Sources": ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]})
    (out / "sub-01.html").write_text("<html></html>")
    for folder in ("sub-01/figures", "cache/abc", "logs", "group/fold-1", "work/run-1"):
        (out / folder).mkdir(parents=True)
        (out / folder / "some_file.txt").write_text("not BIDS")
    errors = [i for i in run_validator(out) if i["severity"] == "error"]
    assert errors == []


def test_dataset_description_names_generator_and_source(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    out = tmp_path / "out"
    init_output_dataset(out, bids_dir)
    init_output_dataset(out, bids_dir)  # a second job sharing OUTPUT_DIR changes nothing
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "bids_fcd"
    assert description["GeneratedBy"][0]["Version"] == (Path(__file__).parents[1] / "version").read_text().strip()
    assert description["SourceDatasets"][0]["URL"].startswith("file://")
    ignored = (out / ".bidsignore").read_text().split()
    assert ignored.count("*_xfm.*") == 1 and "cache" in ignored and "group" in ignored


def test_a_numeric_dataset_doi_is_still_a_doi(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    (bids_dir / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0",
                                                                    "DatasetDOI": 10.18112}))
    assert source_dataset_entry(bids_dir)["DOI"] == "doi:10.18112"
