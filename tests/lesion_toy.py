"""A toy FCD task for model and explanation tests: an ellipsoid "brain" with noise, for patients one bright FLAIR
blob (the lesion, with its mask), and in everyone one bright T1w blob (a decoy the model must learn to ignore, so
that an explanation has to be class-specific rather than follow image contrast). Small enough to train the
default network in a few seconds on a CPU."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from bids_fcd.config import ModelConfig
from bids_fcd.models import FCDNet, build_model

SHAPE = (32, 48, 32)
LESION_RADIUS = 3.5  # voxels
_COORDS = np.indices(SHAPE, dtype=np.float32)  # (3, X, Y, Z)
_MIDDLE = (np.array(SHAPE) - 1) / 2
BRAIN = ((((_COORDS - _MIDDLE[:, None, None, None]) / (np.array(SHAPE) / 2)[:, None, None, None]) ** 2).sum(0)
         < 0.8)


def toy_config(**arch_params) -> ModelConfig:
    return ModelConfig(grid_shape=SHAPE, arch_params={"dropout": 0.0, "stochastic_depth": 0.0, **arch_params})


def random_centre(rng: np.random.Generator) -> np.ndarray:
    """A lesion centre well inside the brain (voxel coordinates)."""
    while True:
        centre = _MIDDLE + rng.uniform(-1, 1, 3) * (np.array(SHAPE) / 2 - 8)
        if BRAIN[tuple(np.rint(centre).astype(int))]:
            scaled = (centre - _MIDDLE) / (np.array(SHAPE) / 2)
            if (scaled ** 2).sum() < 0.5:
                return centre


def ball(centre: np.ndarray) -> np.ndarray:
    return ((_COORDS - np.asarray(centre, dtype=np.float32)[:, None, None, None]) ** 2).sum(0) <= LESION_RADIUS ** 2


def sample(rng: np.random.Generator, centre: np.ndarray | None,
           decoy_centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(2, X, Y, Z) T1w-, FLAIR-like channels and the (X, Y, Z) lesion mask; no lesion when `centre` is None.
    The decoy is drawn at random unless `decoy_centre` is given."""
    x = rng.normal(0.0, 0.3, (2, *SHAPE)).astype(np.float32)
    x[0] += 1.0
    x[1] += 0.8
    x *= BRAIN
    x[0] += 1.5 * ball(random_centre(rng) if decoy_centre is None else decoy_centre)
    lesion = np.zeros(SHAPE, dtype=bool) if centre is None else ball(centre)
    x[1] += 1.5 * lesion
    return x, lesion


def batch(rng: np.random.Generator, labels: list[int]) -> tuple[torch.Tensor, ...]:
    """x (N, 2, X, Y, Z), brain (N, 1, X, Y, Z) bool, lesion (N, 1, X, Y, Z) float, labels (N,)."""
    pairs = [sample(rng, random_centre(rng) if y else None) for y in labels]
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))
    lesion = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
    brain = torch.from_numpy(BRAIN)[None, None].expand(len(labels), 1, *SHAPE)
    return x, brain, lesion, torch.tensor(labels, dtype=torch.float32)


def loss_fn(out: dict[str, torch.Tensor], lesion: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Subject BCE + voxel BCE + soft Dice: the joint objective the evidence head is built for."""
    prob = torch.sigmoid(out["voxel_logits"])
    dice = 1 - (2 * (prob * lesion).sum() + 1) / (prob.sum() + lesion.sum() + 1)
    return (F.binary_cross_entropy_with_logits(out["subject_logits"], labels)
            + F.binary_cross_entropy_with_logits(out["voxel_logits"], lesion) + dice)


@lru_cache(maxsize=1)
def trained_model(steps: int = 40, seed: int = 0) -> tuple[FCDNet, list[float]]:
    """The default architecture trained `steps` Adam steps on batches of 2 controls + 2 patients; the losses."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(toy_config())
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core CPU, 2 OpenMP threads spin-waiting on each other ran 5-10x slower
    try:
        model.train()
        for _ in range(steps):
            x, brain, lesion, labels = batch(rng, [0, 1, 0, 1])
            loss = loss_fn(model(x, brain), lesion, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    optimiser.zero_grad(set_to_none=True)
    return model.eval(), losses
