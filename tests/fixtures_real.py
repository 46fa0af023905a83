"""Real MRI volumes from ../shared/data/real and their preprocessing, each computed once per test session.

Use from a test module with `from tests.fixtures_real import preprocessed_stroke  # noqa: F401`, or for the
whole suite from conftest.py (`pytest_plugins = ["tests.fixtures_real"]`). Tests skip, saying why, when the
shared data folder is absent. See ../shared/data/real/README.md for licences: none of these may be shipped.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bids_fcd.config import ModelConfig
from bids_fcd.preprocess import Preprocessed, preprocess
from bids_fcd.template import Grid, model_grid

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
STROKE_T1W = REAL_DATA / "stroke-cstar01" / "sub-cstar01_T1w.nii.gz"  # brain-only, shares the FLAIR's grid
STROKE_FLAIR = REAL_DATA / "stroke-cstar01" / "sub-cstar01_FLAIR.nii.gz"
CHRIS_T1W = REAL_DATA / "chris-t1" / "chris_T1w.nii.gz"  # head with skull, 0.88 mm
MS_T1W = REAL_DATA / "ms-longitudinal-raw" / "sub-msl12_ses-study1_T1w.nii.gz"  # 0.91 x 0.91 x 3 mm, LPS
MS_FLAIR = REAL_DATA / "ms-longitudinal-raw" / "sub-msl12_ses-study1_FLAIR.nii.gz"  # its own 0.72 x 0.72 x 3 mm grid

# A known head motion given to the stroke FLAIR by rewriting its affine: 25, -12, 8 degrees about the scanner
# x, y, z axes through the brain's centre, then 4, -3, 5 mm (RAS+). Registration must undo it: from the
# identity alone it ended up to 5.8 mm off; from the rotation search 0.4 mm.
STROKE_FLAIR_MOTION_DEGREES = (25.0, -12.0, 8.0)
STROKE_FLAIR_MOTION_MM = (4.0, -3.0, 5.0)
N_THREADS = 2


def default_grid() -> Grid:
    config = ModelConfig()
    return model_grid(config.grid_spacing_mm, config.grid_shape)


def rigid_motion_ras(degrees: tuple[float, float, float], shift_mm: tuple[float, float, float],
                     centre_mm: np.ndarray) -> np.ndarray:
    """4x4 scanner RAS+ mm -> RAS+ mm: rotate about `centre_mm` (x, y, z Euler angles), then shift."""
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    motion[:3, 3] = centre_mm - motion[:3, :3] @ centre_mm + np.asarray(shift_mm)
    return motion


def write_moved_copy(source: Path, motion_ras: np.ndarray, destination: Path) -> Path:
    """The same voxels with the affine `motion_ras @ affine`: the head moved by `motion_ras` in the scanner."""
    image = nib.load(source)
    affine = motion_ras @ image.affine
    moved = nib.Nifti1Image(np.asanyarray(image.dataobj), affine, image.header)
    moved.set_qform(affine, 1)
    moved.set_sform(affine, 1)
    moved.to_filename(destination)
    return destination


def write_moved_about_centre(source: Path, degrees: tuple[float, float, float], shift_mm: tuple[float, float, float],
                             destination: Path) -> tuple[Path, np.ndarray]:
    """`write_moved_copy` with the head turned by `degrees` about the image's centre, then shifted by `shift_mm`;
    returns (the copy's path, the motion as 4x4 scanner RAS+ mm)."""
    image = nib.load(source)
    centre_mm = nib.affines.apply_affine(image.affine, (np.array(image.shape) - 1) / 2)
    motion = rigid_motion_ras(degrees, shift_mm, centre_mm)
    return write_moved_copy(source, motion, destination), motion


def distances_mm(found: np.ndarray, expected: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(n,) distances between where two 4x4 transforms put (4, n) homogeneous points (mm in, mm out)."""
    return np.linalg.norm((found @ points - expected @ points)[:3], axis=0)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real MRI folder {REAL_DATA} is absent")
    return REAL_DATA


@pytest.fixture(scope="session")
def stroke_moved_flair(real_data, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """(path of the stroke FLAIR moved by the known motion, that motion as 4x4 scanner RAS+ mm)."""
    return write_moved_about_centre(STROKE_FLAIR, STROKE_FLAIR_MOTION_DEGREES, STROKE_FLAIR_MOTION_MM,
                                    tmp_path_factory.mktemp("stroke") / "sub-cstar01_FLAIR.nii.gz")


@pytest.fixture(scope="session")
def preprocessed_stroke(stroke_moved_flair) -> Preprocessed:
    """Brain-only T1w with its FLAIR moved by a known rigid motion."""
    return preprocess(STROKE_T1W, stroke_moved_flair[0], default_grid(), n_threads=N_THREADS)


@pytest.fixture(scope="session")
def preprocessed_chris(real_data) -> Preprocessed:
    """A head with skull, T1w only."""
    return preprocess(CHRIS_T1W, None, default_grid(), n_threads=N_THREADS)


@pytest.fixture(scope="session")
def preprocessed_ms(real_data) -> Preprocessed:
    """Raw clinical 3 mm-slice T1w and FLAIR with skull, on different grids, LPS-stored."""
    return preprocess(MS_T1W, MS_FLAIR, default_grid(), n_threads=N_THREADS)
