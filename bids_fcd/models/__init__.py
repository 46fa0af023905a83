"""Model registry and checkpoint I/O.

`build_model(config)` turns a `ModelConfig` into an `FCDNet`: the encoder named by `config.architecture` with the
shared decoder and lesion-evidence head (or, with `config.ensemble_size` > 1, an `FCDEnsemble` of such networks). `config.arch_params` holds keyword arguments of both: the encoder's
(`width`, `stochastic_depth`, EfficientNet's `depth`) and the head's (`dropout`, `evidence_mm3`,
`context_logit`). Checkpoints hold only tensors and a JSON string, so `torch.load(weights_only=True)` reads them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from ..config import NORMALISATION, TEMPLATE_SPACE, ModelConfig
from ..derivatives import atomic_path
from .blocks import FCDEnsemble, FCDNet
from .efficientnet3d import EfficientNet3DB0
from .mobilenet3d import MobileNetV3Small3D
from .resnet3d import ResNet3D18

REGISTRY: dict[str, type[nn.Module]] = {
    "mobilenet3d_small": MobileNetV3Small3D,
    "resnet3d_18": ResNet3D18,
    "efficientnet3d_b0": EfficientNet3DB0,
}
HEAD_PARAMS = ("dropout", "evidence_mm3", "context_logit")


def build_model(config: ModelConfig) -> FCDNet | FCDEnsemble:
    """The network `config` describes, freshly initialised. Unknown names or arch_params raise ValueError."""
    if config.ensemble_size < 1:
        raise ValueError(f"ensemble_size must be >= 1, got {config.ensemble_size}")
    if config.ensemble_size > 1:
        return FCDEnsemble([_network(config) for _ in range(config.ensemble_size)])
    return _network(config)


def _network(config: ModelConfig) -> FCDNet:
    """One network of `config`: the model itself, or one member of its ensemble."""
    if config.architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(REGISTRY))}")
    encoder_cls = REGISTRY[config.architecture]
    params = dict(config.arch_params)
    head = {key: params.pop(key) for key in HEAD_PARAMS if key in params}
    accepted = set(inspect.signature(encoder_cls).parameters) - {"in_channels"}
    if unknown := sorted(set(params) - accepted):
        raise ValueError(f"unknown arch_params for {config.architecture}: {unknown}; "
                         f"accepted: {sorted(accepted | set(HEAD_PARAMS))}")
    encoder = encoder_cls(in_channels=len(config.channels), **params)
    return FCDNet(encoder, voxel_volume_mm3=config.grid_spacing_mm ** 3, **head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CheckpointError(ValueError):
    """A file that is not a readable bids_fcd checkpoint (bad input data: exit 65)."""


def save_checkpoint(model: nn.Module, config: ModelConfig, path: Path) -> None:
    """Write `path` ({"state_dict", "config_json"}, CPU tensors) and the config beside it as `path.with_suffix(".json")`."""
    path = Path(path)
    if config.architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {config.architecture!r}")
    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "config_json": config.to_json()}
    with atomic_path(path) as temporary:  # atomic, and readable as the umask allows, like every output
        torch.save(state, temporary)
    with atomic_path(path.with_suffix(".json")) as temporary:
        temporary.write_text(config.to_json())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[FCDNet | FCDEnsemble, ModelConfig]:
    """Rebuild the model of a checkpoint written by `save_checkpoint`, on `device`, in eval mode.

    Raises FileNotFoundError when `path` is missing and CheckpointError naming the file when it is not a readable
    bids_fcd checkpoint (corrupt, pickled code, another program's weights, unknown architecture, wrong tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable model checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not {"state_dict", "config_json"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a bids_fcd checkpoint (expected 'state_dict' and 'config_json', got {keys})")
    try:
        config = ModelConfig.from_json(state["config_json"])
        model = build_model(config)
    except (TypeError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: invalid model configuration ({err})") from err
    for key, supported in (("normalisation", NORMALISATION), ("template_space", TEMPLATE_SPACE)):
        if getattr(config, key) != supported:
            raise CheckpointError(f"{path}: {key} {getattr(config, key)!r} is not what this version's preprocessing "
                                  f"makes ({supported!r})")
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match architecture {config.architecture!r} ({err})") from err
    return model.to(device).eval(), config


# What must agree between an ensemble's members: everything that builds the network or feeds it.
ENSEMBLE_KEYS = ("architecture", "arch_params", "channels", "grid_spacing_mm", "grid_shape", "normalisation",
                 "histogram_landmarks", "template_space")


def ensemble_of(paths: list[Path]) -> tuple[FCDEnsemble, ModelConfig]:
    """The single-network checkpoints at `paths` as one `FCDEnsemble` (CPU, eval mode) and its config.

    The config is the first member's with `ensemble_size` set and each member's training record kept under
    training["members"]; thresholds are left for the caller to choose on the ensemble's own outputs. A member
    that is itself an ensemble, or differs from the first in `ENSEMBLE_KEYS`, is a CheckpointError naming it.
    """
    if len(paths) < 2:
        raise ValueError(f"an ensemble needs at least 2 checkpoints, got {len(paths)}")
    loaded = [load_checkpoint(path) for path in paths]
    first = loaded[0][1]
    for path, (_, config) in zip(paths, loaded):
        if config.ensemble_size != 1:
            raise CheckpointError(f"{path}: is already an ensemble of {config.ensemble_size}; give its members")
        if differing := [key for key in ENSEMBLE_KEYS if getattr(config, key) != getattr(first, key)]:
            raise CheckpointError(f"{path}: differs from {paths[0]} in {', '.join(differing)}")
    members = [{"checkpoint": Path(path).name, **member.training} for path, (_, member) in zip(paths, loaded)]
    config = first.updated(ensemble_size=len(paths), training={"members": members})
    return FCDEnsemble([model for model, _ in loaded]).eval(), config
