"""SLURM: the array script picks the right participant per task; concurrent jobs share one OUTPUT_DIR safely."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fcd import cli
from bids_fcd.derivatives import BIDSIGNORE, derivative_path, init_output_dataset, write_json, write_nifti
from tests.bids_factory import make_dataset

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
LABELS = ["00058", "00043", "control7"]


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A PATH folder whose `apptainer` and `sbatch` print their arguments, one per line, and log each call."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in {
        "apptainer": 'printf "%s\\n" "$@" > "$STUB_LOG.apptainer.$$"; exit "${APPTAINER_EXIT:-0}"',
        "sbatch": 'printf "%s\\n" "$@" >> "$STUB_LOG.sbatch"; echo "---" >> "$STUB_LOG.sbatch"; '
                  'echo "$((4000 + $(grep -c -- --- "$STUB_LOG.sbatch")));cluster"',
    }.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def cohort(tmp_path) -> Path:
    """participants.tsv as ds004199 has it (byte-order mark), plus CRLF and participant_id not first."""
    bids_dir = make_dataset(tmp_path / "bids", {f"sub-{label}": [f"anat/sub-{label}_T1w.nii.gz"] for label in LABELS})
    rows = "".join(f"{age}\tsub-{label}\tfcd\r\n" for age, label in zip((4, 9, 30), LABELS))
    (bids_dir / "participants.tsv").write_bytes(("\ufeffage\tparticipant_id\tgroup\r\n" + rows).encode("utf-8"))
    return bids_dir


def run_script(script: str, args: list[str], stubs: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "log"),
                   "TMPDIR": str(tmp_path / "scratch"), "SLURM_CPUS_PER_TASK": "4", **env}
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    environment.update(env)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(SLURM / script), *args], capture_output=True, text=True, env=environment,
                          check=False)


def apptainer_calls(tmp_path: Path) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted(tmp_path.glob("log.apptainer.*"))]


def run_py_argv(call: list[str], image: str) -> list[str]:
    """What follows the image in `apptainer run ... IMAGE args`: run.py's own arguments."""
    assert call[0] == "run"
    return call[call.index(image) + 1:]


@pytest.mark.parametrize("task", [1, 2, 3])
def test_array_task_runs_the_participant_of_its_row(task, stubs, cohort, tmp_path):
    out = tmp_path / "out"
    result = run_script("participant_array.sbatch", ["img.sif", str(cohort), str(out), "--skip_bids_validator"],
                        stubs, tmp_path, SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_JOB_ID="77")
    assert result.returncode == 0, result.stderr
    [call] = apptainer_calls(tmp_path)
    assert "--nv" in call and "--cleanenv" in call
    argv = run_py_argv(call, "img.sif")
    args = cli.build_parser().parse_args(argv)
    assert args.participant_label == [LABELS[task - 1]]
    assert (args.bids_dir, args.output_dir, args.analysis_level) == (cohort, out, "participant")
    assert args.n_cpus == 4 and args.skip_bids_validator
    assert args.work_dir == tmp_path / "scratch" / f"bids_fcd_77_{task}"
    assert not args.work_dir.exists(), "the task's scratch is left behind"
    assert f"{cohort}:{cohort}:ro" in call, "the input is not mounted read-only"


def test_array_task_beyond_the_table_fails_without_running(stubs, cohort, tmp_path):
    result = run_script("participant_array.sbatch", ["img.sif", str(cohort), str(tmp_path / "out")], stubs,
                        tmp_path, SLURM_ARRAY_TASK_ID=str(len(LABELS) + 1))
    assert result.returncode == 64
    assert "no such row" in result.stderr
    assert apptainer_calls(tmp_path) == []


@pytest.mark.parametrize("script", ["participant_array.sbatch", "submit.sh"])
def test_a_bids_dir_without_participants_tsv_is_66_naming_it(script, stubs, tmp_path):
    result = run_script(script, ["img.sif", str(tmp_path / "nowhere"), str(tmp_path / "out")], stubs, tmp_path,
                        SLURM_ARRAY_TASK_ID="1")
    assert result.returncode == 66 and "nowhere/participants.tsv not found" in result.stderr
    assert apptainer_calls(tmp_path) == [] and not (tmp_path / "log.sbatch").exists()


def test_array_task_passes_on_the_apps_exit_code_and_the_allotted_gpu(stubs, cohort, tmp_path):
    result = run_script("participant_array.sbatch", ["img.sif", str(cohort), str(tmp_path / "out")], stubs,
                        tmp_path, SLURM_ARRAY_TASK_ID="1", APPTAINER_EXIT="65", CUDA_VISIBLE_DEVICES="2")
    assert result.returncode == 65
    [call] = apptainer_calls(tmp_path)
    assert call[call.index("--env") + 1] == "CUDA_VISIBLE_DEVICES=2"
    assert not list((tmp_path / "scratch").iterdir()), "scratch left behind after a failure"


def test_group_script_runs_the_group_level_with_extra_options(stubs, cohort, tmp_path):
    result = run_script("group.sbatch", ["img.sif", str(cohort), str(tmp_path / "out"), "--epochs", "3"], stubs,
                        tmp_path, SLURM_JOB_ID="90")
    assert result.returncode == 0, result.stderr
    [call] = apptainer_calls(tmp_path)
    args = cli.build_parser().parse_args(run_py_argv(call, "img.sif"))
    assert args.analysis_level == "group" and args.epochs == 3 and args.participant_label is None


