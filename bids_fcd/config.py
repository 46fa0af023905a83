"""The one configuration object that travels with a model's weights (nnU-Net `plans.json` style).

Inference builds both the network and the preprocessing grid from a `ModelConfig` alone, so a checkpoint and
its inputs always agree. It is saved as JSON beside the weights (`model.json`) and inside the checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

TEMPLATE_SPACE = "MNI152NLin2009aSym"
NORMALISATION = "robust-percentile"  # the one intensity scaling `preprocess.normalise_intensity` does
DEFAULT_N_PASSES = 4  # test-time passes of the participant level; thresholds are chosen on maps made this way


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it.

    Attributes:
        architecture: registry name in `bids_fcd.models` (e.g. "mobilenet3d_small").
        channels: input modalities in channel order, BIDS suffixes ("T1w", "FLAIR").
        grid_spacing_mm: isotropic voxel size of the template-space model grid, in mm.
        grid_shape: voxels of the model grid (X, Y, Z), RAS+ axis order; see `bids_fcd.template.model_grid`.
        normalisation: how intensities inside the brain are scaled; only `NORMALISATION` exists, and a
            checkpoint naming another is refused (as is one for another `template_space`).
        histogram_landmarks: per channel, the Nyul-Udupa landmarks (`preprocess.HISTOGRAM_PERCENTILES` of the
            training volumes, averaged) that each input's in-brain histogram is mapped to before the network reads
            it (`preprocess.model_input`); empty: the normalised intensities go in as they are.
        arch_params: keyword arguments of the architecture (width, dropout, ...).
        ensemble_size: networks of that architecture whose logits are averaged (`models.FCDEnsemble`); 1: one.
        subject_threshold: operating point on the subject-level FCD probability.
        voxel_threshold: probability at which the voxel map is cut into candidate clusters.
        min_cluster_mm3: candidate clusters smaller than this (template-space mm3) are dropped.
        training: what the model was trained on and how (data, seed, epochs, folds, metrics).
        versions: package versions at training time.
    """

    architecture: str = "mobilenet3d_small"
    channels: tuple[str, ...] = ("T1w", "FLAIR")
    grid_spacing_mm: float = 1.5
    grid_shape: tuple[int, int, int] = (112, 128, 112)
    normalisation: str = NORMALISATION
    histogram_landmarks: dict = field(default_factory=dict)
    arch_params: dict = field(default_factory=dict)
    ensemble_size: int = 1
    subject_threshold: float = 0.5
    voxel_threshold: float = 0.5
    min_cluster_mm3: float = 50.0
    template_space: str = TEMPLATE_SPACE
    name: str = "bids_fcd-default"
    model_version: str = "untrained"
    training: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    @property
    def min_cluster_voxels(self) -> int:
        """`min_cluster_mm3` in voxels of the model grid: the smallest candidate cluster kept."""
        return max(1, math.ceil(self.min_cluster_mm3 / self.grid_spacing_mm ** 3))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "grid_shape"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        return cls.from_json(Path(path).read_text())

    def updated(self, **changes) -> ModelConfig:
        return replace(self, **changes)
