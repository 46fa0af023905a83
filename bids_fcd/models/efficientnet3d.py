"""EfficientNet3D-B0 encoder (Tan & Le 2019; 3D as in the OASIS seed 003).

MBConv blocks (inverted residuals with squeeze-excitation and SiLU) in B0's seven stages; `width` and `depth`
are the compound-scaling multipliers. Two changes for the voxel-wise task: stage 6 keeps stride 1 so the output
stride is 16, and the 1280-channel head convolution is dropped (`FCDNet`'s decoder and evidence head replace it).
"""

from __future__ import annotations

import math

from torch import nn

from .blocks import InvertedResidual, StagedEncoder, conv_bn_act, make_divisible

# (expansion, kernel, stride, c_out, repeats) of B0; grouped into encoder stages at strides 2, 4, 8, 16.
STAGES = (
    ((1, 3, 1, 16, 1),),
    ((6, 3, 2, 24, 2),),
    ((6, 5, 2, 40, 2),),
    ((6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 1, 192, 4), (6, 3, 1, 320, 1)),  # B0's stage 6 has stride 2
)


class EfficientNet3DB0(StagedEncoder):
    """Stages at strides 2 (stem + MBConv1), 4, 8, 16; stochastic depth rises linearly to `stochastic_depth`."""

    def __init__(self, in_channels: int, width: float = 1.0, depth: float = 1.0, stochastic_depth: float = 0.2):
        super().__init__()
        specs = [(stage, e, k, s if j == 0 else 1, make_divisible(c * width))  # one row per MBConv block
                 for stage, rows in enumerate(STAGES) for e, k, s, c, r in rows for j in range(math.ceil(r * depth))]
        c_in = make_divisible(32 * width)
        stages: list[list[nn.Module]] = [[conv_bn_act(in_channels, c_in, 3, 2, act=nn.SiLU)], [], [], []]
        channels = [0, 0, 0, 0]
        for i, (stage, e, k, s, c_out) in enumerate(specs):
            stages[stage].append(InvertedResidual(
                c_in, c_out, k, s, c_in * e, max(1, c_in // 4), nn.SiLU, se_act=nn.SiLU, se_gate=nn.Sigmoid,
                drop_path=stochastic_depth * i / len(specs)))
            c_in = channels[stage] = c_out
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.channels = tuple(channels)
        self.decoder_channels = (make_divisible(16 * width), make_divisible(32 * width), make_divisible(48 * width))
