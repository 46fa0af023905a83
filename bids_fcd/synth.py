"""A synthetic FCD cohort in ds004199's form, and model-grid samples from the same generator.

Every participant is nilearn's MNI ICBM152 2009a template (tissue maps) deformed by a random affine and a smooth
elastic warp, rendered as T1w and FLAIR with random tissue contrast, a thin scalp/skull shell, texture, bias
field, blur and Rician noise, on a site's own grids (T1w 1.4-1.5 mm; FLAIR on another grid, orientation and
slice thickness). Patients get one FCD type II from `bids_fcd.lesions`, implanted in template
space before the warp, and a lesion mask on their FLAIR grid (`*_FLAIR_roi.nii.gz`, as ds004199 has).

Usage: `python -m bids_fcd.synth OUT_DIR [--n N] [--seed S] [--n_cpus C]` (also `bids_fcd synth ...`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bids_fcd import __version__
from bids_fcd.exit_codes import EXIT_CANNOT_CREATE_OUTPUT, EXIT_USAGE
from bids_fcd.lesions import implant_fcd, sample_lesion_params
from bids_fcd.preprocess import normalise_intensity
from bids_fcd.template import BRAIN_CENTRE_MM, Grid, load_template

# The 1 mm working grid in MNI mm: the brain, its shell (<= MAX_SHELL_MM), and 20 mm of neck below the template.
HEAD_BOX_MM = ((-91.0, 91.0), (-126.0, 92.0), (-92.0, 101.0))
NECK_PADDING_MM = 20
HEAD_CENTRE_MM = np.array([0.0, -17.0, 12.0])
# The MNI152 2009 brain (1.9 L inside its mask) is larger than a person's: averaging and registration enlarge it.
# Participants' heads are drawn at this linear scale of it (brains of ~1.4 L, +-25 %), the size of real scans,
# so that brain extraction's volume check sees what it would see on real data.
HEAD_SCALE = 0.9
# Thickest shell (CSF 3 + bone 6.5 + scalp 6.5 mm, and a little wobble) that `_head_tissues` draws, and the MNI
# height below which a scan's field of view may cut the neck.
MAX_SHELL_MM = 17.0
NECK_CUT_MM = -80.0
TEST_FRACTION = 0.25
BOM = "\ufeff"


@dataclass(frozen=True)
class Acquisition:
    """One scan protocol of a site.

    Attributes:
        acq: the BIDS `acq-` label.
        orientation: nibabel axis codes of the stored array (e.g. "LAS": first axis toward the left).
        spacing_mm: voxel size along the stored axes, in mm.
        max_oblique_deg: random tilt of the slab around each scanner axis, up to this many degrees.
        intensities: mean intensity of "gm", "csf", "bone" and "scalp", relative to white matter (1).
        noise_sd: Rician noise standard deviation, as a fraction of white matter intensity.
        sidecar: acquisition fields of the JSON sidecar (times in seconds, angles in degrees).
    """

    acq: str
    orientation: str
    spacing_mm: tuple[float, float, float]
    max_oblique_deg: float
    intensities: dict[str, float]
    noise_sd: float
    sidecar: dict


@dataclass(frozen=True)
class Site:
    """A scanner and its T1w and FLAIR protocols."""

    label: str
    scanner: dict
    t1w: Acquisition
    flair: Acquisition


SITES = (
    Site(
        label="siteA",
        scanner={"Manufacturer": "Siemens", "ManufacturersModelName": "Prisma", "MagneticFieldStrength": 3},
        t1w=Acquisition(
            acq="mprage", orientation="LAS", spacing_mm=(1.4, 1.4, 1.4),
            max_oblique_deg=4.0, intensities={"gm": 0.62, "csf": 0.17, "bone": 0.10, "scalp": 1.05},
            noise_sd=0.013,
            sidecar={"MRAcquisitionType": "3D", "ScanningSequence": "GR\\IR", "SequenceVariant": "SK\\SP\\MP",
                     "SeriesDescription": "t1_mprage_sag_p2", "EchoTime": 0.00232, "RepetitionTime": 2.3,
                     "InversionTime": 0.9, "FlipAngle": 8},
        ),
        flair=Acquisition(
            acq="spc3d", orientation="PIR", spacing_mm=(1.5, 1.5, 1.5),
            max_oblique_deg=6.0, intensities={"gm": 1.28, "csf": 0.14, "bone": 0.08, "scalp": 0.85},
            noise_sd=0.016,
            sidecar={"MRAcquisitionType": "3D", "ScanningSequence": "SE\\IR", "SequenceVariant": "SK\\SP\\MP",
                     "SeriesDescription": "t2_space_dark-fluid_sag", "EchoTime": 0.388, "RepetitionTime": 5.0,
                     "InversionTime": 1.8, "FlipAngle": 120},
        ),
    ),
    Site(
        label="siteB",
        scanner={"Manufacturer": "Siemens", "ManufacturersModelName": "TrioTim", "MagneticFieldStrength": 3},
        t1w=Acquisition(
            acq="tfl3d", orientation="ASL", spacing_mm=(1.5, 1.5, 1.5),
            max_oblique_deg=5.0, intensities={"gm": 0.66, "csf": 0.20, "bone": 0.12, "scalp": 1.10},
            noise_sd=0.012,
            sidecar={"MRAcquisitionType": "3D", "ScanningSequence": "GR\\IR", "SequenceVariant": "SP\\MP",
                     "SeriesDescription": "t1_tfl3d_sag_iso", "EchoTime": 0.00252, "RepetitionTime": 1.9,
                     "InversionTime": 0.9, "FlipAngle": 9},
        ),
        flair=Acquisition(
            acq="tra3mm", orientation="LPS", spacing_mm=(1.2, 1.2, 3.3),
            max_oblique_deg=10.0, intensities={"gm": 1.22, "csf": 0.12, "bone": 0.06, "scalp": 0.95},
            noise_sd=0.013,
            sidecar={"MRAcquisitionType": "2D", "ScanningSequence": "SE\\IR", "SequenceVariant": "SK\\SP\\MP",
                     "SeriesDescription": "t2_tirm_tra_dark-fluid", "EchoTime": 0.094, "RepetitionTime": 9.0,
                     "InversionTime": 2.5, "FlipAngle": 150},
        ),
    ),
    Site(
        label="siteC",
        scanner={"Manufacturer": "GE", "ManufacturersModelName": "Signa HDxt", "MagneticFieldStrength": 1.5},
        t1w=Acquisition(
            acq="bravo", orientation="RAS", spacing_mm=(1.4, 1.4, 1.5),
            max_oblique_deg=3.0, intensities={"gm": 0.70, "csf": 0.24, "bone": 0.13, "scalp": 1.15},
            noise_sd=0.017,
            sidecar={"MRAcquisitionType": "3D", "ScanningSequence": "GR", "SequenceVariant": "SS\\SP",
                     "SeriesDescription": "Ax BRAVO", "EchoTime": 0.0034, "RepetitionTime": 0.0085,
                     "InversionTime": 0.45, "FlipAngle": 12},
        ),
        flair=Acquisition(
            acq="cor3mm", orientation="LIP", spacing_mm=(1.1, 1.1, 3.6),
            max_oblique_deg=8.0, intensities={"gm": 1.18, "csf": 0.18, "bone": 0.06, "scalp": 0.90},
            noise_sd=0.022,
            sidecar={"MRAcquisitionType": "2D", "ScanningSequence": "SE\\IR", "SequenceVariant": "SK\\SP",
                     "SeriesDescription": "Cor T2 FLAIR", "EchoTime": 0.14, "RepetitionTime": 9.0,
                     "InversionTime": 2.2, "FlipAngle": 90},
        ),
    ),
)

README = """\
Synthetic focal cortical dysplasia (FCD type II) cohort
=======================================================

