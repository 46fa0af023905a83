"""Input discovery: a BIDS dataset -> one `Participant` record per participant and session.

pybids finds the T1w and FLAIR images; participants.tsv gives labels and the `split`; lesion masks are found
beside the raw images (ds004199's `*_FLAIR_roi.nii.gz`, hidden from a validating layout by `.bidsignore`) or
as derivative masks (`*_label-lesion_mask.nii.gz`, `*_label-FCD_mask.nii.gz`) anywhere under the dataset.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from bids import BIDSLayout
from bids.exceptions import BIDSValidationError
from bids.layout import Config

from bids_fcd.exit_codes import EXIT_BAD_DATA, EXIT_EMPTY_SELECTION, EXIT_MISSING_INPUT, EXIT_USAGE

log = logging.getLogger(__name__)

LABEL_PATTERN = re.compile(r"^[A-Za-z0-9]+$")
# Keys of --bids_filter_file, as fMRIPrep reads them, mapped to the BIDS suffix they select.
MODALITY_SUFFIX = {"t1w": "T1w", "flair": "FLAIR"}
MASK_SUFFIXES = ("_roi.nii.gz", "_roi.nii", "_label-lesion_mask.nii.gz", "_label-FCD_mask.nii.gz")
DESCRIPTIVE_ENTITIES = ("acquisition", "ceagent", "reconstruction", "run")
# Query keys the app sets itself for each participant: a filter may only narrow within them, so that one
# participant's outputs can never come from another participant's (or another modality's) image.
FIXED_QUERY_KEYS = ("subject", "session", "suffix", "datatype", "extension")


class InputError(Exception):
    """A problem with the dataset or the selection; `exit_code` is the contract's code for it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Participant:
    """One unit of work: a participant (and session) with the images chosen for it."""

    subject: str
    session: str | None
    t1w: Path | None
    flair: Path | None
    t1w_entities: dict = field(default_factory=dict)
    flair_entities: dict = field(default_factory=dict)
    lesion_mask: Path | None = None
    lesion_mask_space: str | None = None  # "T1w" or "FLAIR": the grid the mask is on
    label: int | None = None  # 1 FCD, 0 control, None unknown (n/a or absent)
    split: str | None = None
    metadata: dict = field(default_factory=dict)  # participants.tsv row + scanner sidecar fields
    filtered_out: dict = field(default_factory=dict)  # suffix -> file names that --bids_filter_file excluded

    @property
    def name(self) -> str:
        """`sub-X` or `sub-X_ses-Y`: the unit's name in logs and summaries."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")


@dataclass(frozen=True)
class LabelSpec:
    """Which participants.tsv column holds the label, and which value means FCD."""

    column: str = "group"
    positive: str = "fcd"


def strip_prefix(label: str, prefix: str) -> str:
    """Participant and session labels are accepted with or without their `sub-` / `ses-` prefix."""
    return label.removeprefix(prefix)


def validate_labels(labels: list[str] | None, prefix: str, kind: str) -> list[str] | None:
    """Bare alphanumeric labels only: anything else could walk out of the dataset or output folders."""
    if not labels:
        return None
    bare = [strip_prefix(label, prefix) for label in labels]
    bad = [label for label in bare if not LABEL_PATTERN.match(label)]
    if bad:
        raise InputError(f"invalid {kind} label(s) {bad}: BIDS labels are alphanumeric", EXIT_USAGE)
    return bare


def read_filter_file(path: Path | None) -> dict:
    """Read `--bids_filter_file`: {"t1w": {...pybids query...}, "flair": {...}} as fMRIPrep does."""
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"--bids_filter_file {path}: cannot read JSON ({err})", EXIT_USAGE) from err
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise InputError(f"--bids_filter_file {path}: expected an object of objects, e.g. {{'t1w': {{...}}}}",
                         EXIT_USAGE)
    unknown = set(filters) - set(MODALITY_SUFFIX)
    if unknown:
        raise InputError(f"--bids_filter_file {path}: unknown modality keys {sorted(unknown)}; "
                         f"known: {sorted(MODALITY_SUFFIX)}", EXIT_USAGE)
    entities = set(Config.load("bids").entities)
    for modality, query in filters.items():
        fixed = sorted(set(query) & set(FIXED_QUERY_KEYS))
        if fixed:
            raise InputError(f"--bids_filter_file {path}: {modality!r} sets {fixed}, which the app sets itself "
                             "for each participant (use --participant_label / --session_label to select)", EXIT_USAGE)
        not_entities = sorted(set(query) - entities)
        if not_entities:
            raise InputError(f"--bids_filter_file {path}: {modality!r} queries {not_entities}, which are not "
                             f"BIDS entities; known: {sorted(entities - set(FIXED_QUERY_KEYS))}", EXIT_USAGE)
    return filters


def read_participants_table(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv as strings, indexed by bare label; a UTF-8 byte-order mark is tolerated."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return pd.DataFrame()
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, encoding="utf-8-sig", keep_default_na=False)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); BIDS tables are UTF-8",
                         EXIT_BAD_DATA) from err
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable tab-separated table ({err})", EXIT_BAD_DATA) from err
    table.columns = [column.strip() for column in table.columns]
    if "participant_id" not in table.columns:
        raise InputError(f"{path}: no participant_id column", EXIT_MISSING_INPUT)
    table["participant_id"] = table["participant_id"].str.strip().map(lambda v: strip_prefix(v, "sub-"))
    return table.set_index("participant_id")


def label_from_row(row: pd.Series | None, spec: LabelSpec) -> int | None:
    """1 for the positive value, 0 for any other value, None for `n/a`, empty or a missing row."""
    if row is None or spec.column not in row.index:
        return None
    value = str(row[spec.column]).strip()
    if value.lower() in ("n/a", "na", ""):
        return None
    return int(value == spec.positive)


def voxel_volume_mm3(path: Path) -> float:
    """Voxel volume from the header alone (no data read): the resolution used to rank candidates.

    An unreadable header ranks last (infinite volume); the participant level reports it with exit 65.
    """
    try:
        zooms = nib.load(str(path)).header.get_zooms()[:3]
    except (OSError, nib.filebasedimages.ImageFileError, EOFError) as error:
        log.warning("%s: header unreadable while ranking candidates (%s)", path, error)
        return float("inf")
    return float(np.prod(zooms))


def choose_image(candidates: list, kind: str, unit: str) -> object | None:
    """Several candidates: the highest resolution (smallest voxel), then the lowest run, then the name.

    The choice is logged so that a user can override it with --bids_filter_file.
    """
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]

    def rank(bids_file) -> tuple:
        run = bids_file.entities.get("run")
        return (voxel_volume_mm3(bids_file.path), int(run) if run is not None else -1, bids_file.filename)

    ordered = sorted(candidates, key=rank)
    log.info("%s: %d %s candidates; chose %s (highest resolution, then lowest run); others: %s",
             unit, len(ordered), kind, ordered[0].filename, [c.filename for c in ordered[1:]])
    return ordered[0]


def find_mask_files(bids_dir: Path, subject: str, session: str | None) -> list[Path]:
    """Lesion masks of one participant/session: raw `*_roi.nii.gz` and derivative `label-*_mask` files."""
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    found = []
    for path in sorted(Path(bids_dir).rglob(f"{stem}_*")):
        if not path.name.endswith(MASK_SUFFIXES) or not path.is_file():
            continue
        if session is None and "_ses-" in path.name:
            continue
        found.append(path)
    return found


def stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def reference_stem(mask: Path) -> str:
    """The image a mask is named after: `X_FLAIR_roi.nii.gz` -> `X_FLAIR` (derivative masks name none)."""
    return stem(mask).removesuffix("_roi")


def same_grid(a: Path, b: Path, shape_only: bool = False) -> bool:
    """Whether two images share shape and affine (or only shape), from their headers; False when either header
    is unreadable (the image itself is then reported by the participant level, a mask is skipped)."""
    try:
        img_a, img_b = nib.load(str(a)), nib.load(str(b))
    except (OSError, nib.filebasedimages.ImageFileError, EOFError) as error:
        log.warning("cannot compare the grids of %s and %s: %s", a.name, b.name, error)
        return False
    return img_a.shape[:3] == img_b.shape[:3] and (shape_only or np.allclose(img_a.affine, img_b.affine, atol=1e-3))


def pair_mask(masks: list[Path], t1w: Path | None, flair: Path | None, unit: str) -> tuple[Path | None, str | None]:
    """Pair a mask with the image whose grid it is on.

    By name first (the mask is in the space of the image it is named after), if it has that image's shape
    (its affine is not compared: masks are often saved with a slightly different header, and
    `preprocess.mask_to_template` uses the image's). When that image does not exist (ds004199 sub-00048: a
    mask named after an `acq-32ch10` FLAIR while the only FLAIR is `acq-T2sel`), by grid: the FLAIR, then the
    T1w, if shape and affine agree. Otherwise the mask is skipped with a warning, and the participant is still
    predicted and still counts in subject-level metrics.
    """
    for mask in masks:
        named = [(image, space) for image, space in ((flair, "FLAIR"), (t1w, "T1w"))
                 if image is not None and stem(image) == reference_stem(mask)]
        for image, space in named:
            if same_grid(mask, image, shape_only=True):
                return mask, space
            log.warning("%s: lesion mask %s does not have the shape of %s, the image it is named after", unit,
                        mask.name, image.name)
        if named:
            continue
        for image, space in ((flair, "FLAIR"), (t1w, "T1w")):
            if image is not None and same_grid(mask, image):
                log.warning("%s: lesion mask %s names an image that does not exist; paired with %s "
                            "(same shape and affine)", unit, mask.name, image.name)
                return mask, space
        log.warning("%s: lesion mask %s matches neither the T1w nor the FLAIR grid; skipped", unit, mask.name)
    return None, None


def sidecar_metadata(layout: BIDSLayout, bids_file, prefix: str) -> dict:
    """Scanner fields of a sidecar (for the shortcut audit) with the modality as prefix."""
    keys = ("Manufacturer", "ManufacturersModelName", "MagneticFieldStrength", "RepetitionTime", "EchoTime",
            "InversionTime", "FlipAngle", "ReceiveCoilName")
    metadata = layout.get_metadata(bids_file.path)
    found = {f"{prefix}_{k}": metadata[k] for k in keys if k in metadata}
    found[f"{prefix}_acq"] = bids_file.entities.get("acquisition", "n/a")
    return found


def open_layout(bids_dir: Path) -> BIDSLayout:
    """The dataset's pybids layout; a dataset_description.json pybids cannot use is bad input (65), named."""
    try:
        return BIDSLayout(str(bids_dir), validate=True)
    except (BIDSValidationError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise InputError(f"{Path(bids_dir) / 'dataset_description.json'}: {err}", EXIT_BAD_DATA) from err


def discover(bids_dir: Path, participant_labels: list[str] | None = None, session_labels: list[str] | None = None,
             filters: dict | None = None, label_spec: LabelSpec = LabelSpec(),
             layout: BIDSLayout | None = None) -> list[Participant]:
    """Find every selected participant/session with its T1w, FLAIR, lesion mask, label and metadata.

    Raises InputError(EXIT_EMPTY_SELECTION) when a requested label, session or filter selects nothing, naming it.
    Participants without a T1w or FLAIR are still returned (the participant then fails on its own with 66).
    """
    bids_dir = Path(bids_dir)
    filters = filters or {}
    layout = layout or open_layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    if participant_labels:
        unknown = [label for label in participant_labels if label not in subjects]
        if unknown:
            raise InputError(f"--participant_label: no such participant(s) in {bids_dir}: "
                             + ", ".join(f"sub-{label}" for label in unknown), EXIT_EMPTY_SELECTION)
        subjects = [s for s in subjects if s in participant_labels]
    table = read_participants_table(bids_dir)
    if label_spec.column not in table.columns and not table.empty:
        log.info("participants.tsv has no %r column: labels unknown", label_spec.column)

    sessions_of = {subject: layout.get_sessions(subject=subject) or [None] for subject in subjects}
    if session_labels:
        present = {session for sessions in sessions_of.values() for session in sessions}
        unknown = [label for label in session_labels if label not in present]
        if unknown:
            raise InputError("--session_label: no such session(s) in the selected participants: "
                             + ", ".join(f"ses-{label}" for label in unknown), EXIT_EMPTY_SELECTION)
        sessions_of = {subject: [s for s in sessions if s in session_labels]
                       for subject, sessions in sessions_of.items()}
    units = [build_participant(layout, bids_dir, subject, session, filters, table, label_spec)
             for subject in subjects for session in sessions_of[subject]]
    if not units:
        raise InputError(f"no participants found in {bids_dir}", EXIT_EMPTY_SELECTION)
    for modality, query in filters.items():
        if not any(getattr(u, modality) for u in units):
            raise InputError(f"--bids_filter_file: the {modality!r} filter {query} selects no image",
                             EXIT_EMPTY_SELECTION)
    return units


def build_participant(layout: BIDSLayout, bids_dir: Path, subject: str, session: str | None, filters: dict,
                      table: pd.DataFrame, label_spec: LabelSpec) -> Participant:
    """Choose one T1w and one FLAIR (filters applied), pair the lesion mask, attach label and metadata."""
    unit = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    chosen, filtered_out = {}, {}
    for modality, suffix in MODALITY_SUFFIX.items():
        chosen[modality] = choose_image(anat_images(layout, subject, session, suffix, filters.get(modality, {})),
                                        suffix, unit)
        if chosen[modality] is None and filters.get(modality):
            filtered_out[suffix] = [f.filename for f in anat_images(layout, subject, session, suffix, {})]
    t1w, flair = chosen["t1w"], chosen["flair"]
    t1w_path = Path(t1w.path) if t1w else None
    flair_path = Path(flair.path) if flair else None
    mask, mask_space = pair_mask(find_mask_files(bids_dir, subject, session), t1w_path, flair_path, unit)

    row = table.loc[subject] if subject in table.index else None
    metadata = row.to_dict() if row is not None else {}
    for bids_file, prefix in ((t1w, "T1w"), (flair, "FLAIR")):
        if bids_file is not None:
            metadata.update(sidecar_metadata(layout, bids_file, prefix))
    split = str(row["split"]).strip().lower() if row is not None and "split" in row.index else None
    if split not in (None, "train", "test", "n/a", ""):
        log.warning("sub-%s: participants.tsv split %r is neither train nor test: treated as unspecified "
                    "(cross-validated, not held out)", subject, row["split"])
    return Participant(
        subject=subject, session=session, t1w=t1w_path, flair=flair_path,
        t1w_entities=descriptive_entities(t1w), flair_entities=descriptive_entities(flair),
        lesion_mask=mask, lesion_mask_space=mask_space, label=label_from_row(row, label_spec),
        split=split if split in ("train", "test") else None, metadata=metadata, filtered_out=filtered_out,
    )


def anat_images(layout: BIDSLayout, subject: str, session: str | None, suffix: str, narrowing: dict) -> list:
    """The participant's (and session's) anat images of `suffix`, narrowed by a --bids_filter_file query."""
    query = {"subject": subject, "suffix": suffix, "extension": [".nii", ".nii.gz"], "datatype": "anat"}
    if session:
        query["session"] = session
    found = layout.get(**query, **narrowing)
    return found if session else [f for f in found if "session" not in f.entities]


def descriptive_entities(bids_file) -> dict:
    """The entities (acq, ce, rec, run) that derivative names inherit from their source image."""
    if bids_file is None:
        return {}
    return {k: bids_file.entities[k] for k in DESCRIPTIVE_ENTITIES if k in bids_file.entities}
