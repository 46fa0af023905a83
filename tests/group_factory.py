"""Tiny cohorts for the group-level tests: model-grid samples drawn by `synth.synth_template_sample`.

Real preprocessing (deepbet, registration) costs ~15 s a participant; these samples are what it would output,
drawn directly on a 32^3 grid of 6 mm voxels in a fraction of a second, so a whole cross-validation runs in
well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.data import PreparedArrays, Sample, site_of
from bids_fcd.inputs import Participant
from bids_fcd.template import model_grid
from tests.bids_factory import make_dataset

TINY_CONFIG = ModelConfig(grid_spacing_mm=6.0, grid_shape=(32, 32, 32), arch_params={"width": 0.25})
TINY_GRID = model_grid(TINY_CONFIG.grid_spacing_mm, TINY_CONFIG.grid_shape)
SITES = (("siteA", "mprage", "spc3d"), ("siteB", "tfl3d", "tra3mm"))


@lru_cache(maxsize=256)
def tiny_arrays(seed: int, with_lesion: bool) -> PreparedArrays:
    """(2, 32, 32, 32) T1w + FLAIR, brain mask and lesion (None for controls) for one synthetic
    participant."""
    from bids_fcd.synth import synth_template_sample

    t1w, flair, brain, lesion = synth_template_sample(np.random.default_rng(seed), TINY_GRID, with_lesion)
    return PreparedArrays(np.stack([t1w, flair]).astype(np.float32), brain.astype(bool),
                          lesion.astype(np.float16) if with_lesion else None)


def participant_row(index: int, n: int, test_fraction: float = 0.25) -> dict:
    """participants.tsv row of participant `index` of `n`: alternating labels, two sites, a test split."""
    site, _, _ = SITES[(index // 2) % len(SITES)]
    return {"participant_id": f"sub-{index + 1:02d}", "group": "fcd" if index % 2 else "hc",
            "sex": "FM"[index % 3 == 0], "age": str(20 + (index * 37 + 11) % 43), "site": site,
            "split": "test" if index >= n * (1 - test_fraction) else "train"}


def tiny_participant(index: int, n: int, session: str | None = None) -> Participant:
    row = participant_row(index, n)
    site = next(s for s in SITES if s[0] == row["site"])
    label = int(row["group"] == "fcd")
    metadata = {**{k: v for k, v in row.items() if k != "participant_id"}, "T1w_acq": site[1],
                "FLAIR_acq": site[2],
                "FLAIR_RepetitionTime": 5.0 if site[0] == "siteA" else 9.0}
    return Participant(subject=row["participant_id"][4:], session=session, t1w=Path("t1w.nii.gz"),
                       flair=Path("flair.nii.gz"), lesion_mask=Path("roi.nii.gz") if label else None,
                       lesion_mask_space="FLAIR" if label else None, label=label, split=row["split"],
                       metadata=metadata)


def tiny_samples(n: int, seed: int = 0) -> list[Sample]:
    """`n` samples: alternating control / FCD (patients with a lesion mask), two sites, last quarter
    `test`."""
    samples = []
    for index in range(n):
        unit = tiny_participant(index, n)
        arrays = tiny_arrays(seed * 1000 + index, bool(unit.label))
        samples.append(Sample(unit, arrays.image, arrays.brain_mask, arrays.lesion, site_of(unit)))
    return samples


def write_tiny_bids(root: Path, n: int) -> Path:
    """A BIDS dataset of `n` participants (tiny placeholder images, FLAIR lesion masks for patients)."""
    rows = [participant_row(i, n) for i in range(n)]
    layout = {}
    for row in rows:
        sub = row["participant_id"]
        _, t1w_acq, flair_acq = next(s for s in SITES if s[0] == row["site"])
        files = [f"anat/{sub}_acq-{t1w_acq}_T1w.nii.gz", f"anat/{sub}_acq-{t1w_acq}_T1w.json",
                 f"anat/{sub}_acq-{flair_acq}_FLAIR.nii.gz", f"anat/{sub}_acq-{flair_acq}_FLAIR.json"]
        if row["group"] == "fcd":
            files.append(f"anat/{sub}_acq-{flair_acq}_FLAIR_roi.nii.gz")
        layout[sub] = files
    make_dataset(root, layout, rows)
    (root / ".bidsignore").write_text("*_roi.nii.gz\n")
    for path in root.rglob("*_FLAIR.json"):
        path.write_text(json.dumps({"RepetitionTime": 5.0 if "spc3d" in path.name else 9.0}))
    return root


def fake_preprocess_unit(unit: Participant, cache_dir: Path, grid, channels,
                         n_threads: int) -> PreparedArrays:
    """Stands in for `data.preprocess_unit` (real preprocessing) in end-to-end tests: same contract, synthetic
    arrays keyed by the participant's number."""
    assert tuple(grid.shape) == TINY_CONFIG.grid_shape, "the run must use the starting model's grid"
    return tiny_arrays(int(unit.subject), unit.label == 1)


@pytest.fixture(autouse=False)
def one_torch_thread():
    """Run a test with one torch thread: on a shared or small machine, OpenMP threads beyond the free cores
    spin against each other (a 32^3 step measured 10-50x slower with 2 threads than with 1 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
