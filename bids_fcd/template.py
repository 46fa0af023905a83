"""The template (nilearn's MNI ICBM152 2009a symmetric, shipped offline) and the model grid defined on it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from nilearn import datasets

# Centre of the MNI152 2009 brain mask's bounding box (x -72..72, y -107..73, z -72..82 mm).
BRAIN_CENTRE_MM = np.array([0.0, -17.0, 5.0])


@dataclass(frozen=True)
class Grid:
    """A voxel grid in template space: shape (X, Y, Z) and the voxel -> MNI RAS+ mm affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing_mm(self) -> float:
        return float(abs(self.affine[0, 0]))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def model_grid(spacing_mm: float, shape: tuple[int, int, int]) -> Grid:
    """An isotropic RAS+ grid of `shape` voxels of `spacing_mm`, centred on the template brain.

    The default (1.5 mm, 112 x 128 x 112) covers the brain's 144 x 180 x 154 mm bounding box with >= 6 mm margin,
    and every side divides by 16, as the encoders' four stride-2 stages need.
    """
    shape = tuple(int(s) for s in shape)
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    centre_voxel = (np.array(shape) - 1) / 2.0
    affine[:3, 3] = BRAIN_CENTRE_MM - spacing_mm * centre_voxel
    return Grid(shape=shape, affine=affine)


@lru_cache(maxsize=4)
def load_template(kind: str = "T1w") -> nib.Nifti1Image:
    """nilearn's 1 mm MNI152 2009a sym images: "T1w" (brain only), "brain_mask", "GM", "WM" probabilities."""
    loaders = {
        "T1w": datasets.load_mni152_template,
        "brain_mask": datasets.load_mni152_brain_mask,
        "GM": datasets.load_mni152_gm_template,
        "WM": datasets.load_mni152_wm_template,
    }
    return loaders[kind](resolution=1)
