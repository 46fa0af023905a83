"""Shortcut audit: the metadata baseline finds a planted protocol shortcut; ComBat only where it is safe."""

from __future__ import annotations

import numpy as np
import pytest

from bids_fcd import audit
from bids_fcd.data import Sample
from bids_fcd.inputs import Participant
from tests.group_factory import TINY_CONFIG, one_torch_thread, tiny_samples

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


def metadata_samples(flair_acq: list[str], labels: list[int], seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    empty = np.zeros((1, 1, 1, 1), dtype=np.float32)
    samples = []
    for i, (acq, label) in enumerate(zip(flair_acq, labels)):
        metadata = {"FLAIR_acq": acq, "FLAIR_RepetitionTime": 5.0 if acq == "T2sel" else 9.0,
                    "T1w_acq": "iso08", "age_scan": str(int(rng.integers(1, 13))), "sex": "MF"[i % 2],
                    "group": "fcd" if label else "hc", "histopathology": "IIb" if label else "n/a"}
        samples.append(Sample(Participant(f"{i:03d}", None, None, None, label=label, metadata=metadata),
                              empty,
                              empty[0].astype(bool), None, acq))
    return samples


def test_metadata_table_uses_acquisition_and_demographics_only():
    samples = metadata_samples(["T2sel", "tse3dvfl"] * 5, [0, 1] * 5)
    table, sets = audit.metadata_table(samples)
    assert set(sets["acquisition"]) == {"FLAIR_acq", "FLAIR_RepetitionTime"}  # T1w_acq is constant: dropped
    assert sets["demographics"] == ["age", "sex"]
    assert "histopathology" not in table.columns and "group" not in table.columns


def test_metadata_baseline_finds_a_protocol_shortcut():
    """ds004199-like: every control on one FLAIR protocol, most patients on others."""
    labels = [0] * 20 + [1] * 20
    acqs = ["T2sel"] * 20 + ["T2sel"] * 4 + ["tse3dvfl"] * 16
    fold = np.arange(40) % 4
    result = audit.metadata_baseline(metadata_samples(acqs, labels), fold)
    assert result["best"]["auroc"] >= 0.85 and result["best"]["feature_set"] in ("acquisition", "all")
    assert result["feature_sets"]["demographics"]["logistic_regression"] < 0.8
    assert audit.shortcut_warning(result["best"]["auroc"], 0.9).startswith("SHORTCUT RISK")


def test_metadata_baseline_is_near_chance_without_a_shortcut():
    labels = [0, 1] * 20
    acqs = (["T2sel"] * 2 + ["tse3dvfl"] * 2) * 10  # protocol independent of label
    result = audit.metadata_baseline(metadata_samples(acqs, labels, seed=1), np.arange(40) % 4)
    assert result["feature_sets"]["acquisition"]["logistic_regression"] < 0.7


@pytest.mark.parametrize(("metadata", "image", "warned"), [
    (0.85, 0.95, True),  # high on its own
    (0.70, 0.72, True),  # close to the image model, and clearly above chance
    (0.55, 0.58, False),  # close, but both at chance: says nothing
    (0.70, 0.90, False),
    (None, 0.9, False),
])
def test_shortcut_warning_rule(metadata, image, warned):
    assert (audit.shortcut_warning(metadata, image) is not None) == warned


def test_confounding_refuses_collinear_sites():
    labels = np.array([0] * 10 + [1] * 10)
    collinear = audit.confounding(np.array(["A"] * 10 + ["B"] * 10), labels)
    assert collinear["rank_deficient"] and not collinear["harmonise"] and "singular" in collinear["reason"]
    nearly = audit.confounding(np.array(["A"] * 10 + ["A"] + ["B"] * 9), labels)
    assert not nearly["rank_deficient"] and nearly["cramers_v"] >= 0.8 and not nearly["harmonise"]
    mixed = audit.confounding(np.array(["A", "B"] * 10), labels)
    assert mixed["harmonise"] and mixed["cramers_v"] < 0.3


def test_confounding_names_single_class_sites():
    labels = np.array([0] * 10 + [1] * 10)
    sites = np.array(["A"] * 10 + ["A"] * 4 + ["B"] * 6)
    check = audit.confounding(sites, labels)
    assert check["single_class_sites"] == ["B"] and check["harmonise"]


def test_rare_sites_pooled_for_combat():
    batch = audit.batches_for_combat(np.array(["A"] * 5 + ["B"] * 4 + ["c1", "c2", "c3"]))
    assert list(batch[-3:]) == ["other"] * 3
    lone = audit.batches_for_combat(np.array(["A"] * 5 + ["B"] * 3 + ["c1"]))
    assert lone[-1] == "A"


def site_features(n_per_site: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = np.array(["A"] * n_per_site + ["B"] * n_per_site)
    labels = np.array([0, 1] * n_per_site)
    features = rng.normal(size=(2 * n_per_site, 6)) + labels[:, None] * 1.0
    features[batch == "B"] += 3.0  # a scanner offset
    features[:, 5] = 0.0  # a dead feature
    return features, batch, labels


def test_combat_removes_a_site_offset_but_keeps_the_label_effect():
    features, batch, labels = site_features()
    harmonised, estimates = audit.harmonise(features, batch, labels)
    gap_before = abs(features[batch == "A", 0].mean() - features[batch == "B", 0].mean())
    gap_after = abs(harmonised[batch == "A", 0].mean() - harmonised[batch == "B", 0].mean())
    assert gap_before > 2.5 and gap_after < 0.5
    label_gap = harmonised[labels == 1, 0].mean() - harmonised[labels == 0, 0].mean()
    assert label_gap > 0.5
    assert np.all(harmonised[:, 5] == 0) and list(estimates["kept_features"]) == [0, 1, 2, 3, 4]


def test_site_predictability_drops_after_harmonisation():
    features, batch, labels = site_features()
    harmonised, _ = audit.harmonise(features, batch, labels)
    assert audit.site_predictability(features, batch) > 0.9
    assert audit.site_predictability(harmonised, batch) < 0.75


def test_embeddings_and_features_have_the_expected_shapes():
    from bids_fcd.models import build_model

    features, _, _ = site_features()
    assert audit.embed(features, "pca").shape == (40, 2)
    for method in ("umap", "tsne"):  # the report's choices; umap is the default
        embedded = audit.embed(features, method)
        assert embedded.shape == (40, 2) and np.isfinite(embedded).all() and embedded.std(axis=0).min() > 0
    with pytest.raises(ValueError):
        audit.embed(features, "mds")
    samples = tiny_samples(3)
    learned = audit.encoder_features(build_model(TINY_CONFIG), samples, __import__("torch").device("cpu"))
    assert learned.shape[0] == 3 and learned.shape[1] > 1 and np.isfinite(learned).all()
