"""Parts shared by the architectures: inverted residuals, the lesion decoder and the evidence-driven heads.

Every encoder in the registry returns four feature maps at strides 2, 4, 8 and 16 (so grid sides must divide by
16) and is wrapped by `FCDNet`, which adds the same light U-Net decoder (voxel-wise lesion logits) and the same
subject-level head (driven by the lesion evidence) to each. Shapes are (N, C, X, Y, Z), RAS+ template axes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 16


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round a width-scaled channel count to a multiple of `divisor` (MobileNet convention), losing <= 10%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def conv_bn_act(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.Hardswish, dilation: int = 1) -> nn.Sequential:
    """Conv3d ('same' padding) -> BatchNorm3d -> activation (none when `act` is None)."""
    layers = [nn.Conv3d(c_in, c_out, k, stride, dilation * (k // 2), dilation, groups, bias=False),
              nn.BatchNorm3d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): global average -> bottleneck -> gate in 0..1 -> rescale channels."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module] = nn.ReLU,
                 gate: type[nn.Module] = nn.Hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv3d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv3d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool3d(x, 1)  # (N, C, 1, 1, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class StochasticDepth(nn.Module):
    """Drop a residual branch for whole samples while training (Huang et al. 2016); identity at inference."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, 1, device=x.device) >= self.p  # (N, 1, 1, 1, 1)
        return x * keep / (1.0 - self.p)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 inverted residual (EfficientNet's MBConv): 1x1 expand -> depthwise kxkxk -> SE -> 1x1 project.

    The residual connection (with stochastic depth) is used when the block keeps shape (stride 1, c_in == c_out).
    """

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, hidden: int, se_channels: int | None,
                 act: type[nn.Module], se_act: type[nn.Module] = nn.ReLU,
                 se_gate: type[nn.Module] = nn.Hardsigmoid, drop_path: float = 0.0):
        super().__init__()
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(conv_bn_act(c_in, hidden, 1, act=act))
        layers.append(conv_bn_act(hidden, hidden, k, stride, groups=hidden, act=act))
        if se_channels:
            layers.append(SqueezeExcitation(hidden, se_channels, act=se_act, gate=se_gate))
        layers.append(conv_bn_act(hidden, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.drop_path = StochasticDepth(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + self.drop_path(out) if self.use_residual else out


class UpBlock(nn.Module):
    """U-Net decoder step: trilinear x2 upsampling, concatenation with the skip, 1x1 mix, depthwise 3x3x3 refine."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int):
        super().__init__()
        self.mix = conv_bn_act(c_deep + c_skip, c_out, 1)
        self.refine = conv_bn_act(c_out, c_out, 3, groups=c_out)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(deep, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.refine(self.mix(torch.cat([up, skip], dim=1)))  # (N, c_out, *skip spatial)


class LesionEvidenceHead(nn.Module):
    """Subject-level FCD logit computed from the voxel-wise lesion map, so that global appearance cannot decide alone.

    evidence e = mean of the top-k voxel logits inside the brain, k = `evidence_mm3` of tissue (multiple-instance
    pooling: a subject is FCD when some region is lesion-like). context c = the deepest encoder features pooled
    with attention softmax(max voxel logit per deep cell), i.e. what the most lesion-like region looks like,
    mapped to a bounded scalar.

        subject_logit = softplus(a) * e + b + sigmoid(e) * context_logit * tanh(w . c)

    The evidence term is monotonic in the lesion map; the learned context term can move the logit by at most
    +-`context_logit` and is gated by sigmoid(e), so with no lesion evidence (e << 0) scanner or protocol
    appearance in the features cannot raise the FCD probability. Training on subject labels alone therefore
    pushes the voxel map, not a global shortcut.
    """

    def __init__(self, c_deep: int, k_voxels: int, context_logit: float, voxel_prior_logit: float):
        super().__init__()
        self.k_voxels = k_voxels
        self.context_logit = context_logit
        self.evidence_scale = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))  # softplus -> 1.0
        # Start at subject probability 0.5 while the voxel map sits at its prior, so that the first subject-level
        # gradients are balanced between classes instead of shifting the whole voxel map up or down.
        self.bias = nn.Parameter(torch.tensor(-voxel_prior_logit))
        self.context = nn.Linear(c_deep, 1)

    def forward(self, voxel_logits: torch.Tensor, deep: torch.Tensor,
                brain_mask: torch.Tensor | None) -> torch.Tensor:
        n = voxel_logits.shape[0]
        k = voxel_logits[0].numel()
        if brain_mask is not None:
            k = int(brain_mask.reshape(n, -1).sum(dim=1).min())
            voxel_logits = voxel_logits.masked_fill(~brain_mask.bool(), torch.finfo(voxel_logits.dtype).min)
        k = max(1, min(self.k_voxels, k))
        evidence = voxel_logits.reshape(n, -1).topk(k, dim=1).values.mean(dim=1)  # (N,)

        cell_logits = F.adaptive_max_pool3d(voxel_logits, deep.shape[2:])  # (N, 1, x, y, z) at the deep stride
        attention = torch.softmax(cell_logits.flatten(2), dim=2)  # (N, 1, x*y*z), 0 for cells outside the brain
        pooled = (deep.flatten(2) * attention).sum(dim=2)  # (N, C)
        context = self.context_logit * torch.tanh(self.context(pooled).squeeze(1))  # (N,)
        return F.softplus(self.evidence_scale) * evidence + self.bias + torch.sigmoid(evidence) * context


