"""The participant level on real scans, with the shipped model: a BIDS dataset made of the stroke brain (brain-only,
T1w and FLAIR on one 1 mm grid) and the raw MS session (skull, 3 mm slices, T1w and FLAIR on different grids).

Every contract output exists, the native-space maps lie on each participant's own T1w grid, the candidates carry
scanner coordinates inside that participant's head, and the whole output dataset passes the official validator.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_fcd.cli import main
from bids_fcd.participant import DEFAULT_MODEL
from bids_fcd.validation import run_validator
from tests.fixtures_real import MS_FLAIR, MS_T1W, STROKE_FLAIR, STROKE_T1W, real_data  # noqa: F401

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"{DEFAULT_MODEL} is not built yet")

SOURCES = {"cstar01": (STROKE_T1W, STROKE_FLAIR), "msl12": (MS_T1W, MS_FLAIR)}


@pytest.fixture(scope="module")
def real_run(real_data, tmp_path_factory):  # noqa: F811 - the fixture imported above
    bids_dir = tmp_path_factory.mktemp("real") / "bids"
    bids_dir.mkdir()
    (bids_dir / "dataset_description.json").write_text(json.dumps({"Name": "real scans", "BIDSVersion": "1.9.0"}))
    (bids_dir / "README").write_text("Real T1w + FLAIR scans from ../shared/data/real, for a test.\n")
    for subject, (t1w, flair) in SOURCES.items():
        anat = bids_dir / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(t1w, anat / f"sub-{subject}_T1w.nii.gz")
        shutil.copy(flair, anat / f"sub-{subject}_FLAIR.nii.gz")
    out = bids_dir.parent / "out"
    code = main([str(bids_dir), str(out), "participant", "--n_cpus", "2", "--n_passes", "2"])
    return bids_dir, out, code


def test_real_scans_run_end_to_end(real_run):
    _, out, code = real_run
    assert code == 0, [path.read_text() for path in (out / "logs").glob("crash-*.txt")]
    for subject in SOURCES:
        anat = out / f"sub-{subject}" / "anat"
        for name in (f"sub-{subject}_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz",
                     f"sub-{subject}_space-MNI152NLin2009aSym_desc-preproc_FLAIR.nii.gz",
                     f"sub-{subject}_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz",
                     f"sub-{subject}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.txt",
                     f"sub-{subject}_from-FLAIR_to-T1w_mode-image_xfm.txt",
                     f"sub-{subject}_label-FCD_probseg.nii.gz",
                     f"sub-{subject}_space-MNI152NLin2009aSym_label-FCD_probseg.nii.gz",
                     f"sub-{subject}_label-FCD_desc-saliency_probseg.nii.gz",
                     f"sub-{subject}_label-FCD_desc-uncertainty_probseg.nii.gz",
                     f"sub-{subject}_desc-fcd_prediction.json"):
            assert (anat / name).is_file(), name
        assert (out / f"sub-{subject}.html").is_file()


def test_native_maps_lie_on_each_participants_own_t1w_grid(real_run):
    _, out, _ = real_run
    for subject, (t1w, _) in SOURCES.items():
        source = nib.load(str(t1w))
        prob = nib.load(str(out / f"sub-{subject}" / "anat" / f"sub-{subject}_label-FCD_probseg.nii.gz"))
        assert prob.shape == source.shape[:3]
        assert np.allclose(prob.affine, source.affine, atol=1e-3)
        values = np.asarray(prob.dataobj)
        assert values.min() >= 0.0 and values.max() <= 1.0


def test_candidates_are_in_scanner_mm_inside_the_head(real_run):
    _, out, _ = real_run
    for subject, (t1w, _) in SOURCES.items():
        prediction = json.loads((out / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-fcd_prediction.json")
                                .read_text())
        assert 0.0 <= prediction["fcd_probability"] <= 1.0
        assert prediction["predicted"] in ("fcd", "control")
        source = nib.load(str(t1w))
        to_voxel = np.linalg.inv(source.affine)
        for cluster in prediction["clusters"]:
            voxel = nib.affines.apply_affine(to_voxel, cluster["peak_mm"])
            assert np.all(voxel > -2) and np.all(voxel < np.array(source.shape[:3]) + 2), (subject, cluster)


def test_real_output_dataset_passes_the_official_validator(real_run):
    _, out, _ = real_run
    assert [issue for issue in run_validator(out) if issue["severity"] == "error"] == []
