"""Data: leakage-free stratified folds, the split rule, epoch batches, and augmentation that replays."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_fcd import data
from bids_fcd.inputs import Participant
from tests.group_factory import TINY_GRID, one_torch_thread, tiny_samples

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def make_samples(labels: list[int], sites: list[str] | None = None, splits: list[str | None] | None = None,
                 sessions: list[str | None] | None = None,
                 subjects: list[str] | None = None) -> list[data.Sample]:
    """Array-free samples (splits only look at labels, sites and names)."""
    n = len(labels)
    sites = sites or ["A"] * n
    splits = splits or [None] * n
    sessions = sessions or [None] * n
    subjects = subjects or [f"{i:03d}" for i in range(n)]
    empty = np.zeros((1, 1, 1, 1), dtype=np.float32)
    return [data.Sample(Participant(subject=subjects[i], session=sessions[i], t1w=None, flair=None,
                                    label=labels[i], split=splits[i], metadata={"site": sites[i]}),
                        empty, empty[0].astype(bool), None, sites[i]) for i in range(n)]


def test_folds_are_stratified_by_label_and_site():
    labels = [0] * 30 + [1] * 30
    sites = (["A"] * 20 + ["B"] * 10) + (["A"] * 10 + ["B"] * 20)
    plan = data.plan_splits(make_samples(labels, sites), n_folds=5, seed=0)
    assert plan.n_folds == 5 and not plan.test_honoured and plan.warning is None
    labels, sites = np.array(labels), np.array(sites)
    for k in range(5):
        _, validation = plan.fold_indices(k)
        counts = Counter(zip(labels[validation], sites[validation]))
        assert counts == {(0, "A"): 4, (0, "B"): 2, (1, "A"): 2, (1, "B"): 4}


def test_sessions_of_a_participant_stay_in_one_fold():
    subjects = [f"{i // 2:03d}" for i in range(40)]  # two sessions each
    labels = [int(i // 2 % 2) for i in range(40)]
    samples = make_samples(labels, subjects=subjects, sessions=["pre", "post"] * 20)
    plan = data.plan_splits(samples, n_folds=4, seed=1)
    for subject in set(subjects):
        folds = {plan.fold[i] for i, s in enumerate(subjects) if s == subject}
        assert len(folds) == 1
    assert sorted(Counter(plan.fold).values()) == [10, 10, 10, 10]


def test_assert_no_leakage_names_the_participant():
    with pytest.raises(AssertionError, match="sub-x"):
        data.assert_no_leakage(np.array([0, 1, 1]), np.array(["sub-x", "sub-x", "sub-y"]))


def test_split_is_the_test_set_when_its_test_part_holds_both_classes():
    labels = [0, 1] * 10
    splits = ["train"] * 14 + ["test"] * 6
    plan = data.plan_splits(make_samples(labels, splits=splits), n_folds=3, seed=0)
    assert plan.test_honoured and plan.warning is None
    assert list(plan.test_indices) == list(range(14, 20))
    assert set(plan.fold[:14]) == {0, 1, 2}


def test_a_test_part_with_one_class_is_warned_and_everyone_is_cross_validated():
    """ds004199 as published: the 28 `test` participants are all patients."""
    labels = [0] * 12 + [1] * 12
    splits = ["train"] * 12 + ["train"] * 6 + ["test"] * 6
    plan = data.plan_splits(make_samples(labels, splits=splits), n_folds=3, seed=0)
    assert not plan.test_honoured and "only FCD" in plan.warning
    assert len(plan.test_indices) == 0 and len(plan.cv_indices) == 24
    assert plan.official_test.sum() == 6


def test_folds_lowered_for_a_small_class_and_refused_below_two():
    plan = data.plan_splits(make_samples([0] * 10 + [1] * 3), n_folds=5, seed=0)
    assert plan.n_folds == 3 and "lowered" in plan.notes[0]
    with pytest.raises(ValueError, match="at least 2"):
        data.plan_splits(make_samples([0] * 10 + [1]), n_folds=5, seed=0)


def test_rare_strata_join_their_label():
    strata = data.strata_labels(np.array([0, 0, 0, 0, 1]), np.array(["A", "A", "A", "A", "B"]), n_folds=2)
    assert list(strata) == ["0|A"] * 4 + ["1|other"]


def test_site_from_participants_tsv_else_acquisitions():
    unit = Participant("01", None, None, None, metadata={"site": "bonn"})
    assert data.site_of(unit) == "bonn"
    unit.metadata = {"site": "n/a", "T1w_acq": "iso08", "FLAIR_acq": "T2sel"}
    assert data.site_of(unit) == "T1w-iso08_FLAIR-T2sel"


def test_epoch_batches_replay_and_shard_across_ranks():
    first = data.EpochBatches(10, 3, seed=0, fold=1, epoch=2)
    again = data.EpochBatches(10, 3, seed=0, fold=1, epoch=2)
    other = data.EpochBatches(10, 3, seed=0, fold=1, epoch=3)
    assert list(first) == list(again) and list(first) != list(other)
    assert sorted(i for batch in first for i, _ in batch) == list(range(10))
    ranks = [data.EpochBatches(10, 2, 0, 1, 2, rank=r, world=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    seen = {i for r in ranks for batch in r for i, _ in batch}
    assert seen == set(range(10))


def test_volume_dataset_items():
    samples = tiny_samples(2)
    item = data.VolumeDataset(samples)[(0, 0)]
    assert item["image"].shape == (2, 32, 32, 32) and item["image"].dtype == torch.float32
    assert item["brain_mask"].shape == (1, 32, 32, 32)
    control, patient = data.VolumeDataset(samples)[(0, 0)], data.VolumeDataset(samples)[(1, 0)]
    assert control["label"] == 0 and control["voxel_target"] and not control["has_lesion"]
    assert control["lesion"].sum() == 0
    assert patient["label"] == 1 and patient["has_lesion"] and patient["lesion"].sum() > 0


def test_patient_without_mask_trains_only_the_subject_head():
    sample = tiny_samples(2)[1]
    sample.lesion = None
    assert not sample.voxel_target


def test_torchio_augmentation_replays_from_the_seed():
    samples = tiny_samples(2)
    dataset = data.VolumeDataset(samples, data.TorchIOAugmentation(6.0))
    first, again, other = dataset[(1, 7)], dataset[(1, 7)], dataset[(1, 8)]
    for key in ("image", "brain_mask", "lesion"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    outside = first["brain_mask"][0] == 0
    assert torch.all(first["image"][:, outside] == 0)


def batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    samples = tiny_samples(n)
    image = torch.from_numpy(np.stack([s.image for s in samples]))
    mask = torch.from_numpy(np.stack([s.brain_mask for s in samples]))[:, None].float()
    lesion = torch.stack([torch.zeros(1, 32, 32, 32) if s.lesion is None
                          else torch.from_numpy(s.lesion.astype(np.float32))[None] for s in samples])
    return image, mask, lesion


def test_batch_augmentation_replays_identically_from_its_params_and_seed():
    augmentation = data.BatchAugmentation(6.0)
    params = augmentation.sample(torch.Generator().manual_seed(5), 3, 2)
    image, mask, lesion = batch()
    out = augmentation.apply(image, mask, lesion, params)
    again = augmentation.apply(image, mask, lesion, {key: value.clone() for key, value in params.items()})
    for a, b in zip(out, again):
        assert torch.equal(a, b)
    redrawn = augmentation.sample(torch.Generator().manual_seed(5), 3, 2)
    assert all(torch.equal(params[k], redrawn[k]) for k in params)


def identity_params(n: int, channels: int) -> dict[str, torch.Tensor]:
    return {"flip": torch.zeros(n, dtype=torch.bool), "affine": torch.zeros(n, dtype=torch.bool),
            "rotation_deg": torch.zeros(n, 3), "scale": torch.ones(n, 3), "translation_vox": torch.zeros(n,
                                                                                                         3),
            "bias": torch.zeros(n, channels, 3, 3, 3), "gamma": torch.ones(n, channels),
            "noise_std": torch.zeros(n), "noise_seed": torch.zeros(n, dtype=torch.int64)}


def test_identity_params_leave_the_batch_unchanged():
    image, mask, lesion = batch()
    out = data.BatchAugmentation(6.0).apply(image, mask, lesion, identity_params(3, 2))
    assert torch.allclose(out[0], image * mask, atol=1e-6)
    assert torch.equal(out[1], mask) and torch.equal(out[2], lesion)


def test_flip_and_whole_voxel_shift_are_exact():
    image, mask, lesion = batch()
    params = identity_params(3, 2)
    params["flip"][1] = True
    augmentation = data.BatchAugmentation(6.0)
    flipped = augmentation.apply(image, mask, lesion, params)
    assert torch.equal(flipped[0][1], (image[1] * mask[1]).flip(1))
    assert torch.equal(flipped[2][1], lesion[1].flip(1)) and torch.equal(flipped[0][0], image[0] * mask[0])
    params = identity_params(3, 2)
    params["affine"][0] = True
    params["translation_vox"][0] = torch.tensor([2.0, 0.0, 0.0])  # output x samples input x + 2
    shifted = augmentation.apply(image, torch.ones_like(mask), lesion, params)
    assert torch.allclose(shifted[0][0, :, :-2], image[0, :, 2:], atol=1e-5)


def test_rotation_by_90_degrees_matches_rot90_on_a_cube():
    image, mask, lesion = batch(1)
    params = identity_params(1, 2)
    params["affine"][0] = True
    params["rotation_deg"][0] = torch.tensor([0.0, 0.0, 90.0])  # about Z: rotates the X-Y plane
    out = data.BatchAugmentation(6.0).apply(image, torch.ones_like(mask), lesion, params)[0]
    expected = [torch.rot90(image, k, dims=(2, 3)) for k in (1, 3)]
    assert min(float((out - e).abs().max()) for e in expected) < 1e-4


def test_batch_augmentation_intensity_stays_in_the_brain_and_runs_on_the_batch_device():
    image, mask, lesion = batch()
    augmentation = data.BatchAugmentation(6.0)
    params = augmentation.sample(torch.Generator().manual_seed(0), 3, 2)
    out_image, out_mask, out_lesion = augmentation.apply(image, mask, lesion, params)
    assert out_image.device == image.device and out_image.shape == image.shape
    assert torch.all(out_image[out_mask.expand_as(out_image) == 0] == 0)
    assert set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}
    assert float(out_lesion.min()) >= 0 and float(out_lesion.max()) <= 1


def test_sample_seed_depends_on_every_key():
    assert data.sample_seed(0, 1, 2) == data.sample_seed(0, 1, 2)
    assert len({data.sample_seed(0, 1, 2), data.sample_seed(0, 2, 1), data.sample_seed(1, 1, 2)}) == 3


def test_resident_batches_equal_the_dataset_items():
    samples = tiny_samples(3)
    resident = data.ResidentSamples(samples, torch.device("cpu")).batch([2, 0])
    items = [data.VolumeDataset(samples)[(i, 0)] for i in (2, 0)]
    for key in ("image", "brain_mask", "lesion", "label", "voxel_target", "has_lesion"):
        assert torch.equal(resident[key], torch.stack([item[key] for item in items])), key


def test_mimic_copies_change_the_brain_of_controls_and_lesion_masked_patients_only():
    samples = tiny_samples(8)
    samples[3] = data.Sample(samples[3].unit, samples[3].image, samples[3].brain_mask, None, samples[3].site)
    eligible = [i for i, s in enumerate(samples) if s.label == 0 or s.lesion is not None]
    copies = data.mimic_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert sorted(copies) == eligible and 3 not in copies  # a patient whose lesion is unknown: nowhere safe
    for index, copy in copies.items():
        original = samples[index]
        assert copy.unit is original.unit and copy.lesion is original.lesion and copy.site == original.site
        assert not np.array_equal(copy.image, original.image), index
        assert np.array_equal(copy.image[:, ~original.brain_mask], original.image[:, ~original.brain_mask])
    again = data.mimic_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert all(np.array_equal(again[i].image, copies[i].image) for i in copies)
    half = data.mimic_copies(samples, np.arange(8), 0.5, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert len(half) == round(0.5 * len(eligible)) and set(half) <= set(eligible)
    assert data.mimic_copies(samples, np.arange(8), 0.0, 0, TINY_GRID, ("T1w", "FLAIR")) == {}
    assert data.mimic_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w",)) == {}


def test_implant_copies_give_chosen_controls_a_simulated_fcd_lesion_labelled_fcd():
    samples = tiny_samples(8)
    controls = [i for i, s in enumerate(samples) if s.label == 0]
    copies = data.implant_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert sorted(copies) == controls  # patients already have their lesion
    for index, copy in copies.items():
        original = samples[index]
        assert copy.label == 1 and original.label == 0 and copy.unit.subject == original.unit.subject
        assert copy.site == original.site and copy.brain_mask is original.brain_mask
        lesion = copy.lesion >= 0.5
        assert lesion.any() and not (lesion & ~original.brain_mask).any()
        changed = np.abs(copy.image - original.image).max(axis=0) > 1e-6
        near = ndimage.distance_transform_edt(~lesion) <= 3  # the lesion's soft edge and blurred junction
        assert changed.any() and not (changed & ~(near & original.brain_mask)).any(), index
        assert copy.image[1][lesion].mean() > original.image[1][lesion].mean()  # FLAIR-bright, as FCD type II
    again = data.implant_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert all(np.array_equal(again[i].image, copies[i].image) for i in copies)
    half = data.implant_copies(samples, np.arange(8), 0.5, 0, TINY_GRID, ("T1w", "FLAIR"))
    assert len(half) == round(0.5 * len(controls)) and set(half) <= set(controls)
    assert data.implant_copies(samples, np.arange(8), 0.0, 0, TINY_GRID, ("T1w", "FLAIR")) == {}
    assert data.implant_copies(samples, np.arange(8), 1.0, 0, TINY_GRID, ("T1w",)) == {}


def test_with_copies_adds_the_copies_of_the_chosen_samples_only():
    samples = make_samples([0, 1, 0, 1])
    copies = {1: samples[1], 2: samples[2]}
    assert data.with_copies(samples, np.array([0, 1, 3]), copies) == [samples[0], samples[1], samples[3], samples[1]]
