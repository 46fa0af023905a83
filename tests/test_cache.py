"""The model-ready cache: keys from input bytes, hits without recomputing, atomic entries under concurrency."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bids_fcd import cache
from bids_fcd.cache import cache_key, load_or_preprocess
from bids_fcd.preprocess import Preprocessed, transform_matrix
from bids_fcd.template import Grid, model_grid

GRID = Grid(shape=(12, 14, 10), affine=np.array([[3.0, 0, 0, -18], [0, 3.0, 0, -40], [0, 0, 3.0, -10],
                                                 [0, 0, 0, 1]]))


def fake_preprocessed(t1w_path: Path, flair_path: Path | None, grid: Grid, **_) -> Preprocessed:
    """Stands in for the real (tens of seconds) preprocessing: values derived from the input bytes."""
    seed = int.from_bytes(Path(t1w_path).read_bytes()[:4], "little")
    rng = np.random.default_rng(seed)
    rigid = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (4.0, -5.0, 6.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    return Preprocessed(
        t1w=rng.normal(size=grid.shape).astype(np.float32),
        flair=rng.normal(size=grid.shape).astype(np.float32) if flair_path else None,
        brain_mask=(rng.random(grid.shape) > 0.5).astype(np.uint8),
        grid=grid,
        xfm_t1w_to_template=affine,
        xfm_flair_to_t1w=sitk.AffineTransform(3) if flair_path else None,
        brain_extraction="deepbet",
        qc={"dice_brain_mask_vs_template": 0.96, "seconds": {"n4": 1.5}},
    )


def slow_fake_preprocessed(*args, **kwargs) -> Preprocessed:
    time.sleep(0.5)  # every racing process misses before any has written
    return fake_preprocessed(*args, **kwargs)


def refuse_to_preprocess(*args, **kwargs):
    raise AssertionError("preprocess called although the cache should have answered")


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    t1w, flair = tmp_path / "sub-01_T1w.nii.gz", tmp_path / "sub-01_FLAIR.nii.gz"
    t1w.write_bytes(b"T1w-bytes" * 1000)
    flair.write_bytes(b"FLAIR-bytes" * 1000)
    return t1w, flair


def assert_same(a: Preprocessed, b: Preprocessed) -> None:
    for name in ("t1w", "flair", "brain_mask"):
        left, right = getattr(a, name), getattr(b, name)
        assert (left is None) == (right is None)
        if left is not None:
            np.testing.assert_array_equal(left, right)
            assert left.dtype == right.dtype
    assert a.grid.shape == b.grid.shape and np.allclose(a.grid.affine, b.grid.affine)
    np.testing.assert_allclose(transform_matrix(a.xfm_t1w_to_template), transform_matrix(b.xfm_t1w_to_template))
    assert (a.xfm_flair_to_t1w is None) == (b.xfm_flair_to_t1w is None)
    assert a.brain_extraction == b.brain_extraction and a.qc == b.qc


def test_key_depends_on_bytes_version_and_grid_not_on_names(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs
    key = cache_key(t1w, flair, GRID)
    assert len(key) == 64 and key == cache_key(t1w, flair, GRID)
    renamed = tmp_path / "renamed_T1w.nii.gz"
    renamed.write_bytes(t1w.read_bytes())
    assert cache_key(renamed, flair, GRID) == key
    assert cache_key(t1w, None, GRID) != key
    assert cache_key(flair, t1w, GRID) != key
    assert cache_key(t1w, flair, model_grid(1.5, (112, 128, 112))) != key
    monkeypatch.setattr(cache, "PREPROCESS_VERSION", "999")
    assert cache_key(t1w, flair, GRID) != key


def test_second_call_is_a_hit_without_preprocessing(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs
    monkeypatch.setattr(cache, "preprocess", fake_preprocessed)
    first = load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    monkeypatch.setattr(cache, "preprocess", refuse_to_preprocess)
    second = load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    assert_same(first, second)
    assert isinstance(second.xfm_t1w_to_template, sitk.AffineTransform)
    entries = list((tmp_path / "cache").iterdir())
    assert [entry.name for entry in entries] == [cache_key(t1w, flair, GRID)]


def test_t1w_only_entry_round_trips(inputs, tmp_path, monkeypatch):
    t1w, _ = inputs
    monkeypatch.setattr(cache, "preprocess", fake_preprocessed)
    first = load_or_preprocess(tmp_path / "cache", t1w, None, GRID)
    monkeypatch.setattr(cache, "preprocess", refuse_to_preprocess)
    assert_same(first, load_or_preprocess(tmp_path / "cache", t1w, None, GRID))


def test_changed_input_file_is_a_miss(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return fake_preprocessed(*args, **kwargs)

    monkeypatch.setattr(cache, "preprocess", counting)
    load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    flair.write_bytes(b"FLAIR-bytes, re-exported" * 1000)
    load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    assert len(calls) == 2
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_failed_preprocessing_leaves_no_entry(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs

    def broken_write(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cache, "preprocess", fake_preprocessed)
    monkeypatch.setattr(cache, "write_transform", broken_write)
    with pytest.raises(OSError, match="disk full"):
        load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreadable_entry_is_recomputed(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs
    monkeypatch.setattr(cache, "preprocess", fake_preprocessed)
    first = load_or_preprocess(tmp_path / "cache", t1w, flair, GRID)
    entry = tmp_path / "cache" / cache_key(t1w, flair, GRID)
    (entry / "arrays.npz").write_bytes(b"not a zip")
    assert_same(first, load_or_preprocess(tmp_path / "cache", t1w, flair, GRID))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]


def _race(cache_dir: Path, t1w: Path, flair: Path, start, results) -> None:
    """One worker process: the slow fake preprocessing, released together with the others."""
    cache.preprocess = slow_fake_preprocessed
    start.wait(timeout=60)
    pre = load_or_preprocess(cache_dir, t1w, flair, GRID)
    results.put(float(pre.t1w.sum()))


def test_concurrent_processes_share_one_complete_entry(inputs, tmp_path, monkeypatch):
    t1w, flair = inputs
    context = multiprocessing.get_context("spawn")  # as the group level runs workers
    start, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_race, args=(tmp_path / "cache", t1w, flair, start, results))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0] * 3
    sums = {results.get(timeout=5) for _ in workers}
    assert len(sums) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_key(t1w, flair, GRID)]
    monkeypatch.setattr(cache, "preprocess", refuse_to_preprocess)
    assert float(load_or_preprocess(tmp_path / "cache", t1w, flair, GRID).t1w.sum()) in sums
