"""Brainlife App: config.json -> a one-participant BIDS dataset -> the participant level -> Brainlife outputs.

Brainlife runs the repository's `main` in a job directory that holds `config.json`; `main` runs
`python -m bids_fcd.brainlife config.json` (inside the Docker image on Brainlife). In the job directory:

    config.json               from Brainlife: t1, flair, optional mask, options (device, n_passes, seed, n_cpus)
    bids/                     the one-participant BIDS dataset built from the inputs (sub-01)
    derivatives/              the BIDS App's OUTPUT_DIR: the full derivatives dataset, logs and cache
    output/probability/       probability.nii.gz (T1w grid), probability_MNI152NLin2009aSym.nii.gz, prediction.json
    output/saliency/          saliency.nii.gz (T1w grid), saliency_MNI152NLin2009aSym.nii.gz
    output/uncertainty/       uncertainty.nii.gz (T1w grid)
    output/report/            index.html (the participant report) and its figures
    product.json              the subject-level FCD probability and a message for the Brainlife UI

Two steps are plain functions, testable without a model: `build_bids_dataset` (config -> BIDS) and
`write_outputs` (derivatives -> Brainlife outputs and product).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bids_fcd import __version__, cli, exit_codes
from bids_fcd.config import TEMPLATE_SPACE
from bids_fcd.derivatives import derivative_path, write_json, write_text
from bids_fcd.inputs import same_grid

log = logging.getLogger("bids_fcd.brainlife")

SUBJECT = "01"
IMAGE_KEYS = ("t1", "flair", "mask")
# config.json options, passed to the participant level as `--<key> <value>`; the app's parser checks values.
OPTION_KEYS = ("device", "n_passes", "seed", "n_cpus")
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
MAX_CLUSTERS_IN_PRODUCT = 5  # product.json must stay a few kB

# Brainlife output file -> the derivative it is copied from (entities of the T1w, which has none here).
OUTPUT_FILES = {
    "probability/probability.nii.gz": {"label": "FCD", "suffix": "probseg"},
    f"probability/probability_{TEMPLATE_SPACE}.nii.gz": {"space": TEMPLATE_SPACE, "label": "FCD",
                                                          "suffix": "probseg"},
    "probability/prediction.json": {"desc": "fcd", "suffix": "prediction", "extension": ".json"},
    "saliency/saliency.nii.gz": {"label": "FCD", "desc": "saliency", "suffix": "probseg"},
    f"saliency/saliency_{TEMPLATE_SPACE}.nii.gz": {"space": TEMPLATE_SPACE, "label": "FCD", "desc": "saliency",
                                                    "suffix": "probseg"},
    "uncertainty/uncertainty.nii.gz": {"label": "FCD", "desc": "uncertainty", "suffix": "probseg"},
}


class ConfigError(Exception):
    """config.json is unusable; `exit_code` is the contract's code (64 usage, 65 bad image, 66 missing)."""

    def __init__(self, message: str, exit_code: int = exit_codes.EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BrainlifeConfig:
    """The inputs of one Brainlife job: absolute image paths and the participant-level options."""

    t1: Path
    flair: Path
    mask: Path | None = None
    options: dict = field(default_factory=dict)  # option name (without --) -> value


def read_config(path: Path) -> BrainlifeConfig:
    """Read Brainlife's config.json; relative image paths are relative to its folder.

    Keys starting with `_` are Brainlife's own (`_inputs`, `_tid`, ...) and ignored; any other unknown key is an
    error, so that a misspelt option is never silently dropped. Empty or null values mean "not given".
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path} not found", exit_codes.EXIT_MISSING_INPUT) from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of keys, got {type(raw).__name__}")
    given = {k: v for k, v in raw.items() if not k.startswith("_") and v not in (None, "")}
    unknown = sorted(set(given) - set(IMAGE_KEYS) - set(OPTION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: "
                          f"{', '.join(IMAGE_KEYS + OPTION_KEYS)}")
    images = {}
    for key in IMAGE_KEYS:
        if key not in given:
            if key == "mask":
                continue
            raise ConfigError(f"{path}: {key!r} is required (path to the {key.upper()} NIfTI image)",
                              exit_codes.EXIT_MISSING_INPUT)
        image = (path.parent / str(given[key])).absolute()
        if not image.is_file():
            raise ConfigError(f"{path}: {key} image {image} does not exist", exit_codes.EXIT_MISSING_INPUT)
        if not image.name.endswith(NIFTI_EXTENSIONS):
            raise ConfigError(f"{path}: {key} image {image.name} is not NIfTI (.nii or .nii.gz)",
                              exit_codes.EXIT_BAD_DATA)
        images[key] = image
    options = {key: _integral(given[key]) for key in OPTION_KEYS if key in given}
    for key, value in options.items():  # the app's own parser, so that the message names the config key
        try:
            cli.build_parser().parse_args(["bids", "out", "participant", f"--{key}", str(value)])
        except cli.UsageError as err:
            raise ConfigError(f"{path}: {key} {value!r}: {err}") from err
    return BrainlifeConfig(t1=images["t1"], flair=images["flair"], mask=images.get("mask"), options=options)


def _integral(value):
    """JSON numbers may arrive as 8.0; the app's integer options want 8."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def nifti_extension(path: Path) -> str:
    return ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"


def build_bids_dataset(config: BrainlifeConfig, bids_dir: Path) -> Path:
    """Write the one-participant BIDS dataset: sub-01/anat/sub-01_T1w, sub-01_FLAIR, optional lesion mask.

    Images are hard links to the inputs where the file system allows it, else copies (not symlinks: the
    derivatives' `Sources` name files inside the dataset). The optional lesion mask is named after the image
    whose grid it is on (ds004199's `*_FLAIR_roi.nii.gz` convention, hidden from the validator by .bidsignore).
    """
    bids_dir = Path(bids_dir)
    anat = bids_dir / f"sub-{SUBJECT}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{SUBJECT}"
    _link_or_copy(config.t1, anat / f"{stem}_T1w{nifti_extension(config.t1)}")
    _link_or_copy(config.flair, anat / f"{stem}_FLAIR{nifti_extension(config.flair)}")
    if config.mask is not None:
        reference = "T1w" if same_grid(config.mask, config.t1) and not same_grid(config.mask, config.flair) \
            else "FLAIR"
        _link_or_copy(config.mask, anat / f"{stem}_{reference}_roi{nifti_extension(config.mask)}")
    write_json(bids_dir / "dataset_description.json", {
        "Name": "bids_fcd Brainlife input", "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "bids_fcd.brainlife", "Version": __version__}],
    })
    write_text(bids_dir / "README", "One participant, assembled by bids_fcd from a Brainlife job's inputs.\n")
    write_text(bids_dir / "participants.tsv", f"participant_id\nsub-{SUBJECT}\n")
    write_text(bids_dir / ".bidsignore", "*_roi.nii*\n")
    return bids_dir


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or protected hard links
        shutil.copyfile(source, target)


def participant_argv(config: BrainlifeConfig, bids_dir: Path, output_dir: Path) -> list[str]:
    """The run.py command line for the job: participant level on sub-01, the config's options.

    Without the BIDS validator: the dataset is the one `build_bids_dataset` just assembled, so its errors could
    only be ours, while a bad input image is reported by the participant level itself (65, named), and the
    validator's hint (--skip_bids_validator) is nothing a Brainlife user can act on.
    """
    options = {"n_cpus": len(os.sched_getaffinity(0)), **config.options}
    argv = [str(bids_dir), str(output_dir), "participant", "--participant_label", SUBJECT, "--skip_bids_validator"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def write_outputs(derivatives_dir: Path, output_dir: Path) -> dict:
    """Copy the participant's maps and report into Brainlife's output folders; return product.json's content.

    Raises FileNotFoundError naming any derivative the participant level should have written.
    """
    derivatives_dir, output_dir = Path(derivatives_dir), Path(output_dir)
    for target, entities in OUTPUT_FILES.items():
        source = derivatives_dir / derivative_path({}, SUBJECT, None, **entities)
        if not source.is_file():
            raise FileNotFoundError(f"the participant level wrote no {source.relative_to(derivatives_dir)}")
        (output_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, output_dir / target)
    report = derivatives_dir / f"sub-{SUBJECT}.html"
    if not report.is_file():
        raise FileNotFoundError(f"the participant level wrote no report {report.name}")
    report_dir = output_dir / "report"
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir(parents=True)
    # The report names the BIDS derivatives; on Brainlife they are delivered under the output names instead.
    delivered = ", ".join(f"{target} (from {derivative_path({}, SUBJECT, None, **entities).name})"
                          for target, entities in OUTPUT_FILES.items())
    page = report.read_text(encoding="utf-8").replace(
        "<h2>Inputs and outputs</h2>",
        f"<h2>Inputs and outputs</h2>\n<p>In this Brainlife job the outputs are delivered as: {delivered}.</p>", 1)
    write_text(report_dir / "index.html", page)
    figures = derivatives_dir / f"sub-{SUBJECT}" / "figures"
    if figures.is_dir():  # the report links them as sub-01/figures/..., relative to itself
        shutil.copytree(figures, report_dir / f"sub-{SUBJECT}" / "figures")
    prediction = json.loads((output_dir / "probability" / "prediction.json").read_text(encoding="utf-8"))
    return product_from_prediction(prediction)


def product_from_prediction(prediction: dict) -> dict:
    """Brainlife's product.json: a UI message, plus the subject-level result as searchable fields."""
    probability = float(prediction["fcd_probability"])
    clusters = prediction.get("clusters", [])
    message = (f"FCD probability {probability:.3f} (predicted {prediction['predicted']}, threshold "
               f"{float(prediction['threshold']):.3f}); {len(clusters)} candidate cluster(s)")
    if clusters:
        top = clusters[0]
        message += f", the strongest in {top['region']} ({top['volume_mm3']:.0f} mm3)"
    keep = ("id", "volume_mm3", "peak_probability", "mean_probability", "peak_mm", "atlas", "region")
    return {
        "brainlife": [
            {"type": "info", "msg": message},
            {"type": "info", "msg": "Research use only; not a medical device."},
        ],
        "fcd_probability": probability,
        "predicted": prediction["predicted"],
        "threshold": prediction["threshold"],
        "n_clusters": len(clusters),
        "clusters": [{k: c[k] for k in keep if k in c} for c in clusters[:MAX_CLUSTERS_IN_PRODUCT]],
        "model": prediction.get("model", {}),
        "bids_fcd_version": __version__,
    }


def failure_product(message: str) -> dict:
    return {"brainlife": [{"type": "error", "msg": message}], "bids_fcd_version": __version__}


def failure_message(derivatives_dir: Path, code: int, errors: list[str]) -> str:
    """The first lines of the participant's crash file, else the run's first logged error, else the code."""
    crash = Path(derivatives_dir) / "logs" / f"crash-sub-{SUBJECT}.txt"
    if crash.is_file():
        return " ".join(crash.read_text(encoding="utf-8").splitlines()[:2])
    if errors:
        return f"bids_fcd exited with code {code}: {errors[0]}"
    return f"bids_fcd exited with code {code}; see the job log"


class ErrorLines(logging.Handler):
    """Collects the messages of ERROR records, for product.json when a run fails before any participant."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_fcd.brainlife",
                                     description="Run bids_fcd as a Brainlife App in the folder of config.json.")
    parser.add_argument("config", type=Path, nargs="?", default=Path("config.json"),
                        help="Brainlife's config.json (default: ./config.json)")
    args = parser.parse_args(argv)
    cli.setup_logging()
    job_dir = args.config.absolute().parent
    derivatives_dir = job_dir / "derivatives"
    try:
        config = read_config(args.config)
        bids_dir = build_bids_dataset(config, job_dir / "bids")
    except ConfigError as err:
        log.error("%s", err)
        write_json(job_dir / "product.json", failure_product(str(err)))
        return err.exit_code
    errors = ErrorLines()
    logging.getLogger().addHandler(errors)
    try:
        code = cli.main(participant_argv(config, bids_dir, derivatives_dir))
    finally:
        logging.getLogger().removeHandler(errors)
    if code != exit_codes.EXIT_OK:
        write_json(job_dir / "product.json", failure_product(failure_message(derivatives_dir, code, errors.lines)))
        return code
    product = write_outputs(derivatives_dir, job_dir / "output")
    write_json(job_dir / "product.json", product)
    log.info("Brainlife outputs in %s: %s", job_dir / "output", product["brainlife"][0]["msg"])
    return exit_codes.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
