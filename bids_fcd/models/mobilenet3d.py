"""MobileNetV3-Small-3D encoder of the seed card (000), for T1w + FLAIR at the template grid.

Howard et al. 2019 (MobileNetV3-Small) made volumetric as in the card: 3D inverted residual blocks with
squeeze-excitation and hard-swish, a multi-view fusion of axial/coronal/sagittal 1D depthwise convolutions,
stochastic depth rising to 0.2. One change: the card's last stride-2 block (48 -> 96) keeps stride 1, so the
encoder's output stride is 16 (the 1.5 mm grid's 112 x 128 x 112 divides by 16, not 32) and the deepest map
(7 x 8 x 7, 24 mm cells) stays fine enough to localise a lesion. The card's 576-channel head and classifier are
replaced by `FCDNet`'s decoder and lesion-evidence head.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import InvertedResidual, StagedEncoder, conv_bn_act, make_divisible

HS, RE = nn.Hardswish, nn.ReLU

# (c_in, c_out, kernel, stride, expansion, squeeze-excitation, activation); the card's table, stages split at strides.
STAGES = (
    ((16, 16, 3, 2, 1, True, RE),),  # stride 4
    ((16, 24, 3, 2, 4, False, RE), (24, 24, 3, 1, 3, False, RE)),  # stride 8
    ((24, 40, 5, 2, 3, True, HS), (40, 40, 5, 1, 3, True, HS), (40, 48, 5, 1, 3, True, HS),
     (48, 96, 5, 1, 6, True, HS), (96, 96, 5, 1, 6, True, HS)),  # stride 16 (card: last stride-2 block -> 1)
)


class MultiViewFusion(nn.Module):
    """The card's multi-view fusion: depthwise 1D convolutions along X, Y and Z, concatenated and mixed by 1x1."""

    def __init__(self, channels: int):
        super().__init__()
        self.axial = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), groups=channels)
        self.coronal = nn.Conv3d(channels, channels, (1, 3, 1), padding=(0, 1, 0), groups=channels)
        self.sagittal = nn.Conv3d(channels, channels, (1, 1, 3), padding=(0, 0, 1), groups=channels)
        self.fusion = nn.Conv3d(3 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = torch.cat([self.axial(x), self.coronal(x), self.sagittal(x)], dim=1)  # (N, 3C, X, Y, Z)
        return self.fusion(views)


class MobileNetV3Small3D(StagedEncoder):
    """Stages at strides 2 (stem), 4, 8, 16 (+ multi-view fusion); `width` scales every channel count."""

    def __init__(self, in_channels: int, width: float = 1.0, stochastic_depth: float = 0.2):
        super().__init__()

        def c(n: int) -> int:
            return make_divisible(n * width)

        n_blocks = sum(len(stage) for stage in STAGES)
        stages: list[nn.Module] = [conv_bn_act(in_channels, c(16), 3, 2)]
        i = 0
        for stage in STAGES:
            blocks = []
            for c_in, c_out, k, s, exp, se, act in stage:
                hidden = c(c_in) * exp
                drop = stochastic_depth * i / (n_blocks - 1)
                blocks.append(InvertedResidual(c(c_in), c(c_out), k, s, hidden, hidden // 4 if se else None,
                                               act, drop_path=drop))
                i += 1
            stages.append(nn.Sequential(*blocks))
        stages[-1].append(MultiViewFusion(c(96)))
        self.stages = nn.ModuleList(stages)
        self.channels = (c(16), c(16), c(24), c(96))
        self.decoder_channels = (c(16), c(24), c(32))