class FCDNet(nn.Module):
    """Encoder (strides 2..16) + U-Net decoder for voxel-wise lesion logits + `LesionEvidenceHead`.

    forward(x (N, C, X, Y, Z), brain_mask (N, 1, X, Y, Z) bool or None) returns
    {"voxel_logits": (N, 1, X, Y, Z), "subject_logits": (N,)}. Voxel logits are predicted at stride 2 and
    upsampled trilinearly. Dropout (channel-wise, usable for MC dropout) sits on the deepest features and before
    the voxel head. `cam_layers` names the encoder stages the saliency map (HiResCAM) can target.
    """

    def __init__(self, encoder: nn.Module, voxel_volume_mm3: float, dropout: float = 0.1,
                 evidence_mm3: float = 500.0, context_logit: float = 2.0, lesion_prior: float = 0.01):
        super().__init__()
        self.encoder = encoder
        c_half, c_quarter, c_eighth, c_deep = encoder.channels
        d_half, d_quarter, d_eighth = encoder.decoder_channels
        self.deep_dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.up_eighth = UpBlock(c_deep, c_eighth, d_eighth)
        self.up_quarter = UpBlock(d_eighth, c_quarter, d_quarter)
        self.up_half = UpBlock(d_quarter, c_half, d_half)
        self.head_dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.voxel_head = nn.Conv3d(d_half, 1, 1)
        # Lesion voxels are rare: start the voxel map at a low prior (RetinaNet-style bias initialisation).
        prior_logit = math.log(lesion_prior / (1.0 - lesion_prior))
        nn.init.constant_(self.voxel_head.bias, prior_logit)
        k_voxels = max(1, round(evidence_mm3 / voxel_volume_mm3))
        self.subject_head = LesionEvidenceHead(c_deep, k_voxels, context_logit, prior_logit)

    @property
    def cam_layers(self) -> dict[str, tuple[nn.Module, ...]]:
        """Encoder stages the saliency map can target, by output stride ("stride2", "stride4", "stride8",
        "stride16"), each as the layers whose activations it weighs (here one)."""
        return {f"stride{2 ** (i + 1)}": (stage,) for i, stage in enumerate(self.encoder.stages)}

    def forward(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if any(s % STRIDE for s in x.shape[2:]):
            raise ValueError(f"grid sides must divide by {STRIDE}, got {tuple(x.shape[2:])}")
        half, quarter, eighth, deep = self.encoder(x)  # strides 2, 4, 8, 16
        deep = self.deep_dropout(deep)
        d = self.up_eighth(deep, eighth)
        d = self.up_quarter(d, quarter)
        d = self.up_half(d, half)  # (N, d_half, X/2, Y/2, Z/2)
        voxel_logits = F.interpolate(self.voxel_head(self.head_dropout(d)), size=x.shape[2:],
                                     mode="trilinear", align_corners=False)  # (N, 1, X, Y, Z)
        return {"voxel_logits": voxel_logits,
                "subject_logits": self.subject_head(voxel_logits, deep, brain_mask)}


class FCDEnsemble(nn.Module):
    """Networks of one architecture, trained apart, whose outputs are averaged: soft voting, in logit space.

    Why an ensemble: one training recipe run twice gave models 0.08 apart in subject AUROC (the run-to-run spread
    in benchmarks/results/model_candidates.md); averaging members cancels part of that variance. Why logits, not
    probabilities: a sure member's sigmoid is flat, so averaged probabilities would give the saliency map no
    gradient where the decision is made; the mean logit keeps each member's gradient. forward and `cam_layers`
    are FCDNet's, so inference and saliency take either.
    """

    def __init__(self, members: list[FCDNet]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def cam_layers(self) -> dict[str, tuple[nn.Module, ...]]:
        """Each stage's layers in every member: the ensemble's HiResCAM sums over them."""
        stages = self.members[0].cam_layers
        return {stage: tuple(layer for member in self.members for layer in member.cam_layers[stage])
                for stage in stages}

    def forward(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        outputs = [member(x, brain_mask) for member in self.members]
        return {key: torch.stack([out[key] for out in outputs]).mean(dim=0) for key in outputs[0]}


class StagedEncoder(nn.Module):
    """Base of the registry's encoders: `stages` (4 modules, strides 2, 4, 8, 16), `channels` out of each stage,
    `decoder_channels` the decoder widths at strides 2, 4, 8."""

    stages: nn.ModuleList
    channels: tuple[int, int, int, int]
    decoder_channels: tuple[int, int, int]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