Made by bids_fcd.synth (bids_fcd {version}, seed {seed}) to demonstrate and test the bids_fcd BIDS App. It has
the layout of OpenNeuro ds004199 (Schuch et al., "An open presurgery MRI dataset of people with epilepsy and
focal cortical dysplasia type II"): one T1w and one FLAIR per participant, and for patients a lesion mask on the
FLAIR grid named *_FLAIR_roi.nii.gz (hidden from the validator by .bidsignore). No image shows a real person.

How the images were made: the MNI ICBM152 2009a nonlinear symmetric template's grey matter, white matter and
brain mask maps, deformed per participant by a random affine (scale +-8 %, rotation) and a smooth elastic warp,
given a thin synthetic scalp/skull shell, rendered as T1w and FLAIR with random tissue contrast, texture, bias
field, blur and Rician noise, on each site's grids (participants.json, column site). Patients (group fcd) carry
one simulated FCD type II: cortical thickening, a blurred grey/white junction, FLAIR-bright cortex and
subcortical white matter, and sometimes a transmantle tail toward the ventricle. Controls and patients are
spread over the sites, so the scanner does not predict the group; the test split holds both groups.

Template credit: MNI ICBM152 2009a nonlinear symmetric, as shipped by nilearn (Abraham et al. 2014, Front.
Neuroinform. 8:14). Fonov V, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average
age-appropriate brain templates from birth to adulthood. NeuroImage 47:S102 (2009); Fonov V, Evans AC, Botteron
K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate atlases for pediatric studies.
NeuroImage 54:313-327 (2011). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright notice appear
in all copies. The authors and McGill University make no representations about the suitability of this software
for any purpose. It is provided "as is" without express or implied warranty.
"""

PARTICIPANTS_JSON = {
    "participant_id": {"Description": "participant label"},
    "group": {
        "Description": "the group a person belongs to",
        "Levels": {"fcd": "synthetic patient with one simulated FCD type II", "hc": "synthetic healthy control"},
    },
    "sex": {"Description": "sex of the participant (drawn at random)", "Levels": {"M": "male", "F": "female"}},
    "age": {"Description": "age at the scan (drawn at random)", "Units": "year"},
    "site": {
        "Description": "simulated scanner and protocols",
        "Levels": {
            site.label: f"{site.scanner['Manufacturer']} {site.scanner['ManufacturersModelName']} "
            f"{site.scanner['MagneticFieldStrength']} T; T1w acq-{site.t1w.acq}, FLAIR acq-{site.flair.acq}"
            for site in SITES
        },
    },
    "split": {
        "Description": "suggested train/test split; test holds both groups",
        "Levels": {"train": "training set", "test": "held-out test set"},
    },
}


@dataclass(frozen=True)
class Anatomy:
    """Template-space tissue maps on the 1 mm head grid (MNI mm, RAS+).

    Attributes:
        grid: the head grid (HEAD_BOX_MM at 1 mm).
        maps: (3, X, Y, Z) float32, in one block so that it is resampled without copies: the brain mask
            (softened to a fraction 0..1 at its edge), then grey and white matter probabilities inside the brain.
        outside_mm: distance from the brain surface (0 inside), in mm; the shell is drawn from it.
        head_surface_mm: (N, 3) points on the outer head surface above the neck, in MNI mm: what a scan's
            field of view must hold.
    """

    grid: Grid
    maps: np.ndarray
    outside_mm: np.ndarray
    head_surface_mm: np.ndarray

    @property
    def brain(self) -> np.ndarray:
        return self.maps[0]

    @property
    def gm(self) -> np.ndarray:
        return self.maps[1]

    @property
    def wm(self) -> np.ndarray:
        return self.maps[2]


@lru_cache(maxsize=1)
def head_anatomy() -> Anatomy:
    """nilearn's template maps on the head grid: cropped to the head, with the brainstem extended into a neck."""
    template = load_template("brain_mask")
    start_vox = np.round(np.linalg.solve(template.affine, [low for low, _ in HEAD_BOX_MM] + [1.0])[:3]).astype(int)
    shape = tuple(int(high - low) + 1 for low, high in HEAD_BOX_MM)
    affine = np.eye(4)
    affine[:3, 3] = [low for low, _ in HEAD_BOX_MM]

    def on_head_grid(kind: str) -> np.ndarray:
        volume = load_template(kind).get_fdata(dtype=np.float32)
        volume = np.pad(volume, ((0, 0), (0, 0), (NECK_PADDING_MM, 0)), mode="edge")  # the cord goes on down
        start = start_vox + [0, 0, NECK_PADDING_MM]
        return volume[tuple(slice(s, s + n) for s, n in zip(start, shape))]

    brain_hard = on_head_grid("brain_mask") > 0.5
    brain = ndimage.gaussian_filter(brain_hard.astype(np.float32), 0.6)
    gm = np.clip(on_head_grid("GM"), 0.0, 1.0) * brain
    wm = np.clip(on_head_grid("WM"), 0.0, 1.0) * brain
    maps = np.stack([brain, gm, wm])
    # The distance at 2 mm, interpolated: 1 mm precision is plenty for a shell and this is 20x faster.
    coarse = ndimage.distance_transform_edt(~brain_hard[::2, ::2, ::2]).astype(np.float32) * 2.0
    outside_mm = _resize(coarse[None], shape)[0]
    outside_mm[brain_hard] = 0.0
    grid = Grid(shape=shape, affine=affine)
    head = outside_mm < MAX_SHELL_MM
    surface = np.argwhere(head & ~ndimage.binary_erosion(head))[::7]
    surface_mm = surface @ affine[:3, :3].T + affine[:3, 3]
    surface_mm = surface_mm[surface_mm[:, 2] > NECK_CUT_MM]
    return Anatomy(grid=grid, maps=maps, outside_mm=outside_mm, head_surface_mm=surface_mm)


def template_tissue_maps(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template's (grey matter, white matter, brain mask) probabilities on a template-space `grid`, float32
    (X, Y, Z): what `bids_fcd.lesions` needs to implant lesions into any brain registered to the template."""
    anatomy = head_anatomy()
    brain, gm, wm = _resample(anatomy.maps, anatomy.grid, grid, np.eye(4))
    return gm, wm, brain


def neocortical_territory(grid: Grid) -> np.ndarray:
    """Where a synthetic FCD core may lie on a template-space `grid` (bool): everywhere but the brainstem and
    cerebellum, the deep grey nuclei and the mesial temporal structures (FCD type II is neocortical). Pass it as
    `territory_mask` to `bids_fcd.lesions.sample_lesion_params`.

    Boxes and a tilted tentorium in MNI152 2009 mm, drawn on the template; generous rather than exact.
    """
    x, y, z = _grid_points_mm(grid)
    infratentorial = (y < -38.0) & (z < -5.0 - 0.45 * np.abs(x))
    brainstem = (np.abs(x) < 18.0) & (z < -12.0) & (y < -5.0)
    deep_and_mesial = (np.abs(x) < 30.0) & (y > -42.0) & (y < 25.0) & (z > -32.0) & (z < 24.0)
    return ~(infratentorial | brainstem | deep_and_mesial)


def make_cohort(out_dir: Path, n: int, seed: int, n_cpus: int = 1) -> Path:
    """Write a synthetic BIDS dataset of `n` participants (half patients, rounded up) to `out_dir`.

    A group of at least 2 puts a quarter of its members (at least one, never all) in the test split, so from
    n = 4 on both splits hold patients and controls.
    The same (n, seed) gives byte-identical files, whatever `n_cpus` (participants are written in that many
    processes; each draws from its own generator, seeded by its index). `out_dir` must not exist or be empty.
    Returns `out_dir`.

    Raises:
        ValueError: n < 1.
        FileExistsError: `out_dir` holds files.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _draw_participants(np.random.default_rng([seed, 0]), n)
    jobs = [(out_dir, row["participant_id"], next(s for s in SITES if s.label == row["site"]), row["group"] == "fcd",
             np.random.default_rng([seed, 1, index])) for index, row in enumerate(rows)]
    if n_cpus > 1 and n > 1:
        with ProcessPoolExecutor(min(n_cpus, n), mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_write_participant, *job) for job in jobs]:
                done.result()
    else:
        for job in jobs:
            _write_participant(*job)
    _write_dataset_files(out_dir, rows, seed)
    return out_dir


def synth_template_sample(
    rng: np.random.Generator, grid: Grid, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One preprocessed-looking sample drawn directly on a template-space model `grid`.

    What the participant-level preprocessing would output for a synthetic scan (skull-stripped, bias mostly
    corrected, a small residual misregistration, resampling blur), with the cohort's contrast and lesion
    generator; for training without preprocessing hundreds of volumes.

    Returns:
        t1w, flair: float32 (X, Y, Z), `normalise_intensity`-scaled inside the brain, 0 outside.
        brain_mask: uint8 (X, Y, Z), 1 in the brain.
        lesion_mask: uint8 (X, Y, Z), 1 in the lesion; all 0 when `with_lesion` is False.
    """
    anatomy = head_anatomy()
    site = SITES[int(rng.integers(len(SITES)))]
    residual = _random_affine(rng, scale=0.02, rotation_deg=(2.0, 2.0, 2.0), shift_mm=2.0, centre_mm=BRAIN_CENTRE_MM)
    brain, gm, wm = _resample(anatomy.maps, anatomy.grid, grid, residual, warp=_random_warp(rng, sd_mm=1.0))
    tissues = {"gm": gm, "wm": wm, "csf": np.clip(brain - gm - wm, 0.0, 1.0)}
    t1w, flair = _render_pair(rng, site, tissues, grid.shape)
    lesion_mask = np.zeros(grid.shape, dtype=np.uint8)
    if with_lesion:
        params = sample_lesion_params(rng, gm, wm, grid.spacing_mm, territory_mask=_territory_on(grid))
        t1w, flair, lesion_mask = implant_fcd(t1w, flair, gm, wm, params, grid.spacing_mm)
    # What survives preprocessing: a few percent of bias after N4, noise blurred by resampling, and the FLAIR's
    # thick slices smeared along one random axis. Noise spans a wider range than the sites', as real scans do.
    brain_mask = (brain > 0.5).astype(np.uint8)
    t1w_noise, flair_noise = np.array([site.t1w.noise_sd, site.flair.noise_sd]) * rng.uniform(0.7, 2.0)
    t1w = _scanner_effects(rng, t1w, t1w_noise, bias_sd=0.03, blur_vox=(0.5, 0.5, 0.5))
    flair_blur = [0.5, 0.5, 0.5]
    flair_blur[int(rng.integers(3))] = float(rng.uniform(0.5, 1.2))
    flair = _scanner_effects(rng, flair, flair_noise, bias_sd=0.03, blur_vox=tuple(flair_blur))
    return (normalise_intensity(t1w, brain_mask), normalise_intensity(flair, brain_mask), brain_mask,
            lesion_mask)


def main(argv: list[str] | None = None) -> int:
    """`bids_fcd synth OUT_DIR [--n N] [--seed S] [--n_cpus C]`. Exit codes: 0 done, 64 usage, 73 cannot create
    output."""
    parser = _UsageErrorParser(prog="bids_fcd synth", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where to write the BIDS dataset (missing or empty)")
    parser.add_argument("--n", type=int, default=12, help="participants, half of them patients (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--n_cpus", type=int, default=1,
                        help="participants written in parallel processes (default 1; the files are the same)")
    try:
        args = parser.parse_args(argv)
        if args.n < 1:
            parser.error("--n must be at least 1")
        if args.n_cpus < 1:
            parser.error("--n_cpus must be at least 1")
    except SystemExit as stop:  # --help (0) or a usage error (64): return the code, as the main CLI expects
        return int(stop.code or 0)
    try:
        make_cohort(args.out_dir, args.n, args.seed, args.n_cpus)
    except (FileExistsError, NotADirectoryError, PermissionError) as error:
        print(f"bids_fcd synth: cannot create output: {error}", file=sys.stderr)
        return EXIT_CANNOT_CREATE_OUTPUT
    print(f"bids_fcd synth: wrote a cohort of {args.n} to {args.out_dir}")
    return 0


class _UsageErrorParser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; the BIDS-App execution spec says 64."""

    def error(self, message: str) -> None:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ---------------------------------------------------------------------------------------------------- cohort


def _draw_participants(rng: np.random.Generator, n: int) -> list[dict]:
    """participants.tsv rows: groups shuffled over ids, each group dealt round the sites, and a quarter of each
    group (at least one, never all) in the test split."""
    n_patients = (n + 1) // 2
    groups = np.array(["fcd"] * n_patients + ["hc"] * (n - n_patients))
    rng.shuffle(groups)
    sites = np.empty(n, dtype=object)
    split = np.full(n, "train", dtype=object)
    for group in ("fcd", "hc"):
        members = np.flatnonzero(groups == group)
        site_order = rng.permutation(len(SITES))
        sites[members] = [SITES[site_order[i % len(SITES)]].label for i in range(members.size)]
        if members.size >= 2:
            n_test = min(max(1, round(TEST_FRACTION * members.size)), members.size - 1)
            split[rng.choice(members, size=n_test, replace=False)] = "test"
    return [
        {
            "participant_id": f"sub-{index + 1:05d}",
            "group": str(groups[index]),
            "sex": str(rng.choice(["M", "F"])),
            "age": int(rng.integers(6, 61)),
            "site": str(sites[index]),
            "split": str(split[index]),
        }
        for index in range(n)
    ]


def _write_participant(out_dir: Path, subject: str, site: Site, patient: bool, rng: np.random.Generator) -> None:
    """Render one participant on the site's grids and write T1w, FLAIR (+ sidecars) and, for a patient, the ROI."""
    anatomy = head_anatomy()
    # The head in scanner (world) mm: an MNI -> world affine, and a smooth warp pulled back in MNI space. Between
    # the two scans the head moves a little, so the app has a real FLAIR -> T1w registration to do.
    head_to_world = np.linalg.inv(
        _random_affine(rng, scale=0.08, rotation_deg=(12.0, 5.0, 5.0), shift_mm=20.0, centre_mm=HEAD_CENTRE_MM,
                       mean_scale=1.0 / HEAD_SCALE)
    )
    head_to_world[:3, 3] += rng.uniform(-10.0, 10.0, size=3)
    warp = _random_warp(rng, sd_mm=2.5)
    motion = np.linalg.inv(_random_affine(rng, scale=0.0, rotation_deg=(2.0, 2.0, 2.0), shift_mm=2.0,
                                          centre_mm=HEAD_CENTRE_MM))
    t1w_tpl, flair_tpl = _render_pair(rng, site, _head_tissues(rng, anatomy), anatomy.grid.shape)
    lesion_tpl = np.zeros(anatomy.grid.shape, dtype=np.float32)
    if patient:
        params = sample_lesion_params(rng, anatomy.gm, anatomy.wm, 1.0, territory_mask=_territory_on(anatomy.grid))
        # The drawn volume is meant in this participant's scanner space: divided by the head's scaling in MNI
        # space, it comes out at the drawn volume once the head is scaled into the scanner.
        params = replace(params, volume_ml=params.volume_ml / abs(np.linalg.det(head_to_world[:3, :3])))
        t1w_tpl, flair_tpl, lesion = implant_fcd(t1w_tpl, flair_tpl, anatomy.gm, anatomy.wm, params, 1.0)
        lesion_tpl = lesion.astype(np.float32)

    anat = out_dir / subject / "anat"
    anat.mkdir(parents=True)
    for acquisition, image_tpl, world_from_head, suffix in (
        (site.t1w, t1w_tpl, head_to_world, "T1w"),
        (site.flair, flair_tpl, motion @ head_to_world, "FLAIR"),
    ):
        native = _native_grid(rng, acquisition, world_from_head)
        volumes = np.stack([image_tpl, lesion_tpl]) if suffix == "FLAIR" and patient else image_tpl[None]
        slice_axis = int(np.argmax(acquisition.spacing_mm))
        sampled = _resample(volumes, anatomy.grid, native, np.linalg.inv(world_from_head), warp,
                            slice_profile=(slice_axis, max(1, round(acquisition.spacing_mm[slice_axis]))))
        image = _scanner_effects(rng, sampled[0], acquisition.noise_sd, bias_sd=0.15,
                                 blur_vox=tuple(float(rng.uniform(0.0, 0.5)) for _ in range(3)))
        gain = rng.uniform(70.0, 130.0)  # scanners scale arbitrarily; kept small so the files stay small
        stem = f"{subject}_acq-{acquisition.acq}_{suffix}"
        _write_nifti(anat / f"{stem}.nii.gz", np.clip(np.round(image * gain), 0, 32767).astype(np.int16), native)
        sidecar = {"Modality": "MR", **site.scanner, "InstitutionName": f"bids_fcd synthetic {site.label}",
                   **acquisition.sidecar, "SliceThickness": max(acquisition.spacing_mm),
                   "ConversionSoftware": "bids_fcd.synth", "ConversionSoftwareVersion": __version__}
        (anat / f"{stem}.json").write_text(json.dumps(sidecar, indent=4) + "\n")
        if suffix == "FLAIR" and patient:
            _write_nifti(anat / f"{stem}_roi.nii.gz", (sampled[1] >= 0.5).astype(np.uint8), native)


def _write_dataset_files(out_dir: Path, rows: list[dict], seed: int) -> None:
    description = {
        "Name": "bids_fcd synthetic FCD type II cohort",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "Synthetic images derived from the MNI ICBM152 2009a template; keep its notice (README)",
        "Authors": ["bids_fcd contributors"],
        "GeneratedBy": [{"Name": "bids_fcd", "Version": __version__, "Description": f"bids_fcd.synth, seed {seed}"}],
        "ReferencesAndLinks": ["https://openneuro.org/datasets/ds004199", "https://nilearn.github.io"],
    }
    (out_dir / "dataset_description.json").write_text(json.dumps(description, indent=4) + "\n")
    (out_dir / "README").write_text(README.format(version=__version__, seed=seed))
    (out_dir / ".bidsignore").write_text("*_roi.nii.gz\n")
    (out_dir / "participants.json").write_text(json.dumps(PARTICIPANTS_JSON, indent=4) + "\n")
    # As in ds004199: UTF-8 with a byte-order mark and CRLF line ends, which readers must cope with.
    columns = list(rows[0])
    lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in rows]
    (out_dir / "participants.tsv").write_bytes((BOM + "\r\n".join(lines) + "\r\n").encode("utf-8"))


def _write_nifti(path: Path, data: np.ndarray, grid: Grid) -> None:
    """NIfTI-1 with the scanner affine as both qform and sform; gzip without a timestamp, so bytes repeat."""
    image = nib.Nifti1Image(data, grid.affine)
    image.header.set_qform(grid.affine, code=1)
    image.header.set_sform(grid.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=4, mtime=0))


