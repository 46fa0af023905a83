"""Tiny synthetic BIDS datasets for tests (fMRIPrep `minimal_bids` style), built from plain dicts."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DS004199_LAYOUT = SHARED / "data" / "ds004199-layout"


def write_image(path: Path, shape=(10, 12, 9), zooms=(2.0, 2.0, 2.0), seed: int = 0) -> Path:
    """A small non-cubic random volume (deterministic by seed) with a plain RAS affine."""
    data = np.random.default_rng(seed).random(shape).astype(np.float32) * 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), str(path))
    return path


def make_dataset(root: Path, layout: dict[str, list[str]], participants: list[dict] | None = None) -> Path:
    """Write `layout` {"sub-01": ["anat/sub-01_T1w.nii.gz", ...]} with tiny images and JSON sidecars."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    (root / "README").write_text("A tiny synthetic test dataset.\n")
    for index, (subject, files) in enumerate(sorted(layout.items())):
        for relative in files:
            path = root / subject / relative
            if relative.endswith(".json"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                write_image(path, seed=index)
    if participants:
        with open(root / "participants.tsv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(participants[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(participants)
    return root


def fill_ds004199(root: Path) -> Path:
    """A copy of the real ds004199 tree (sidecars, participants.tsv with BOM) with tiny images in place."""
    shutil.copytree(DS004199_LAYOUT, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    manifest = root / "nifti_manifest.tsv"
    with open(manifest) as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    manifest.unlink()  # not part of the published dataset
    for index, row in enumerate(rows):
        write_image(root / row["path"], shape=(6, 7, 5), seed=index)
    return root
