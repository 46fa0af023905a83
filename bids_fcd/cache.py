"""The model-ready cache (`OUTPUT_DIR/cache/`): preprocessing results keyed by the inputs' bytes.

One entry per key, a directory `<cache_dir>/<key>/` holding

- `arrays.npz`: `t1w`, `flair` (when present), `brain_mask`, `grid_shape`, `grid_affine` (model grid, RAS+ mm);
- `xfm_t1w_to_template.txt`, `xfm_flair_to_t1w.txt`: ITK text transforms (see `bids_fcd.preprocess`);
- `preprocessed.json`: version, inputs, brain-extraction method and QC numbers.

An entry is written into a temporary sibling directory and renamed into place, which is atomic on one POSIX
file system: a reader sees a complete entry or none. When processes race on one key, the first rename wins
and the others discard their copies. An entry that cannot be read is moved aside and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bids_fcd.preprocess import Preprocessed, preprocess, write_transform
from bids_fcd.template import Grid

PREPROCESS_VERSION = "4"  # bump whenever preprocessing's output changes (2, 3: rotation searches; 4: MI sampling)

_ARRAYS = "arrays.npz"
_METADATA = "preprocessed.json"
_XFM_T1W = "xfm_t1w_to_template.txt"
_XFM_FLAIR = "xfm_flair_to_t1w.txt"
_CHUNK_BYTES = 1 << 20
_log = logging.getLogger(__name__)


def cache_key(t1w_path: Path, flair_path: Path | None, grid: Grid) -> str:
    """sha256 (hex) of the input files' bytes, `PREPROCESS_VERSION` and the model grid.

    File names do not enter the key, so a moved or renamed dataset still hits its entries.
    """
    digest = hashlib.sha256(f"bids_fcd-preprocess-{PREPROCESS_VERSION}\n".encode())
    for label, path in (("T1w", t1w_path), ("FLAIR", flair_path)):
        if path is None:
            digest.update(f"{label}:none\n".encode())
            continue
        digest.update(f"{label}:{Path(path).stat().st_size}\n".encode())
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK_BYTES):
                digest.update(chunk)
    digest.update(f"grid:{tuple(int(s) for s in grid.shape)}:".encode())
    digest.update(np.round(np.asarray(grid.affine, dtype=np.float64), 6).tobytes())
    return digest.hexdigest()


def load_or_preprocess(
    cache_dir: Path,
    t1w_path: Path,
    flair_path: Path | None,
    grid: Grid,
    n_threads: int = 1,
    logger: logging.Logger | None = None,
) -> Preprocessed:
    """The cached preprocessing of these inputs, computing and storing it on a miss."""
    log = logger or _log
    cache_dir = Path(cache_dir)
    key = cache_key(t1w_path, flair_path, grid)
    entry = cache_dir / key
    if entry.is_dir():
        try:
            pre = _read_entry(entry)
        except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as err:
            log.warning("cache entry %s is unreadable (%s); preprocessing again", entry, err)
            _discard(entry)
        else:
            log.info("%s: preprocessed inputs found in cache %s", t1w_path, entry)
            return pre
    pre = preprocess(t1w_path, flair_path, grid, n_threads=n_threads, logger=log)
    inputs = {"T1w": str(t1w_path), "FLAIR": str(flair_path) if flair_path else None}
    if not _write_entry(cache_dir, key, pre, inputs):
        log.info("%s: another process cached these inputs first; using its entry", t1w_path)
        return _read_entry(entry)  # so every run that used this key used the same arrays
    return pre


def _write_entry(cache_dir: Path, key: str, pre: Preprocessed, inputs: dict) -> bool:
    """Store `pre` under `key`; False when another process stored it first (its entry is kept)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=cache_dir))
    try:
        os.chmod(temporary, 0o755)  # mkdtemp makes it private; the entry should read like any output
        arrays = {"t1w": pre.t1w, "brain_mask": pre.brain_mask, "grid_shape": np.array(pre.grid.shape),
                  "grid_affine": pre.grid.affine}
        if pre.flair is not None:
            arrays["flair"] = pre.flair
        np.savez_compressed(temporary / _ARRAYS, **arrays)
        write_transform(pre.xfm_t1w_to_template, temporary / _XFM_T1W)
        if pre.xfm_flair_to_t1w is not None:
            write_transform(pre.xfm_flair_to_t1w, temporary / _XFM_FLAIR)
        metadata = {"preprocess_version": PREPROCESS_VERSION, "key": key, "inputs": inputs,
                    "brain_extraction": pre.brain_extraction, "qc": pre.qc}
        (temporary / _METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        os.rename(temporary, cache_dir / key)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (cache_dir / key / _METADATA).is_file():
            raise
        return False
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return True


def _read_entry(entry: Path) -> Preprocessed:
    metadata = json.loads((entry / _METADATA).read_text())
    if metadata.get("preprocess_version") != PREPROCESS_VERSION:
        raise ValueError(f"preprocess version {metadata.get('preprocess_version')} != {PREPROCESS_VERSION}")
    with np.load(entry / _ARRAYS) as arrays:
        grid = Grid(shape=tuple(int(s) for s in arrays["grid_shape"]), affine=arrays["grid_affine"])
        t1w, brain_mask = arrays["t1w"], arrays["brain_mask"]
        flair = arrays["flair"] if "flair" in arrays.files else None
    flair_xfm_path = entry / _XFM_FLAIR
    return Preprocessed(
        t1w=t1w,
        flair=flair,
        brain_mask=brain_mask,
        grid=grid,
        xfm_t1w_to_template=sitk.ReadTransform(str(entry / _XFM_T1W)).Downcast(),
        xfm_flair_to_t1w=sitk.ReadTransform(str(flair_xfm_path)).Downcast() if flair_xfm_path.is_file() else None,
        brain_extraction=metadata["brain_extraction"],
        qc=metadata["qc"],
    )


def _discard(entry: Path) -> None:
    """Move an entry out of the way in one rename (readers never see it half-deleted), then delete it."""
    trash = entry.parent / f".trash-{entry.name[:16]}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, trash)
    except OSError:
        return  # another process already moved it
    shutil.rmtree(trash, ignore_errors=True)
