"""MobileFaceNet ("mbf"), state_dict-compatible with insightface.

Same module tree, shapes and init as insightface's `recognition/arcface_torch/backbones/mobilefacenet.py`
(MIT, Jiankang Deng and Jia Guo; adapted there from cavaface.pytorch by cavalleria), so its `.pth`
files load with `strict=True`. Mixed precision comes from the caller's `torch.autocast(...)`; as
insightface does under its `fp16` flag, the head (`conv_sep` and `features`) then runs in fp32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facebce.errors import ModelError


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, no activation: the linear bottleneck of MobileNetV2."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `groups` channels -> depthwise kxk -> 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2),
                 padding=(1, 1), groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    """`num_block` shape-preserving DepthWise blocks with identity shortcuts."""

    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv (7x7 -> 1x1, a learned spatial weighting instead of average pooling) -> linear -> BN.

    `layers.1` is the parameter-free flatten; its index is kept so that the state_dict keys match.
    """

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """112x112 RGB face -> `embedding_size` embedding (not L2-normalised); ~2M parameters at scale 2.

    The expansion widths (`groups` = 128/256/512) are fixed as in insightface, not multiplied by `scale`.
    """

    input_size = (112, 112)

    def __init__(self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2):
        super().__init__()
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c1, num_block=blocks[1], groups=128),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(c2, num_block=blocks[2], groups=256),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(c2, num_block=blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size)

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.features(self.conv_sep(x.float()))
        return self.features(self.conv_sep(x))


def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, blocks: Sequence[int] = (1, 4, 6, 2),
                  scale: int = 2) -> MobileFaceNet:
    """insightface's `get_mbf`. `dropout` exists only so that every backbone takes the same options:
    MobileFaceNet has no dropout layer, and adding one would change what the checkpoints mean."""
    if dropout:
        raise ModelError(f"dropout={dropout!r}: backbone 'mbf' has no dropout layer (use 0.0)")
    return MobileFaceNet(embedding_size, blocks, scale)
