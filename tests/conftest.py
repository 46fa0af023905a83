"""Shared fixtures: tiny BIDS datasets written per session; real volumes only from ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bids_factory import fill_ds004199


@pytest.fixture(scope="session")
def ds004199(tmp_path_factory) -> Path:
    """The real ds004199 file tree filled with tiny synthetic images (read-only use)."""
    return fill_ds004199(tmp_path_factory.mktemp("ds004199") / "ds004199")
