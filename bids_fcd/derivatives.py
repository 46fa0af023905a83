"""The BIDS derivatives writer: names, sidecars, dataset_description.json, .bidsignore, atomic writes.

All output names come from `derivative_path` (niworkflows' DerivativesDataSink idea): the source image's
entities (sub, ses, acq, ce, rec, run) plus derivative entities, through pybids `build_path` with strict
patterns. pybids' stock derivative patterns lack `run`, and none covers the transforms or the prediction
JSON, so the patterns are listed here, in BIDS entity order.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from bids.layout.writing import build_path

from bids_fcd import __version__

_ANAT = ("sub-{subject}[/ses-{session}]/anat/sub-{subject}[_ses-{session}][_acq-{acquisition}][_ce-{ceagent}]"
         "[_rec-{reconstruction}][_run-{run}]")
PATTERNS = [
    _ANAT + "[_space-{space}][_desc-{desc}]_{suffix<T1w|FLAIR>}{extension<.nii.gz|.json>|.nii.gz}",
    _ANAT + "[_space-{space}][_label-{label}][_desc-{desc}]_{suffix<mask|probseg>}{extension<.nii.gz|.json>|.nii.gz}",
    _ANAT + "_from-{from}_to-{to}_mode-{mode}_{suffix<xfm>}{extension<.txt|.h5>|.txt}",
    _ANAT + "[_desc-{desc}]_{suffix<prediction>}{extension<.json>|.json}",
]

DOCKER_IMAGE = "bidsfcd/bids_fcd"
SCANNER_XFORM_CODE = 1  # NIfTI: scanner-based anatomical coordinates
MNI_XFORM_CODE = 4  # NIfTI: MNI 152 coordinates

# Files the BIDS schema does not know; listed so that the validator passes the output dataset. Folders are
# named without a trailing slash: bids-validator-deno 3 does not match `cache/` against the folder `/cache/`.
BIDSIGNORE = ["*_xfm.*", "*_prediction.json", "*.html", "figures", "logs", "cache", "group", "work"]


def derivative_path(source_entities: dict, subject: str, session: str | None, **entities) -> Path:
    """Relative path of a derivative: the source's descriptive entities, overridden by `entities`.

    Example: derivative_path({"acquisition": "iso08"}, "01", None, space="MNI152NLin2009aSym",
    desc="preproc", suffix="T1w") -> sub-01/anat/sub-01_acq-iso08_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz
    """
    values = {**source_entities, "subject": subject, **entities}
    if session:
        values["session"] = session
    path = build_path(values, PATTERNS, strict=True)
    if path is None:
        raise ValueError(f"no output name pattern accepts the entities {values}")
    return Path(path)


def safe_join(root: Path, relative: Path) -> Path:
    """`root / relative`, refusing anything that would land outside `root` (`..`, absolute, symlinks)."""
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if root != target and root not in target.parents:
        raise ValueError(f"refusing to write {relative}: outside the output directory {root}")
    return target


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside `final`, renamed onto it only if the block succeeds.

    A crash leaves a hidden `.tmp-*` file, never a half-written file under the final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".tmp-{final.name.split('.')[0]}-", suffix=suffix,
                                         dir=final.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes it private; outputs read like any file
        os.replace(temporary, final)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, content: dict) -> Path:
    return write_text(path, json.dumps(content, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32,
                xform_code: int = SCANNER_XFORM_CODE) -> Path:
    """Save `data` (X, Y, Z) with `affine` (voxel -> RAS+ mm) as NIfTI-1, atomically, with mm units.

    `xform_code` says what the coordinates are (qform and sform alike): the scanner's for maps on the input's
    grid, `MNI_XFORM_CODE` for template-space ones, as fMRIPrep writes them, so that viewers such as AFNI put
    them in standard space rather than over the participant's own scan.
    """
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=xform_code)
    image.set_sform(affine, code=xform_code)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path


def bids_uri(relative_to_raw: Path) -> str:
    """A source file named as a BIDS URI into the raw dataset (`DatasetLinks.raw`)."""
    return f"bids:raw:{Path(relative_to_raw).as_posix()}"


def container_info() -> dict | None:
    """Docker or Apptainer/Singularity when we run inside one (for GeneratedBy.Container).

    Docker is known from the variable our image sets, not from /.dockerenv: that file is in every Docker
    container, and a pip install inside some other image is not our image.
    """
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "apptainer", "URI": os.environ.get("APPTAINER_CONTAINER")
                or os.environ.get("SINGULARITY_CONTAINER")}
    if os.environ.get("BIDS_FCD_CONTAINER") == "docker":
        return {"Type": "docker", "Tag": f"{DOCKER_IMAGE}:{__version__}"}
    return None


def source_dataset_entry(bids_dir: Path) -> dict:
    """SourceDatasets entry: the input's location, and its DOI when it declares one (OpenNeuro's DOIs name the
    version, e.g. doi:10.18112/openneuro.ds004199.v1.0.6; BIDS has no other version field for a raw dataset)."""
    description_path = Path(bids_dir) / "dataset_description.json"
    description = json.loads(description_path.read_text(encoding="utf-8-sig"))
    entry = {"URL": Path(bids_dir).resolve().as_uri()}
    doi = str(description.get("DatasetDOI") or "").strip()  # a number in some datasets' JSON
    if doi:
        entry["DOI"] = doi if doi.startswith("doi:") else f"doi:{doi}"
    return entry


def init_output_dataset(output_dir: Path, bids_dir: Path) -> None:
    """Write dataset_description.json and .bidsignore once; safe when many jobs share one OUTPUT_DIR.

    Every job would write identical bytes, and os.replace is atomic, so concurrent SLURM array tasks can
    neither corrupt nor half-write them. An existing description is kept (another job or an earlier run).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    description_path = output_dir / "dataset_description.json"
    if not description_path.exists():
        generated_by = {"Name": "bids_fcd", "Version": __version__,
                        "Description": "FCD probability, saliency and candidate lesions (research use only)",
                        "CodeURL": "https://github.com/bids-fcd/bids_fcd"}
        container = container_info()
        if container:
            generated_by["Container"] = container
        source = source_dataset_entry(bids_dir)
        write_json(description_path, {
            "Name": "bids_fcd derivatives",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [generated_by],
            "SourceDatasets": [source],
            "DatasetLinks": {"raw": source.get("DOI", source["URL"]).replace("doi:", "https://doi.org/")},
        })
    ignore_path = output_dir / ".bidsignore"
    existing = ignore_path.read_text().split() if ignore_path.exists() else []
    missing = [line for line in BIDSIGNORE if line not in existing]
    if missing:
        write_text(ignore_path, "\n".join(existing + missing) + "\n")
