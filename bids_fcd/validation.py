"""Input validation with the official BIDS validator (`bids-validator-deno`, offline).

Errors in the selected participants' folders or in dataset_description.json stop the run (exit 16); errors
elsewhere (e.g. ds004199's phenotype value `TL,PL` in participants.tsv) are warnings, logged in full, so the
app runs on datasets as they are published.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class ValidatorError(Exception):
    """The validator is missing, crashed or timed out: the input could not be validated."""


@dataclass
class ValidationResult:
    blocking: list[dict]  # issues that stop the run
    tolerated: list[dict]  # errors outside the selection, logged as warnings

    def summary(self, limit: int = 10) -> str:
        lines = [f"  {i['code']}: {i.get('location', '?')} {i.get('issueMessage', '') or ''}".rstrip()
                 for i in self.blocking[:limit]]
        if len(self.blocking) > limit:
            lines.append(f"  ... and {len(self.blocking) - limit} more")
        return "\n".join(lines)


def validator_command() -> list[str]:
    """The validator installed beside this Python (virtualenv or container), else the one on PATH."""
    beside = Path(sys.executable).parent / "bids-validator-deno"
    found = str(beside) if beside.exists() else shutil.which("bids-validator-deno")
    if not found:
        raise ValidatorError("bids-validator-deno is not installed (pip install bids-validator-deno)")
    return [found]


def run_validator(dataset: Path) -> list[dict]:
    """All issues the validator reports for `dataset`, as its JSON gives them."""
    try:
        completed = subprocess.run([*validator_command(), str(dataset), "--format", "json"],
                                   check=False, capture_output=True, text=True, timeout=1800)
        return json.loads(completed.stdout)["issues"]["issues"]
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValidatorError(f"bids-validator-deno did not run: {err}") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValidatorError(f"bids-validator-deno gave no JSON report (exit {completed.returncode}): "
                             f"{completed.stderr.strip()[:500]}") from err


def is_blocking(issue: dict, subjects: list[str]) -> bool:
    """An error that concerns the selected participants or the dataset description."""
    location = issue.get("location", "")
    if location == "/dataset_description.json":
        return True
    return any(location.startswith(f"/sub-{subject}/") for subject in subjects)


def validate_input(bids_dir: Path, subjects: list[str]) -> ValidationResult:
    """Validate the input dataset and sort its errors into blocking and tolerated ones."""
    errors = [i for i in run_validator(bids_dir) if i.get("severity") == "error"]
    result = ValidationResult(blocking=[i for i in errors if is_blocking(i, subjects)],
                              tolerated=[i for i in errors if not is_blocking(i, subjects)])
    for issue in result.tolerated:
        log.warning("BIDS validator error outside the selected participants (not blocking): %s", issue)
    return result
