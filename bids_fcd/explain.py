"""Grad-CAM (Selvaraju et al. 2017) in 3D for the subject-level FCD logit.

The subject logit is pooled from the voxel-wise lesion map, so its gradient reaches an encoder stage through
the decoder at the most lesion-like voxels: the map shows which features the FCD decision rests on.

Which stage: the stride-4 encoder stage by default. In these U-Net-shaped networks the decoder takes the lesion
evidence from the skip connections, and the deepest stage carries context. Measured on tests/lesion_toy.py (a
FLAIR-bright lesion, plus a T1w-bright decoy in every volume, 40 training steps), over 4 volumes:
stride 16 gave an all-zero map (its channel-averaged gradients weigh the deep features negatively); stride 8
peaked 7-22 voxels from the lesion; stride 4 peaked within 3.7-5.5 voxels (its cells are 4 voxels), with a
mean 5-11x higher in the lesion than in the rest of the brain and 8-500x higher than on the decoy (the summed
activations, without gradients, peaked 8-27 voxels away); stride 2 peaked within 1 voxel, but its
features are one convolution of the input, closer to a filtered image than to an explanation on real scans.
Re-check the choice on real lesions with a trained model; `stage` selects any of the four.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CAM_STAGE = "stride4"


def grad_cam_pass(model: nn.Module, x: torch.Tensor, brain_mask: np.ndarray | torch.Tensor | None,
                  stage: str = DEFAULT_CAM_STAGE) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """One forward + backward pass: the Grad-CAM map and the model's (detached) outputs.

    Args:
        model: an `FCDNet` (anything with `cam_layers` and the registry's forward signature), in the mode the
            caller wants (eval for a deterministic map).
        x: (1, C, X, Y, Z) input on the model's device.
        brain_mask: (X, Y, Z) bool, or None for no masking; voxels outside are 0 in the map and excluded from
            the subject logit's lesion evidence.
        stage: the encoder stage, by output stride: "stride2", "stride4" (default), "stride8", "stride16".

    Returns:
        (X, Y, Z) float32 map in 0..1 (ReLU of the gradient-weighted activations, trilinearly upsampled,
        masked, divided by its maximum; all zeros when nothing supports the FCD class), and the outputs.
    """
    if x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one volume (1, C, X, Y, Z), got {tuple(x.shape)}")
    if stage not in model.cam_layers:
        raise ValueError(f"unknown Grad-CAM stage {stage!r}; choose from {sorted(model.cam_layers)}")
    layer = model.cam_layers[stage]
    mask_t = None
    if brain_mask is not None:
        mask_t = torch.as_tensor(np.asarray(brain_mask, dtype=bool), device=x.device)[None, None]  # (1,1,X,Y,Z)

    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured["activation"] = output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            # An input that requires grad keeps the graph even when the weights are frozen.
            outputs = model(x.detach().requires_grad_(True), mask_t)
            activation = captured["activation"]  # (1, K, x, y, z)
            # Gradients for the activation only: no parameter .grad is touched or computed.
            (grad,) = torch.autograd.grad(outputs["subject_logits"][0], activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3, 4), keepdim=True)  # (1, K, 1, 1, 1): pooled gradients
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))  # (1, 1, x, y, z)
    cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]  # (X, Y, Z)
    if mask_t is not None:
        cam = cam * mask_t[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return (cam.detach().float().cpu().numpy().astype(np.float32),
            {key: value.detach() for key, value in outputs.items()})


def grad_cam(model: nn.Module, x: torch.Tensor, brain_mask: np.ndarray | torch.Tensor | None,
             stage: str = DEFAULT_CAM_STAGE) -> np.ndarray:
    """Grad-CAM map (X, Y, Z) float32 in 0..1 for the FCD class of the one volume `x` (1, C, X, Y, Z)."""
    return grad_cam_pass(model, x, brain_mask, stage)[0]
