"""HiResCAM (Draelos & Carin 2020), the Grad-CAM variant without gradient pooling, in 3D for the subject-level
FCD logit.

The subject logit is pooled from the voxel-wise lesion map, so its gradient reaches an encoder stage through
the decoder at the most lesion-like voxels: the map shows which features the FCD decision rests on.

Why HiResCAM and not Grad-CAM (Selvaraju et al. 2017): Grad-CAM averages each channel's gradient over the whole
volume before weighting the activations, which throws away where the gradient is. With the shipped model
(measured on 6 unseen synthetic patients, the map's peak within 2 voxels of the lesion), Grad-CAM's peak was in
the lesion 0 of 6 times at every stage, while the probability map peaked on every lesion; HiResCAM (gradient x
activation, element-wise, summed over channels) peaked in the lesion 5 of 6 times at stride 2 and at stride 4,
0 of 6 at strides 8 and 16. For a model whose decision is a sum over the voxel map, HiResCAM is provably the
attribution of that sum to each location (Draelos & Carin 2020), and it stays a Grad-CAM-family map: ReLU,
upsampled, scaled 0..1.

Which stage: stride 4 by default. Stride 2's features are one convolution of the input, closer to a filtered
image than to an explanation; stride 4 cells are 4 voxels (6 mm on the 1.5 mm grid). On tests/lesion_toy.py
(a FLAIR-bright lesion plus a T1w-bright decoy) stride 4 also separated the lesion from the decoy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CAM_STAGE = "stride4"


def grad_cam_pass(model: nn.Module, x: torch.Tensor, brain_mask: np.ndarray | torch.Tensor | None,
                  stage: str = DEFAULT_CAM_STAGE) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """One forward + backward pass: the HiResCAM map and the model's (detached) outputs.

    Args:
        model: an `FCDNet` or `FCDEnsemble` (anything with `cam_layers` and the registry's forward signature),
            in the mode the caller wants (eval for a deterministic map).
        x: (1, C, X, Y, Z) input on the model's device.
        brain_mask: (X, Y, Z) bool, or None for no masking; voxels outside are 0 in the map and excluded from
            the subject logit's lesion evidence.
        stage: the encoder stage, by output stride: "stride2", "stride4" (default), "stride8", "stride16".

    Returns:
        (X, Y, Z) float32 map in 0..1 (ReLU of the element-wise gradient x activation summed over channels,
        trilinearly upsampled,
        masked, divided by its maximum; all zeros when nothing supports the FCD class), and the outputs.
    """
    if x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one volume (1, C, X, Y, Z), got {tuple(x.shape)}")
    if stage not in model.cam_layers:
        raise ValueError(f"unknown Grad-CAM stage {stage!r}; choose from {sorted(model.cam_layers)}")
    layers = model.cam_layers[stage]
    mask_t = None
    if brain_mask is not None:
        mask_t = torch.as_tensor(np.asarray(brain_mask, dtype=bool), device=x.device)[None, None]  # (1,1,X,Y,Z)

    activations: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        activations.append(output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.enable_grad():
            # An input that requires grad keeps the graph even when the weights are frozen.
            outputs = model(x.detach().requires_grad_(True), mask_t)
            # Gradients for the activations only: no parameter .grad is touched or computed.
            grads = torch.autograd.grad(outputs["subject_logits"][0], activations)
    finally:
        for handle in handles:
            handle.remove()
    # HiResCAM, no pooling: (1, 1, x, y, z), summed over an ensemble's members before the ReLU, so that it
    # attributes the ensemble's own logit.
    cam = F.relu(sum((grad * activation).sum(dim=1, keepdim=True) for grad, activation in zip(grads, activations)))
    cam = F.interpolate(cam, size=x.shape[2:], mode="trilinear", align_corners=False)[0, 0]  # (X, Y, Z)
    if mask_t is not None:
        cam = cam * mask_t[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return (cam.detach().float().cpu().numpy().astype(np.float32),
            {key: value.detach() for key, value in outputs.items()})


def grad_cam(model: nn.Module, x: torch.Tensor, brain_mask: np.ndarray | torch.Tensor | None,
             stage: str = DEFAULT_CAM_STAGE) -> np.ndarray:
    """HiResCAM map (X, Y, Z) float32 in 0..1 for the FCD class of the one volume `x` (1, C, X, Y, Z)."""
    return grad_cam_pass(model, x, brain_mask, stage)[0]
