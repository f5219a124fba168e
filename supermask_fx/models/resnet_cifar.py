"""CIFAR ResNet-18 (Kuang Liu's ``pytorch-cifar`` variant), used for CIFAR-10 in Ramanujan et al. (CVPR 2020).

Differences from the ImageNet ResNet-18: a 3x3 stride-1 stem without max-pool, so a 32x32 input keeps 32x32
resolution in the first stage. All convolutions and the final Linear have no bias; BatchNorm follows every
conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .convnets import scale_width

__all__ = ["BasicBlock", "ResNetCIFAR", "resnet18_cifar"]


class BasicBlock(nn.Module):
    """``conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN`` plus shortcut, then ReLU.

    The shortcut is the identity, or ``conv1x1(stride) -> BN`` when the stride or channel count changes.
    Shapes: ``(N, in_planes, H, W)`` -> ``(N, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet for 32x32 inputs: stem ``conv3x3(64) -> BN -> ReLU``, four stages of BasicBlocks with
    64/128/256/512 channels (times ``width``) and strides 1/2/2/2, adaptive average pool, Linear (no bias).

    Shapes: input ``(N, in_channels, H, W)`` -> logits ``(N, num_classes)``; any ``H, W >= 1`` works thanks to
    the adaptive pool (32x32 gives 4x4 before pooling).
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive (got {width!r})")
        widths = [scale_width(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3] * BasicBlock.expansion, num_classes, bias=False)
        self.num_classes = num_classes

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNetCIFAR:
    """CIFAR ResNet-18: 2 BasicBlocks per stage (about 11.2M weights at width 1).

    Input ``(N, in_channels, H, W)`` (32x32 for CIFAR-10) -> logits ``(N, num_classes)``.
    """
    return ResNetCIFAR((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width)
