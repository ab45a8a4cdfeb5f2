"""IResNet (ArcFace's "improved" pre-activation ResNet), state_dict-compatible with insightface.

Same module names, shapes, layer order and init as insightface's
`recognition/arcface_torch/backbones/iresnet.py` (MIT, Jiankang Deng and Jia Guo), so its released
`.pth` files load with `strict=True`. What differs is only how it is driven:

- mixed precision comes from the caller's `torch.autocast(...)` instead of an `fp16` flag; as
  insightface does under its flag, the `fc` and `features` head then runs in fp32, because
  a 25088-wide dot product loses too much in half precision;
- no module-level gradient-checkpointing switch (`using_ckpt`), no `.cuda()`, dropout not in-place
  (same numbers; an in-place op on a view of BN's output is one autograd surprise fewer);
- the unused `groups` / `width_per_group` / dilation options are gone (insightface only ever
  builds the defaults).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

EPS = 1e-05  # BatchNorm eps everywhere; momentum is PyTorch's default 0.1, as in insightface


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) shortcut.

    No activation after the addition: that is the "improved" residual unit of the ArcFace paper.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=EPS)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """112x112 RGB face -> `embedding_size` embedding (not L2-normalised).

    Stem (3x3 conv, stride 1) -> four stages that each halve the resolution (112 -> 7) ->
    BN -> flatten (512*7*7) -> dropout -> fc -> BatchNorm1d whose scale is frozen at 1.
    """

    fc_scale = 7 * 7
    input_size = (112, 112)

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.0,
                 zero_init_residual: bool = False):
        super().__init__()
        self.embedding_size = embedding_size
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=EPS)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=EPS)
        # A learnable scale here would let the net shrink all embeddings at no cost to the margin
        # loss; insightface fixes it at 1 (still a parameter, so it stays in the state_dict).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)  # bn2, not bn3: insightface's choice

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride),
                                       nn.BatchNorm2d(planes, eps=EPS))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn2(x)
        x = torch.flatten(x, 1)  # logical (C, H, W) order whatever the memory format
        x = self.dropout(x)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.features(self.fc(x.float()))
        return self.features(self.fc(x))


def iresnet18(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    return IResNet((2, 2, 2, 2), embedding_size, dropout, zero_init_residual)


def iresnet34(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    return IResNet((3, 4, 6, 3), embedding_size, dropout, zero_init_residual)


def iresnet50(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    return IResNet((3, 4, 14, 3), embedding_size, dropout, zero_init_residual)


def iresnet100(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    return IResNet((3, 13, 30, 3), embedding_size, dropout, zero_init_residual)


def iresnet200(embedding_size: int = 512, dropout: float = 0.0, zero_init_residual: bool = False) -> IResNet:
    return IResNet((6, 26, 60, 6), embedding_size, dropout, zero_init_residual)