# -------------------------------------------------------------------------------------- anatomy and contrast


def _head_tissues(rng: np.random.Generator, anatomy: Anatomy) -> dict[str, np.ndarray]:
    """Tissue fractions on the head grid: brain tissues plus a shell (CSF, bone, scalp) of random thickness."""
    outside = 1.0 - anatomy.brain
    distance = anatomy.outside_mm + 1.2 * _smooth_noise(rng, anatomy.grid.shape, 20)
    csf_end = rng.uniform(1.5, 3.0)
    bone_end = csf_end + rng.uniform(4.0, 6.5)
    scalp_end = bone_end + rng.uniform(3.5, 6.5)

    def within(radius_mm: float) -> np.ndarray:
        return np.clip(radius_mm - distance + 0.5, 0.0, 1.0)

    csf_shell, bone_shell, head = within(csf_end), within(bone_end), within(scalp_end)
    return {
        "gm": anatomy.gm,
        "wm": anatomy.wm,
        "csf": np.clip(anatomy.brain - anatomy.gm - anatomy.wm, 0.0, 1.0) + outside * csf_shell,
        "bone": outside * (bone_shell - csf_shell),
        "scalp": outside * (head - bone_shell),
    }


def _render_pair(
    rng: np.random.Generator, site: Site, tissues: dict[str, np.ndarray], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """T1w and FLAIR from tissue fractions, with the site's contrast jittered per participant and a shared
    anatomical texture (a few % of smooth intensity variation), in white-matter units."""
    texture = _smooth_noise(rng, shape, 6)
    images = []
    for acquisition in (site.t1w, site.flair):
        intensities = {"wm": 1.0, **{k: v * rng.uniform(0.93, 1.07) for k, v in acquisition.intensities.items()}}
        image = sum(intensities[name] * tissues[name] for name in tissues)
        images.append((image * (1.0 + rng.uniform(0.015, 0.035) * texture)).astype(np.float32))
    return images[0], images[1]


def _scanner_effects(
    rng: np.random.Generator, image: np.ndarray, noise_sd: float, bias_sd: float, blur_vox: tuple[float, ...]
) -> np.ndarray:
    """Blur (PSF, sigma in voxels per axis), a smooth multiplicative bias field, then Rician noise."""
    image = ndimage.gaussian_filter(image, blur_vox) if max(blur_vox) > 0 else image
    bias = np.exp(bias_sd * _smooth_noise(rng, image.shape, max(image.shape) // 3))
    noise_sd = noise_sd * rng.uniform(0.8, 1.25)
    real = image * bias + noise_sd * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = noise_sd * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


# ------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Warp:
    """A smooth displacement field, in mm, on a coarse grid in head (MNI) mm: added after an affine pull-back."""

    displacement_mm: np.ndarray
    grid: Grid


def _random_warp(rng: np.random.Generator, sd_mm: float) -> Warp:
    """Random displacements of ~`sd_mm` on control points 24 mm apart over the head box, lightly smoothed."""
    spacing = 24.0
    shape = tuple(int(np.ceil((high - low) / spacing)) + 3 for low, high in HEAD_BOX_MM)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [low - spacing for low, _ in HEAD_BOX_MM]
    field = ndimage.gaussian_filter(rng.standard_normal((3, *shape)), (0, 0.7, 0.7, 0.7))
    field *= sd_mm / max(float(field.std()), 1e-6)
    return Warp(displacement_mm=field.astype(np.float32), grid=Grid(shape=shape, affine=affine))


def _random_affine(
    rng: np.random.Generator, scale: float, rotation_deg: tuple[float, float, float], shift_mm: float,
    centre_mm: np.ndarray, mean_scale: float = 1.0,
) -> np.ndarray:
    """A random 4x4 mm -> mm affine about `centre_mm`: isotropic and per-axis scale within +-scale of
    `mean_scale`, rotation within +-rotation_deg about x (pitch), y (roll), z (yaw), shift within +-shift_mm."""
    scales = mean_scale * rng.uniform(1.0 - scale, 1.0 + scale) * rng.uniform(1.0 - scale / 3, 1.0 + scale / 3, size=3)
    rotation = Rotation.from_euler("xyz", [rng.uniform(-a, a) for a in rotation_deg], degrees=True).as_matrix()
    linear = rotation @ np.diag(scales)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre_mm - linear @ centre_mm + rng.uniform(-shift_mm, shift_mm, size=3)
    return affine


def _native_grid(rng: np.random.Generator, acquisition: Acquisition, world_from_head: np.ndarray) -> Grid:
    """The scan's voxel grid in scanner mm: stored-axis orientation, a small oblique tilt, and a field of view
    fitted to the head (as an operator sets it) with 4-10 mm to spare; the neck may be cut."""
    letters = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    directions = np.zeros((3, 3))
    for stored_axis, letter in enumerate(acquisition.orientation):
        world_axis, sign = letters[letter]
        directions[world_axis, stored_axis] = sign
    tilt = acquisition.max_oblique_deg
    oblique = Rotation.from_euler("xyz", rng.uniform(-tilt, tilt, size=3), degrees=True).as_matrix()
    axes = oblique @ directions  # columns: unit vectors of the stored axes, in scanner mm
    surface_world = head_anatomy().head_surface_mm @ world_from_head[:3, :3].T + world_from_head[:3, 3]
    along_axes = surface_world @ axes
    margin = rng.uniform(4.0, 10.0, size=3)
    low, high = along_axes.min(axis=0) - margin, along_axes.max(axis=0) + margin
    spacing = np.array(acquisition.spacing_mm)
    shape = tuple(int(n) for n in np.ceil((high - low) / spacing))
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(spacing)
    affine[:3, 3] = axes @ low
    return Grid(shape=shape, affine=np.round(affine, 6))


def _grid_points_mm(grid: Grid) -> np.ndarray:
    """Every voxel centre of `grid` in its mm space, (3, X, Y, Z) float32."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid.shape], indexing="ij"))
    points = np.tensordot(grid.affine[:3, :3].astype(np.float32), index, axes=1)
    return points + grid.affine[:3, 3].astype(np.float32)[:, None, None, None]


@lru_cache(maxsize=4)
def _territory_cached(shape: tuple[int, ...], affine_bytes: bytes) -> np.ndarray:
    return neocortical_territory(Grid(shape=shape, affine=np.frombuffer(affine_bytes).reshape(4, 4)))


def _territory_on(grid: Grid) -> np.ndarray:
    return _territory_cached(grid.shape, np.asarray(grid.affine, dtype=np.float64).tobytes())


def _grid_sample_coordinates(source: Grid, points_mm: np.ndarray) -> np.ndarray:
    """Points (..., 3) in the source's mm space -> grid_sample's normalised coordinates (..., 3).

    grid_sample reads volumes as (N, C, D, H, W) and coordinates as [W, H, D]: for our (X, Y, Z) arrays, D=X,
    H=Y, W=Z, so the last axis is reversed. align_corners=True: -1 and 1 are the first and last voxel centres.
    """
    vox_from_mm = np.linalg.inv(source.affine)
    vox = points_mm @ vox_from_mm[:3, :3].T + vox_from_mm[:3, 3]
    return (2.0 * vox / (np.array(source.shape) - 1.0) - 1.0)[..., ::-1].astype(np.float32)


def _read(volumes: np.ndarray, source: Grid, points_mm: np.ndarray) -> np.ndarray:
    """Trilinear samples of `volumes` (C, X, Y, Z) on `source` at points (x, y, z, 3) in its mm space; 0 outside.
    Returns (C, x, y, z) float32."""
    coordinates = torch.from_numpy(np.ascontiguousarray(_grid_sample_coordinates(source, points_mm)))[None]
    return _grid_sample(volumes, coordinates)


def _grid_sample(volumes: np.ndarray, coordinates: torch.Tensor) -> np.ndarray:
    sampled = torch.nn.functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None], coordinates,
        mode="bilinear", padding_mode="zeros", align_corners=True,
    )
    return sampled[0].numpy()


def _resample(
    volumes: np.ndarray, source: Grid, target: Grid, source_from_target_mm: np.ndarray, warp: Warp | None = None,
    slice_profile: tuple[int, int] | None = None,
) -> np.ndarray:
    """`volumes` (C, X, Y, Z) on `source`, read trilinearly at every voxel of `target` -> (C, *target.shape).

    A target point p (target mm) is read at source mm `source_from_target_mm @ p`, plus `warp`'s displacement
    there. Coordinates are computed exactly on every 4th voxel and interpolated trilinearly in between: exact
    for the affine part, and the warp varies over 24 mm. `slice_profile` (axis, n) averages n sub-samples
    evenly spread across each voxel along that axis, as a thick slice integrates signal.
    """
    lattice_axes = [np.linspace(0.0, n - 1.0, max(2, int(np.ceil((n - 1) / 4)) + 1)) for n in target.shape]
    index = np.stack(np.meshgrid(*lattice_axes, indexing="ij"), axis=-1)
    to_source = source_from_target_mm @ target.affine
    points = index @ to_source[:3, :3].T + to_source[:3, 3]
    if warp is not None:
        points = points + np.moveaxis(_read(warp.displacement_mm, warp.grid, points), 0, -1)
    lattice = torch.from_numpy(np.ascontiguousarray(np.moveaxis(_grid_sample_coordinates(source, points), -1, 0)))
    coordinates = torch.nn.functional.interpolate(
        lattice[None], size=target.shape, mode="trilinear", align_corners=True
    ).permute(0, 2, 3, 4, 1)
    if slice_profile is None:
        return _grid_sample(volumes, coordinates)
    axis, n_sub = slice_profile
    step_vox = np.linalg.inv(source.affine)[:3, :3] @ to_source[:3, axis]  # one target voxel, in source voxels
    one_voxel = (2.0 * step_vox / (np.array(source.shape) - 1.0))[::-1].astype(np.float32)
    total = np.zeros((volumes.shape[0], *target.shape), dtype=np.float32)
    for offset in (np.arange(n_sub) + 0.5) / n_sub - 0.5:
        total += _grid_sample(volumes, coordinates + torch.from_numpy(offset * one_voxel).float())
    return total / n_sub


def _resize(volumes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(C, x, y, z) -> (C, *shape) by trilinear interpolation, corners aligned."""
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[None], size=shape, mode="trilinear",
        align_corners=True,
    )
    return resized[0].numpy()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], correlation_vox: float) -> np.ndarray:
    """Zero-mean, unit-sd random field varying over ~`correlation_vox` voxels: coarse noise upsampled."""
    coarse_shape = tuple(max(2, int(np.ceil(n / correlation_vox)) + 1) for n in shape)
    field = _resize(rng.standard_normal(coarse_shape).astype(np.float32)[None], shape)[0]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


if __name__ == "__main__":
    sys.exit(main())
