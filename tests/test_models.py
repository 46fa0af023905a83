"""Model registry, shapes, parameter counts, checkpoint I/O and the lesion-driven subject head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.models import (
    REGISTRY,
    CheckpointError,
    build_model,
    count_parameters,
    ensemble_of,
    load_checkpoint,
    save_checkpoint,
)
from bids_fcd.models.blocks import FCDEnsemble, LesionEvidenceHead
from tests.lesion_toy import BRAIN, SHAPE, random_centre, sample, toy_config, trained_model


@pytest.mark.parametrize("architecture", sorted(REGISTRY))
def test_each_architecture_returns_voxel_and_subject_logits(architecture: str) -> None:
    model = build_model(ModelConfig(architecture=architecture, grid_shape=(32, 48, 32))).eval()
    x = torch.randn(2, 2, 32, 48, 32)
    with torch.no_grad():
        out = model(x, torch.ones(2, 1, 32, 48, 32, dtype=torch.bool))
    assert out["voxel_logits"].shape == (2, 1, 32, 48, 32)
    assert out["subject_logits"].shape == (2,)
    assert torch.isfinite(out["voxel_logits"]).all() and torch.isfinite(out["subject_logits"]).all()
    assert set(model.cam_layers) == {"stride2", "stride4", "stride8", "stride16"}


def test_input_channels_follow_the_config() -> None:
    model = build_model(ModelConfig(channels=("T1w",), grid_shape=(16, 32, 16))).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 32, 16))["voxel_logits"].shape == (1, 1, 16, 32, 16)


def test_mobilenet3d_small_is_about_as_small_as_the_seed_card() -> None:
    n = count_parameters(build_model(ModelConfig()))
    assert 0.5e6 < n < 1.5e6, n


def test_width_scales_the_network() -> None:
    small = count_parameters(build_model(ModelConfig(arch_params={"width": 0.5})))
    assert small < 0.5 * count_parameters(build_model(ModelConfig()))


def test_grid_sides_must_divide_by_16() -> None:
    model = build_model(ModelConfig()).eval()
    with pytest.raises(ValueError, match="divide by 16"):
        model(torch.randn(1, 2, 32, 40, 32))


def test_unknown_architecture_or_parameter_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(ModelConfig(architecture="vgg3d"))
    with pytest.raises(ValueError, match="depth"):
        build_model(ModelConfig(arch_params={"depth": 2.0}))  # EfficientNet's, not MobileNet's


@pytest.mark.parametrize("architecture", ["mobilenet3d_small", "efficientnet3d_b0"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, architecture: str) -> None:
    config = ModelConfig(architecture=architecture, grid_shape=(16, 32, 16), subject_threshold=0.37,
                         arch_params={"width": 0.5, "dropout": 0.2})
    model = build_model(config)
    model.train()
    with torch.no_grad():  # move the batch-norm running statistics away from their initial values
        model(torch.randn(2, 2, 16, 32, 16) * 3 + 1)
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, config, path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporary files left
    from bids_fcd.derivatives import current_umask

    for written in tmp_path.iterdir():  # readable by others as the umask allows (a shared OUTPUT_DIR/group)
        assert written.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert ModelConfig.read(tmp_path / "model.json") == config
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "config_json"}

    loaded, loaded_config = load_checkpoint(path, "cpu")
    assert loaded_config == config
    assert not loaded.training
    x = torch.randn(1, 2, 16, 32, 16)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["voxel_logits"], b["voxel_logits"])
    assert torch.equal(a["subject_logits"], b["subject_logits"])


def test_corrupt_or_foreign_checkpoints_raise_value_errors_naming_the_file(tmp_path) -> None:
    config = ModelConfig(grid_shape=(32, 32, 32))
    model = build_model(config)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(model, config, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": model.state_dict()}, foreign)  # the seed card's layout
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "config_json": config}, pickled)  # an object, refused by weights_only
    unknown = tmp_path / "unknown.pt"
    torch.save({"state_dict": model.state_dict(),
                "config_json": config.updated(architecture="vgg3d").to_json()}, unknown)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"state_dict": model.state_dict(),
                "config_json": config.updated(architecture="resnet3d_18").to_json()}, mismatched)
    bad_json = tmp_path / "bad_json.pt"
    torch.save({"state_dict": model.state_dict(), "config_json": "{not json"}, bad_json)
    other_inputs = []  # inputs this version's preprocessing cannot make: refused, not silently fed
    for key, value in (("normalisation", "z-score"), ("template_space", "MNI152NLin6Asym")):
        other_inputs.append(tmp_path / f"{key}.pt")
        save_checkpoint(model, config.updated(**{key: value}), other_inputs[-1])

    for path in (garbage, truncated, foreign, pickled, unknown, mismatched, bad_json, *other_inputs):
        with pytest.raises(ValueError) as error:
            load_checkpoint(path, "cpu")
        assert str(path) in str(error.value), path.name
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", "cpu")


def test_an_ensemble_averages_its_members_logits_and_round_trips_as_one_checkpoint(tmp_path) -> None:
    config = ModelConfig(grid_shape=(16, 32, 16), arch_params={"width": 0.5})
    members, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build_model(config).eval())
        paths.append(tmp_path / f"member{seed}.pt")
        save_checkpoint(members[-1], config.updated(training={"seed": seed}), paths[-1])
    ensemble, ensemble_config = ensemble_of(paths)
    assert ensemble_config.ensemble_size == 2
    assert [member["seed"] for member in ensemble_config.training["members"]] == [0, 1]

    x = torch.randn(1, 2, 16, 32, 16)
    with torch.no_grad():
        outputs = [member(x) for member in members]
        combined = ensemble(x)
    for key in ("voxel_logits", "subject_logits"):
        assert torch.allclose(combined[key], (outputs[0][key] + outputs[1][key]) / 2)
        assert not torch.allclose(outputs[0][key], outputs[1][key])  # two different members, not one twice

    save_checkpoint(ensemble, ensemble_config, tmp_path / "ensemble.pt")
    loaded, loaded_config = load_checkpoint(tmp_path / "ensemble.pt")
    assert isinstance(loaded, FCDEnsemble) and loaded_config == ensemble_config
    with torch.no_grad():
        assert torch.equal(loaded(x)["subject_logits"], combined["subject_logits"])


def test_an_ensemble_refuses_members_that_do_not_fit_together_naming_the_file(tmp_path) -> None:
    config = ModelConfig(grid_shape=(16, 32, 16), arch_params={"width": 0.5})
    first, other_grid = tmp_path / "first.pt", tmp_path / "other_grid.pt"
    save_checkpoint(build_model(config), config, first)
    save_checkpoint(build_model(config.updated(grid_shape=(32, 32, 32))), config.updated(grid_shape=(32, 32, 32)),
                    other_grid)
    with pytest.raises(CheckpointError, match="other_grid.pt: differs .* in grid_shape"):
        ensemble_of([first, other_grid])
    pair = tmp_path / "pair.pt"
    save_checkpoint(*ensemble_of([first, first]), pair)
    with pytest.raises(CheckpointError, match="pair.pt: is already an ensemble"):
        ensemble_of([first, pair])
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_of([first])


def test_subject_logit_rises_with_hand_set_voxel_evidence_and_ignores_global_appearance() -> None:
    model = build_model(ModelConfig(grid_shape=(32, 32, 32))).eval()
    torch.nn.init.zeros_(model.voxel_head.weight)
    with torch.no_grad():
        torch.nn.init.constant_(model.subject_head.context.weight, 10.0)  # a context term as strong as it gets
    plain = torch.randn(1, 2, 32, 32, 32)
    shifted = plain * 5 + 3  # another "scanner": same anatomy, very different global intensities

    probabilities = {}
    for bias in (-12.0, -4.0, 0.0, 4.0):
        torch.nn.init.constant_(model.voxel_head.bias, bias)  # every voxel logit == bias
        with torch.no_grad():
            probabilities[bias] = [torch.sigmoid(model(x)["subject_logits"]).item() for x in (plain, shifted)]
    values = [probabilities[b][0] for b in sorted(probabilities)]
    assert values == sorted(values) and values[-1] - values[0] > 0.9
    assert max(probabilities[-12.0]) < 0.01  # no lesion evidence: appearance alone cannot make it FCD


def test_lesion_evidence_counts_only_inside_the_brain() -> None:
    head = LesionEvidenceHead(c_deep=8, k_voxels=20, context_logit=2.0, voxel_prior_logit=-4.6)
    voxel_logits = torch.full((1, 1, 16, 16, 16), -8.0)
    voxel_logits[..., 2:5, 2:5, 2:5] = 8.0  # a strong "lesion" in one corner
    deep = torch.randn(1, 8, 1, 1, 1)
    inside = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    inside[..., 6:, 6:, 6:] = True
    with torch.no_grad():
        with_lesion_in_brain = head(voxel_logits, deep, None)
        with_lesion_outside = head(voxel_logits, deep, inside)
    assert torch.sigmoid(with_lesion_in_brain).item() > 0.99
    assert torch.sigmoid(with_lesion_outside).item() < 0.05


def test_training_on_lesion_toy_lowers_the_loss_and_separates_the_classes() -> None:
    model, losses = trained_model()
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])

    rng = np.random.default_rng(123)
    brain = torch.from_numpy(BRAIN)[None, None]
    patients, controls = [], []
    with torch.no_grad():
        for _ in range(4):
            lesion_x, lesion = sample(rng, random_centre(rng))
            control_x, _ = sample(rng, None)
            out = model(torch.from_numpy(lesion_x)[None], brain)
            patients.append(torch.sigmoid(out["subject_logits"]).item())
            controls.append(torch.sigmoid(model(torch.from_numpy(control_x)[None], brain)["subject_logits"]).item())
            voxel_prob = torch.sigmoid(out["voxel_logits"])[0, 0].numpy()
            assert voxel_prob[lesion].mean() > 0.5 > voxel_prob[BRAIN & ~lesion].mean()
    assert min(patients) > 0.5 > max(controls), (patients, controls)


def test_toy_config_matches_the_toy_grid() -> None:
    assert toy_config().grid_shape == SHAPE
    assert json.loads(toy_config().to_json())["arch_params"]["dropout"] == 0.0


def test_min_cluster_voxels_rounds_the_volume_up_on_the_grid() -> None:
    assert ModelConfig(grid_spacing_mm=1.5, min_cluster_mm3=50.0).min_cluster_voxels == 15  # 50 / 3.375 = 14.8
    assert ModelConfig(grid_spacing_mm=6.0, min_cluster_mm3=50.0).min_cluster_voxels == 1
