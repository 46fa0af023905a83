"""Grad-CAM: it must point at the lesion a trained model found, on the input grid, 0..1 inside the brain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_fcd.config import ModelConfig
from bids_fcd.explain import DEFAULT_CAM_STAGE, grad_cam, grad_cam_pass
from bids_fcd.models import REGISTRY, build_model
from bids_fcd.models.blocks import FCDEnsemble
from tests.lesion_toy import BRAIN, SHAPE, ball, sample, trained_model

# (lesion, decoy) centres in voxels: both hemispheres (X), front and back (Y), low and high (Z).
PLACES = [((10.0, 14.0, 11.0), (21.0, 32.0, 20.0)), ((21.0, 14.0, 20.0), (11.0, 33.0, 12.0)),
          ((11.0, 33.0, 20.0), (21.0, 14.0, 12.0)), ((21.0, 32.0, 12.0), (10.0, 14.0, 20.0))]


@pytest.mark.parametrize(("centre", "decoy"), PLACES)
def test_grad_cam_points_at_the_lesion_not_at_an_equally_bright_decoy(centre, decoy) -> None:
    model, _ = trained_model()
    x, lesion = sample(np.random.default_rng(7), np.array(centre), np.array(decoy))
    cam = grad_cam(model, torch.from_numpy(x)[None], BRAIN)

    peak = np.unravel_index(np.argmax(cam), cam.shape)
    assert np.linalg.norm(np.array(peak) - centre) <= 6.0, (peak, centre)
    assert np.sign(peak[0] - (SHAPE[0] - 1) / 2) == np.sign(centre[0] - (SHAPE[0] - 1) / 2)  # the right hemisphere
    assert cam[lesion].mean() > 3 * cam[BRAIN & ~lesion].mean()
    assert cam[lesion].mean() > 3 * cam[ball(np.array(decoy))].mean()  # class-specific, not image contrast


def test_grad_cam_is_on_the_input_grid_in_0_1_and_zero_outside_the_brain() -> None:
    model, _ = trained_model()
    x, _ = sample(np.random.default_rng(3), np.array(PLACES[0][0]))
    cam, outputs = grad_cam_pass(model, torch.from_numpy(x)[None], BRAIN)
    assert cam.shape == SHAPE and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    assert not cam[~BRAIN].any()
    assert outputs["voxel_logits"].shape == (1, 1, *SHAPE) and not outputs["subject_logits"].requires_grad
    assert all(p.grad is None for p in model.parameters())  # explanation leaves the weights' gradients alone


def test_an_ensembles_saliency_weighs_every_member_and_points_at_the_lesion() -> None:
    (first, _), (second, _) = trained_model(seed=0), trained_model(seed=1)
    centre = np.array(PLACES[1][0])
    x, lesion = sample(np.random.default_rng(5), centre, np.array(PLACES[1][1]))
    x = torch.from_numpy(x)[None]
    cams = {name: grad_cam(model, x, BRAIN) for name, model in (
        ("first", first), ("second", second),
        ("first+second", FCDEnsemble([first, second]).eval()), ("second+first", FCDEnsemble([second, first]).eval()))}

    assert np.allclose(cams["first+second"], cams["second+first"], atol=1e-6)  # no member is the one that counts
    assert not np.allclose(cams["first+second"], cams["first"], atol=1e-3)
    assert not np.allclose(cams["first+second"], cams["second"], atol=1e-3)
    peak = np.unravel_index(np.argmax(cams["first+second"]), SHAPE)
    assert np.linalg.norm(np.array(peak) - centre) <= 6.0, (peak, centre)
    assert cams["first+second"][lesion].mean() > 3 * cams["first+second"][BRAIN & ~lesion].mean()


@pytest.mark.parametrize("architecture", sorted(REGISTRY))
def test_every_architecture_exposes_its_grad_cam_stages(architecture: str) -> None:
    model = build_model(ModelConfig(architecture=architecture, grid_shape=(16, 32, 16),
                                    arch_params={"width": 0.25})).eval().requires_grad_(False)  # frozen weights
    x = torch.randn(1, 2, 16, 32, 16)
    brain = np.ones((16, 32, 16), dtype=bool)
    for stage in model.cam_layers:
        cam = grad_cam(model, x, brain, stage=stage)
        assert cam.shape == (16, 32, 16) and 0.0 <= cam.min() and cam.max() <= 1.0
    assert DEFAULT_CAM_STAGE in model.cam_layers
    with pytest.raises(ValueError, match="stage"):
        grad_cam(model, x, brain, stage="last")
