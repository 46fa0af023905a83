"""The participant level for one participant/session: preprocess (cached), predict, explain, write, report.

Runs inside a worker process. Everything it writes goes through `derivatives` (atomic, inside OUTPUT_DIR);
its log goes to OUTPUT_DIR/logs/<unit>.log and, on failure, a traceback to OUTPUT_DIR/logs/crash-<unit>.txt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_fcd import __version__, exit_codes
from bids_fcd.config import TEMPLATE_SPACE, ModelConfig
from bids_fcd.derivatives import (
    MNI_XFORM_CODE,
    bids_uri,
    derivative_path,
    safe_join,
    write_json,
    write_nifti,
    write_text,
)
from bids_fcd.inputs import Participant

log = logging.getLogger("bids_fcd.participant")

DEFAULT_MODEL = Path(__file__).parent / "weights" / "model.pt"


class MissingImageError(Exception):
    """A required image (T1w, or a channel the model needs) is absent: exit 66."""


@dataclass(frozen=True)
class ParticipantSettings:
    bids_dir: Path
    output_dir: Path
    work_dir: Path
    model_path: Path
    device: str
    n_threads: int
    seed: int
    n_passes: int


@dataclass
class UnitResult:
    name: str
    code: int
    message: str


def exit_code_for(error: Exception) -> int:
    """The contract's per-participant codes: 65 bad image (or model checkpoint), 66 missing image, 74 I/O;
    anything else 1."""
    from bids_fcd.models import CheckpointError
    from bids_fcd.preprocess import InvalidImageError

    if isinstance(error, (InvalidImageError, CheckpointError)):
        return exit_codes.EXIT_BAD_DATA
    if isinstance(error, (MissingImageError, FileNotFoundError)):
        return exit_codes.EXIT_MISSING_INPUT
    if isinstance(error, OSError):
        return exit_codes.EXIT_IO
    return exit_codes.EXIT_PARTICIPANT_FAILED


def run_participant(unit: Participant, settings: ParticipantSettings) -> UnitResult:
    """Process one unit with its own log file; never raises, so one failure cannot stop the others.

    A success removes the crash file an earlier failed run of the unit left, so that logs/ never reports a
    failure its outputs no longer show.
    """
    logs_dir = settings.output_dir / "logs"
    crash_file = logs_dir / f"crash-{unit.name}.txt"
    try:
        logs_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logs_dir / f"{unit.name}.log", mode="w")
    except OSError as error:
        return UnitResult(unit.name, exit_code_for(error), f"cannot write its log in {logs_dir}: {error}")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        started = time.perf_counter()
        summary = process(unit, settings)
        crash_file.unlink(missing_ok=True)
        log.info("%s finished in %.1f s", unit.name, time.perf_counter() - started)
        return UnitResult(unit.name, 0, summary)
    except Exception as error:  # noqa: BLE001 - every failure is recorded, with its code, for the summary
        code = exit_code_for(error)
        log.error("%s failed: %s", unit.name, error)
        with contextlib.suppress(OSError):  # the summary still names the failure
            write_text(crash_file, f"{unit.name} failed with exit code {code}\n{error}\n\n{traceback.format_exc()}")
        return UnitResult(unit.name, code, str(error))
    finally:
        root.removeHandler(handler)
        handler.close()


def require_images(unit: Participant, channels: tuple[str, ...]) -> None:
    folder = f"sub-{unit.subject}" + (f"/ses-{unit.session}" if unit.session else "") + "/anat"

    def absent(suffix: str) -> str:
        excluded = unit.filtered_out.get(suffix)
        if excluded:
            return f"no {suffix} image in {folder} passes the --bids_filter_file query (it excludes {excluded})"
        return f"no {suffix} image found in {folder}"

    for image in (unit.t1w, unit.flair):
        if image is not None and image.is_symlink() and not image.exists():
            raise MissingImageError(f"{unit.name}: {image} is a broken symlink to {os.readlink(image)} "
                                    "(a DataLad file not yet fetched? `datalad get` it)")
    if unit.t1w is None:
        raise MissingImageError(f"{unit.name}: {absent('T1w')}")
    if "FLAIR" in channels and unit.flair is None:
        raise MissingImageError(f"{unit.name}: {absent('FLAIR')}; the model needs T1w and FLAIR")


def process(unit: Participant, settings: ParticipantSettings) -> str:
    """The whole participant level for one unit; returns a one-line summary for the progress log."""
    import torch

    from bids_fcd import infer

    torch.set_num_threads(settings.n_threads)
    with scratch_files_in(settings.work_dir):
        return predict_and_write(unit, settings, device=infer.select_device(settings.device))


@contextlib.contextmanager
def scratch_files_in(folder: Path):
    """Libraries' scratch files go to the run's work dir, and only while this unit runs.

    The work dir is deleted after the run; a process-wide tempdir left pointing at it would break
    every later temporary file in the same process (the test suite, an in-process caller).
    """
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def predict_and_write(unit: Participant, settings: ParticipantSettings, device) -> str:
    """Preprocess (cached), predict, find clusters, write every derivative and the report."""
    from bids_fcd import cache, infer, models, preprocess, report
    from bids_fcd.template import model_grid

    model_path = settings.model_path
    model, config = models.load_checkpoint(model_path, device)
    require_images(unit, config.channels)
    grid = model_grid(config.grid_spacing_mm, config.grid_shape)

    writer = UnitWriter(unit, settings)
    writer.withdraw_finished_marks()
    pre = cache.load_or_preprocess(settings.output_dir / "cache", unit.t1w, unit.flair, grid,
                                   n_threads=settings.n_threads, logger=log)
    writer.write_preprocessed(pre, config)
    qc_warnings = preprocess.qc_warnings(pre.qc, pre.brain_extraction)
    for warning in qc_warnings:
        log.warning("%s: preprocessing QC: %s", unit.name, warning)

    channels = preprocess.channels_array(pre, config.channels)
    prediction = infer.predict(model, config, channels, pre.brain_mask, device, n_passes=settings.n_passes,
                               seed=settings.seed)
    native_scale = native_volume_scale(pre)
    clusters = infer.find_clusters(prediction.prob_template, grid, config.voxel_threshold, config.min_cluster_mm3,
                                   to_scanner_mm=lambda points: preprocess.template_points_to_scanner(points, pre),
                                   native_voxel_volume_scale=native_scale)
    outputs = writer.write_prediction(pre, prediction, clusters, config, model_path, qc_warnings)
    figures = preprocess.qc_figures(pre, settings.output_dir / f"sub-{unit.subject}" / "figures", unit.name)
    report.write_participant_report(settings.output_dir, unit, pre, prediction, clusters, config, outputs, figures,
                                    qc_warnings)
    return (f"fcd_probability={prediction.fcd_probability:.3f} ({outputs['predicted']}), "
            f"{len(clusters)} candidate cluster(s)")


def native_volume_scale(pre) -> float:
    """mm3 in the participant's head per mm3 of template space: |det| of the template->T1w linear map."""
    from bids_fcd.preprocess import ras_matrix

    return float(abs(np.linalg.det(ras_matrix(pre.xfm_t1w_to_template)[:3, :3])))


