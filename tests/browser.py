"""Render an HTML page in headless Chromium and check the screenshot shows something."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, size: str = "1200,2400") -> Path:
    """Screenshot `page` (a local HTML file) into `png` with headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--screenshot={png}", Path(page).resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


def rendered_colours(png: Path) -> int:
    """How many distinct colours the screenshot holds: a blank or broken page has very few."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))
