"""`make demo`, the README's first command, end to end: a validator-clean derivatives dataset with reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bids_fcd.validation import run_validator

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"


@pytest.mark.slow
@pytest.mark.skipif(Path(sys.prefix).resolve() != VENV.resolve() or not (VENV / ".installed").is_file(),
                    reason="runs in the Makefile's own .venv (make test), where `make demo` installs nothing")
def test_make_demo_writes_a_valid_derivatives_dataset_with_reports(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    completed = subprocess.run(["make", "-C", str(REPO), "demo", f"DEMO_BIDS={bids}", f"DEMO_OUT={out}"],
                               capture_output=True, text=True, check=False, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    reports = sorted(out.glob("sub-*.html"))
    assert len(reports) == 4 and all(str(report) in completed.stdout for report in reports)
    predictions = [json.loads(p.read_text()) for p in out.glob("sub-*/anat/*_desc-fcd_prediction.json")]
    assert len(predictions) == 4 and all(p["model"]["name"] == "bids_fcd-default" for p in predictions)
    maps = [p.name for p in out.glob("sub-*/anat/*_probseg.nii.gz")]
    for kind in ("label-FCD_probseg", "label-FCD_desc-saliency_probseg", "label-FCD_desc-uncertainty_probseg"):
        native = [name for name in maps if name.endswith(f"_{kind}.nii.gz") and "_space-" not in name]
        assert len(native) == 4, kind
    assert sum("_space-MNI152NLin2009aSym_" in name for name in maps) == 8  # probability and saliency
    assert [issue for issue in run_validator(out) if issue["severity"] == "error"] == []
