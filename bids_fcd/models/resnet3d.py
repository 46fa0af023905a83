"""ResNet3D-18 encoder (He et al. 2016; 3D as in Hara et al. 2018, the multichannel tutorial's seed 001).

Basic residual blocks [2, 2, 2, 2] at widths 64..512 (`width` scales them). For an output stride of 16 the
last layer keeps stride 1 and dilates its convolutions by 2 (DeepLab's atrous trick), so the deepest map has
the same size as the other encoders' and the shared decoder applies unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import StagedEncoder, conv_bn_act, make_divisible


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = conv_bn_act(c_in, c_out, 3, stride, act=nn.ReLU, dilation=dilation)
        self.conv2 = conv_bn_act(c_out, c_out, 3, act=None, dilation=dilation)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else conv_bn_act(c_in, c_out, 1, stride, act=None))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet3D18(StagedEncoder):
    """Stages at strides 2 (7x7x7 stem), 4 (max-pool + layer1), 8 (layer2), 16 (layer3 + dilated layer4)."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4 = (make_divisible(n * width) for n in (64, 128, 256, 512))
        self.stages = nn.ModuleList([
            conv_bn_act(in_channels, c1, 7, 2, act=nn.ReLU),
            nn.Sequential(nn.MaxPool3d(3, 2, 1), BasicBlock(c1, c1), BasicBlock(c1, c1)),
            nn.Sequential(BasicBlock(c1, c2, 2), BasicBlock(c2, c2)),
            nn.Sequential(BasicBlock(c2, c3, 2), BasicBlock(c3, c3),
                          BasicBlock(c3, c4, dilation=2), BasicBlock(c4, c4, dilation=2)),
        ])
        self.channels = (c1, c1, c2, c4)
        self.decoder_channels = (make_divisible(32 * width), make_divisible(48 * width), make_divisible(64 * width))
