"""bids_fcd: a BIDS App that localises focal cortical dysplasia in T1w + FLAIR MRI (research use only)."""

from importlib import metadata
from pathlib import Path


def _read_version() -> str:
    """The version lives in the repository's `version` file; an installed package reads its own metadata."""
    source_file = Path(__file__).resolve().parent.parent / "version"
    if source_file.is_file():
        return source_file.read_text().strip()
    return metadata.version("bids_fcd")


__version__ = _read_version()