def test_submit_queues_one_task_per_participant_then_the_dependent_group_job(stubs, cohort, tmp_path):
    out = tmp_path / "out"
    result = run_script("submit.sh", ["img.sif", str(cohort), str(out), "--skip_bids_validator"], stubs, tmp_path)
    assert result.returncode == 0, result.stderr
    array_call, group_call = [c.strip().splitlines() for c in (tmp_path / "log.sbatch").read_text().split("---")
                              if c.strip()]
    assert f"--array=1-{len(LABELS)}" in array_call
    assert array_call[-4:] == ["img.sif", str(cohort), str(out), "--skip_bids_validator"]
    assert Path(array_call[array_call.index(f"--array=1-{len(LABELS)}") + 1]) == SLURM / "participant_array.sbatch"
    assert "--dependency=afterok:4001" in group_call  # the array job's id, without the ;cluster suffix
    assert Path(group_call[group_call.index("--dependency=afterok:4001") + 1]) == SLURM / "group.sbatch"


def test_docs_show_the_array_and_dependent_group_commands():
    text = (REPO / "docs" / "running.md").read_text()
    assert "sbatch --parsable --array=1-$n slurm/participant_array.sbatch" in text
    assert "--dependency=afterok:" in text and "slurm/group.sbatch" in text


# -- many jobs, one OUTPUT_DIR -------------------------------------------------------------------------------

N_PROCESSES = 16
ROUNDS = 50


def _init_and_read(output_dirs: list[str], bids_dir: str, barrier, results) -> None:
    """One 'array task': for each fresh OUTPUT_DIR, start with the others, initialise, and read back at once."""
    problems = []
    for output_dir in output_dirs:
        barrier.wait()
        init_output_dataset(Path(output_dir), Path(bids_dir))
        try:
            description = json.loads((Path(output_dir) / "dataset_description.json").read_text())
            if description.get("DatasetType") != "derivative":
                problems.append(f"{output_dir}: description without DatasetType")
        except (OSError, json.JSONDecodeError) as err:
            problems.append(f"{output_dir}: dataset_description.json unreadable mid-run: {err}")
        lines = (Path(output_dir) / ".bidsignore").read_text().split()
        if sorted(lines) != sorted(set(lines)) or set(lines) != set(BIDSIGNORE):
            problems.append(f"{output_dir}: .bidsignore {lines}")
    results.put(problems)


def test_concurrent_jobs_never_corrupt_the_shared_dataset_files(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    output_dirs = [str(tmp_path / f"out{r}") for r in range(ROUNDS)]
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(N_PROCESSES), context.Queue()
    workers = [context.Process(target=_init_and_read, args=(output_dirs, str(bids_dir), barrier, results))
               for _ in range(N_PROCESSES)]
    for worker in workers:
        worker.start()
    problems = [p for _ in workers for p in results.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert problems == []
    for output_dir in map(Path, output_dirs):
        assert json.loads((output_dir / "dataset_description.json").read_text())["GeneratedBy"][0]["Name"] == \
            "bids_fcd"
        lines = (output_dir / ".bidsignore").read_text().splitlines()
        assert sorted(lines) == sorted(BIDSIGNORE), "each .bidsignore line exactly once"
        assert not list(output_dir.glob(".tmp-*")), "temporary files left behind"


N_FILES = 12


def _write_participant(output_dir: str, bids_dir: str, subject: str, value: float, barrier) -> None:
    barrier.wait()
    init_output_dataset(Path(output_dir), Path(bids_dir))
    for index in range(N_FILES):
        source = {"run": index + 1}
        write_nifti(Path(output_dir) / derivative_path(source, subject, None, label="FCD", suffix="probseg"),
                    np.full((6, 5, 4), value, dtype=np.float32), np.eye(4))
        write_json(Path(output_dir) / derivative_path(source, subject, None, desc="fcd", suffix="prediction",
                                                      extension=".json"), {"subject": subject, "run": index + 1})


def test_concurrent_participants_write_disjoint_files(tmp_path):
    bids_dir = make_dataset(tmp_path / "bids", {"sub-01": ["anat/sub-01_T1w.nii.gz"]})
    out = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    writers = {"01": 0.25, "02": 0.75}
    workers = [context.Process(target=_write_participant, args=(str(out), str(bids_dir), s, v, barrier))
               for s, v in writers.items()]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for subject, value in writers.items():
        files = sorted((out / f"sub-{subject}").rglob("*"))
        images = [f for f in files if f.name.endswith(".nii.gz")]
        sidecars = [f for f in files if f.name.endswith(".json")]
        assert len(images) == len(sidecars) == N_FILES
        assert all(f.name.startswith(f"sub-{subject}_") for f in images + sidecars)
        for image in images:
            assert np.allclose(nib.load(image).get_fdata(), value), image
        for sidecar in sidecars:
            assert json.loads(sidecar.read_text())["subject"] == subject
    assert not list(out.rglob(".tmp-*"))
