"""Brainlife App: config.json -> BIDS dataset, derivatives -> output/ + product.json, and `main` end to end."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bids_fcd import brainlife, cli
from bids_fcd.config import TEMPLATE_SPACE
from bids_fcd.derivatives import derivative_path, write_json, write_nifti
from bids_fcd.inputs import discover
from bids_fcd.participant import DEFAULT_MODEL
from bids_fcd.validation import run_validator
from tests.bids_factory import write_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def job(tmp_path) -> Path:
    """A Brainlife job folder: inputs in a sibling folder (as Brainlife stages them), config.json inside."""
    inputs = tmp_path / "inputs"
    write_image(inputs / "t1.nii.gz", shape=(10, 12, 9), seed=1)
    write_image(inputs / "flair.nii.gz", shape=(8, 8, 8), zooms=(3.0, 3.0, 3.0), seed=2)
    write_image(inputs / "mask.nii.gz", shape=(8, 8, 8), zooms=(3.0, 3.0, 3.0), seed=3)
    folder = tmp_path / "job"
    folder.mkdir()
    return folder


def write_config(job: Path, **content) -> Path:
    path = job / "config.json"
    path.write_text(json.dumps({"t1": "../inputs/t1.nii.gz", "flair": "../inputs/flair.nii.gz", **content}))
    return path


# -- config.json -> BIDS dataset -----------------------------------------------------------------------------

def test_config_paths_are_relative_to_config_and_brainlife_keys_ignored(job):
    config = brainlife.read_config(write_config(job, mask="../inputs/mask.nii.gz", device="cpu", n_passes=8.0,
                                                _inputs=[{"id": "t1"}], _tid=3, seed=None))
    assert config.t1 == (job / "../inputs/t1.nii.gz").absolute() and config.t1.is_file()
    assert config.mask.name == "mask.nii.gz"
    assert config.options == {"device": "cpu", "n_passes": 8}


@pytest.mark.parametrize("content,code,message", [
    ({"n_pases": 4}, 64, "unknown key(s) n_pases"),
    ({"flair": ""}, 66, "'flair' is required"),
    ({"t1": "../inputs/none.nii.gz"}, 66, "does not exist"),
    ({"mask": "../inputs/t1.txt"}, 65, "not NIfTI"),
    ({"n_passes": 0}, 64, "n_passes 0: argument --n_passes: must be >= 1"),
    ({"seed": -3}, 64, "seed -3"),
])
def test_unusable_config_is_refused_with_the_contract_code(job, content, code, message):
    (job.parent / "inputs" / "t1.txt").write_text("not an image")
    with pytest.raises(brainlife.ConfigError, match=re.escape(message)) as info:
        brainlife.read_config(write_config(job, **content))
    assert info.value.exit_code == code


def test_bids_dataset_is_valid_and_read_as_one_participant(job):
    config = brainlife.read_config(write_config(job, mask="../inputs/mask.nii.gz"))
    bids_dir = brainlife.build_bids_dataset(config, job / "bids")
    anat = bids_dir / "sub-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == ["sub-01_FLAIR.nii.gz", "sub-01_FLAIR_roi.nii.gz",
                                                      "sub-01_T1w.nii.gz"]
    assert not any(p.is_symlink() for p in anat.iterdir())
    assert (anat / "sub-01_T1w.nii.gz").read_bytes() == config.t1.read_bytes()
    errors = [i for i in run_validator(bids_dir) if i.get("severity") == "error"]
    assert errors == []
    [unit] = discover(bids_dir)
    assert (unit.subject, unit.t1w.name, unit.flair.name) == ("01", "sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz")
    assert unit.lesion_mask.name == "sub-01_FLAIR_roi.nii.gz" and unit.lesion_mask_space == "FLAIR"


def test_mask_on_the_t1w_grid_is_named_after_the_t1w(job):
    write_image(job.parent / "inputs" / "mask_t1.nii", shape=(10, 12, 9), seed=4)
    config = brainlife.read_config(write_config(job, mask="../inputs/mask_t1.nii"))
    bids_dir = brainlife.build_bids_dataset(config, job / "bids")
    [unit] = discover(bids_dir)
    assert unit.lesion_mask.name == "sub-01_T1w_roi.nii" and unit.lesion_mask_space == "T1w"


def test_rebuilding_in_the_same_job_folder_replaces_the_images(job):
    config = brainlife.read_config(write_config(job))
    brainlife.build_bids_dataset(config, job / "bids")
    write_image(job.parent / "inputs" / "t1_new.nii.gz", seed=9)
    config = brainlife.read_config(write_config(job, t1="../inputs/t1_new.nii.gz"))
    bids_dir = brainlife.build_bids_dataset(config, job / "bids")
    assert (bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes() == config.t1.read_bytes()


def test_participant_command_line_is_run_py_on_sub_01_with_the_options(job):
    config = brainlife.read_config(write_config(job, device="cpu", n_passes=2, seed=5, n_cpus=3))
    argv = brainlife.participant_argv(config, job / "bids", job / "derivatives")
    args = cli.build_parser().parse_args(argv)
    assert (args.bids_dir, args.output_dir, args.analysis_level) == (job / "bids", job / "derivatives",
                                                                      "participant")
    assert args.participant_label == ["01"] and args.skip_bids_validator
    assert (args.device, args.n_passes, args.seed, args.n_cpus) == ("cpu", 2, 5, 3)
    default = cli.build_parser().parse_args(brainlife.participant_argv(brainlife.read_config(write_config(job)),
                                                                       job / "bids", job / "derivatives"))
    assert default.n_cpus == len(os.sched_getaffinity(0))


def test_bad_option_value_fails_with_64_and_an_error_product_naming_the_key(job):
    assert brainlife.main([str(write_config(job, device="tpu"))]) == 64
    product = json.loads((job / "product.json").read_text())
    assert product["brainlife"][0]["type"] == "error" and "device 'tpu'" in product["brainlife"][0]["msg"]
    assert not (job / "output").exists()


def test_config_that_is_not_an_object_is_64(job):
    (job / "config.json").write_text("[1, 2]")
    assert brainlife.main([str(job / "config.json")]) == 64
    assert "expected a JSON object" in json.loads((job / "product.json").read_text())["brainlife"][0]["msg"]


def test_a_run_failing_before_any_participant_says_why_in_the_product(job, monkeypatch):
    def fails_early(argv):
        logging.getLogger("bids_fcd").error("model checkpoint /x.pt does not exist")
        return 66

    monkeypatch.setattr(brainlife.cli, "main", fails_early)
    assert brainlife.main([str(write_config(job))]) == 66
    message = json.loads((job / "product.json").read_text())["brainlife"][0]["msg"]
    assert message == "bids_fcd exited with code 66: model checkpoint /x.pt does not exist"


def test_missing_input_fails_with_66_and_says_which(job):
    assert brainlife.main([str(write_config(job, flair=None))]) == 66
    assert "'flair' is required" in json.loads((job / "product.json").read_text())["brainlife"][0]["msg"]


def test_a_failed_participant_is_reported_with_its_crash_summary(tmp_path):
    logs = tmp_path / "derivatives" / "logs"
    logs.mkdir(parents=True)
    (logs / "crash-sub-01.txt").write_text("sub-01 failed with exit code 65\nnot a NIfTI image\n\nTraceback ...")
    assert brainlife.failure_message(tmp_path / "derivatives", 65, ["ignored"]) == \
        "sub-01 failed with exit code 65 not a NIfTI image"
    assert "code 74" in brainlife.failure_message(tmp_path / "nothing", 74, [])


# -- derivatives -> Brainlife outputs -----------------------------------------------------------------------

PREDICTION = {
    "fcd_probability": 0.8312, "predicted": "fcd", "threshold": 0.5, "voxel_threshold": 0.5,
    "model": {"name": "default", "version": "1"},
    "clusters": [{"id": i, "volume_mm3": 812.0 / i, "peak_mm": [1.0, 2.0, 3.0], "centroid_mm": [1.0, 2.0, 3.0],
                  "peak_probability": 0.9, "mean_probability": 0.7, "atlas": "Harvard-Oxford",
                  "region": f"Region {i}", "peak_template_mm": [0.0, 0.0, 0.0]} for i in range(1, 9)],
}


def fake_derivatives(root: Path) -> Path:
    """What the participant level writes for sub-01, by the same name builder, with distinct contents."""
    for index, entities in enumerate(brainlife.OUTPUT_FILES.values()):
        path = root / derivative_path({}, "01", None, **entities)
        if path.name.endswith(".json"):
            write_json(path, PREDICTION)
        else:
            write_nifti(path, np.full((4, 5, 6), index / 10, dtype=np.float32), np.eye(4))
    figures = root / "sub-01" / "figures"
    figures.mkdir(parents=True)
    (figures / "sub-01_desc-prob_overlay.png").write_bytes(b"png")
    (root / "sub-01.html").write_text('<img src="sub-01/figures/sub-01_desc-prob_overlay.png">\n'
                                      "<h2>Inputs and outputs</h2><table></table>")
    return root


def test_outputs_are_the_participants_maps_report_and_prediction(tmp_path):
    derivatives = fake_derivatives(tmp_path / "derivatives")
    output = tmp_path / "output"
    brainlife.write_outputs(derivatives, output)
    for target, entities in brainlife.OUTPUT_FILES.items():
        source = derivatives / derivative_path({}, "01", None, **entities)
        assert (output / target).read_bytes() == source.read_bytes(), target
    assert {p.parent.name for p in output.glob("*/*")} == {"probability", "saliency", "uncertainty", "report"}
    assert (output / "probability" / f"probability_{TEMPLATE_SPACE}.nii.gz").is_file()
    index = (output / "report" / "index.html").read_text()
    for link in re.findall(r'src="([^"]+)"', index):
        assert (output / "report" / link).is_file(), f"the report's link {link} is broken"
    # the report names BIDS derivatives; the Brainlife copy says where each was delivered
    assert "probability/probability.nii.gz (from sub-01_label-FCD_probseg.nii.gz)" in index


def test_product_carries_the_subject_probability_and_a_ui_message(tmp_path):
    product = brainlife.write_outputs(fake_derivatives(tmp_path / "derivatives"), tmp_path / "output")
    assert product["fcd_probability"] == pytest.approx(0.8312)
    assert product["predicted"] == "fcd" and product["n_clusters"] == 8
    info = product["brainlife"][0]
    assert info["type"] == "info" and "FCD probability 0.83" in info["msg"] and "Region 1" in info["msg"]
    assert len(product["clusters"]) == brainlife.MAX_CLUSTERS_IN_PRODUCT
    assert len(json.dumps(product)) < 4000, "product.json must stay a few kB"


def test_missing_derivative_is_named(tmp_path):
    derivatives = fake_derivatives(tmp_path / "derivatives")
    saliency = derivatives / derivative_path({}, "01", None, **brainlife.OUTPUT_FILES["saliency/saliency.nii.gz"])
    saliency.unlink()
    with pytest.raises(FileNotFoundError, match="desc-saliency_probseg"):
        brainlife.write_outputs(derivatives, tmp_path / "output")


# -- main ----------------------------------------------------------------------------------------------------

def test_main_is_an_executable_bash_script_at_the_root_running_the_module():
    main = REPO / "main"
    assert os.access(main, os.X_OK)
    text = main.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert text.count("python3 -m bids_fcd.brainlife config.json") == 2  # local, and inside the image
    assert subprocess.run(["bash", "-n", str(main)], check=False).returncode == 0


def test_main_without_bids_fcd_runs_the_versioned_image_with_apptainer(tmp_path):
    """On Brainlife: no bids_fcd on the host, so `main` runs the image of this version via apptainer."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "python3").write_text("#!/bin/bash\nexit 1\n")  # a host Python without bids_fcd
    (stubs / "apptainer").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    result = subprocess.run([str(REPO / "main")], cwd=tmp_path, capture_output=True, text=True, check=False,
                            env={**os.environ, "PATH": f"{stubs}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    version = (REPO / "version").read_text().strip()
    assert result.stdout.split() == ["exec", "-e", "--nv", f"docker://bidsfcd/bids_fcd:{version}", "python3", "-m",
                                     "bids_fcd.brainlife", "config.json"]


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason=f"the shipped model {DEFAULT_MODEL} is not built yet")
def test_main_end_to_end_on_a_synthetic_participant(tmp_path):
    assert cli.main(["synth", str(tmp_path / "synth"), "--n", "4", "--seed", "3"]) == 0
    t1 = min((tmp_path / "synth").rglob("sub-*_T1w.nii.gz"))
    flair = min(t1.parent.glob("*_FLAIR.nii.gz"))
    job = tmp_path / "job"
    job.mkdir()
    (job / "config.json").write_text(json.dumps({"t1": str(t1), "flair": str(flair), "device": "cpu",
                                                 "n_passes": 2, "n_cpus": 2, "_tid": 1}))
    python_dir = Path(sys.executable).parent  # the `python3` that has bids_fcd, as in the image
    result = subprocess.run([str(REPO / "main")], cwd=job, capture_output=True, text=True, check=False,
                            env={**os.environ, "PATH": f"{python_dir}:{os.environ['PATH']}"}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    product = json.loads((job / "product.json").read_text())
    assert 0.0 <= product["fcd_probability"] <= 1.0 and product["predicted"] in ("fcd", "control")
    assert product["brainlife"][0]["msg"].startswith("FCD probability")
    for target in brainlife.OUTPUT_FILES:
        assert (job / "output" / target).is_file(), target
    assert (job / "output" / "report" / "index.html").is_file()