class UnitWriter:
    """Writes one unit's derivatives under BIDS names built from its source images' entities."""

    def __init__(self, unit: Participant, settings: ParticipantSettings):
        self.unit = unit
        self.settings = settings

    def path(self, source_entities: dict, **entities) -> Path:
        relative = derivative_path(source_entities, self.unit.subject, self.unit.session, **entities)
        return safe_join(self.settings.output_dir, relative)

    def source_uri(self, image: Path) -> str:
        """Not resolve(): DataLad inputs are symlinks into .git/annex, and the URI must name the BIDS path."""
        return bids_uri(Path(os.path.abspath(image)).relative_to(self.settings.bids_dir))

    def withdraw_finished_marks(self) -> None:
        """Remove the unit's prediction JSON and report, which a run writes last, before a rerun writes anything:
        a rerun that then fails cannot pass for a finished run (its crash file says what happened)."""
        for path in (self.path(self.unit.t1w_entities, desc="fcd", suffix="prediction", extension=".json"),
                     safe_join(self.settings.output_dir, Path(f"{self.unit.name}.html"))):
            path.unlink(missing_ok=True)

    def write_preprocessed(self, pre, config: ModelConfig) -> None:
        """desc-preproc T1w/FLAIR and the brain mask in template space, with sidecars; both transforms."""
        from bids_fcd.preprocess import write_transform

        unit, affine = self.unit, pre.grid.affine
        images = [("T1w", unit.t1w, unit.t1w_entities, pre.t1w)]
        if pre.flair is not None:
            images.append(("FLAIR", unit.flair, unit.flair_entities, pre.flair))
        for suffix, source, entities, volume in images:
            path = self.path(entities, space=TEMPLATE_SPACE, desc="preproc", suffix=suffix, extension=".nii.gz")
            write_nifti(path, volume, affine, xform_code=MNI_XFORM_CODE)
            write_json(self.path(entities, space=TEMPLATE_SPACE, desc="preproc", suffix=suffix,
                                 extension=".json"), {
                "SkullStripped": True,
                "Sources": [self.source_uri(source)] + ([self.source_uri(unit.t1w)] if suffix == "FLAIR" else []),
                "SpatialReference": TEMPLATE_SPACE,
                "Resolution": f"{config.grid_spacing_mm} mm isotropic, {list(config.grid_shape)} voxels",
                "Normalisation": config.normalisation,
                "BrainExtraction": pre.brain_extraction,
            })
        write_nifti(self.path(unit.t1w_entities, space=TEMPLATE_SPACE, desc="brain", suffix="mask",
                              extension=".nii.gz"), pre.brain_mask, affine, dtype=np.uint8, xform_code=MNI_XFORM_CODE)
        write_transform(pre.xfm_t1w_to_template, self.path(
            unit.t1w_entities, **{"from": "T1w", "to": TEMPLATE_SPACE, "mode": "image"}, suffix="xfm",
            extension=".txt"))
        if pre.xfm_flair_to_t1w is not None:
            write_transform(pre.xfm_flair_to_t1w, self.path(
                unit.flair_entities, **{"from": "FLAIR", "to": "T1w", "mode": "image"}, suffix="xfm",
                extension=".txt"))

    def write_prediction(self, pre, prediction, clusters, config: ModelConfig, model_path: Path,
                         qc_warnings: list[str]) -> dict:
        """Probability, saliency and uncertainty maps (native and template) and the prediction JSON."""
        from bids_fcd.preprocess import template_to_native

        unit, entities = self.unit, self.unit.t1w_entities
        outputs = {}
        maps = [("probability", None, prediction.prob_template, True),
                ("saliency", "saliency", prediction.saliency_template, True),
                ("uncertainty", "uncertainty", prediction.uncertainty_template, False)]
        for name, desc, volume_template, also_template in maps:
            native = template_to_native(volume_template, pre, unit.t1w, order=1)
            path = self.path(entities, label="FCD", desc=desc, suffix="probseg", extension=".nii.gz")
            write_nifti(path, np.clip(native.get_fdata(), 0, None), native.affine)
            outputs[f"{name}_native"] = path
            if also_template:
                path = self.path(entities, space=TEMPLATE_SPACE, label="FCD", desc=desc, suffix="probseg",
                                 extension=".nii.gz")
                write_nifti(path, volume_template, pre.grid.affine, xform_code=MNI_XFORM_CODE)
                outputs[f"{name}_template"] = path
        write_json(self.path(entities, label="FCD", suffix="probseg", extension=".json"), {
            "Description": "Voxel-wise probability of focal cortical dysplasia (research use only)",
            "Sources": [self.source_uri(unit.t1w)] + ([self.source_uri(unit.flair)] if unit.flair else []),
            "Model": config.name, "ModelVersion": config.model_version,
            "VoxelThreshold": config.voxel_threshold,
        })
        # The call is made on the probability as written, so that the JSON never contradicts its own rule.
        probability = round(float(prediction.fcd_probability), 6)
        predicted = "fcd" if probability >= config.subject_threshold else "control"
        outputs["predicted"] = predicted
        outputs["prediction_json"] = write_json(
            self.path(entities, desc="fcd", suffix="prediction", extension=".json"), {
                "fcd_probability": probability,
                "predicted": predicted,
                "threshold": config.subject_threshold,
                "threshold_rule": config.training.get("threshold_rule", "not recorded with the model"),
                "voxel_threshold": config.voxel_threshold,
                "model": {"name": config.name, "version": config.model_version, "path": str(model_path),
                          "architecture": config.architecture},
                "bids_fcd_version": __version__,
                "n_passes": prediction.n_passes,
                "clusters": [cluster.to_json() for cluster in clusters],
                "qc_warnings": qc_warnings,
                "notice": "Research use only; not a medical device. "
                          + ("The default model was trained on simulated lesions implanted in template and real "
                             "anatomy." if model_path == DEFAULT_MODEL.resolve() else
                             "Model trained by the group level: see its model card."),
            })
        return outputs
