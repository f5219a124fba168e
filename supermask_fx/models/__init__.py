"""The networks of Ramanujan et al. (CVPR 2020) as plain ``nn.Module``s (no supermask code).

All models map ``(N, C, H, W)`` images to logits ``(N, num_classes)``, contain no data-dependent control flow
(so ``torch.fx.symbolic_trace`` works), and only the ResNet has BatchNorm.

Use :func:`build_model` to build one by name; valid names are in :data:`MODEL_NAMES`.
"""

from __future__ import annotations

from torch import nn

from .convnets import ConvNet, conv2, conv4, conv6, conv8, scale_width
from .fc import FC
from .resnet_cifar import BasicBlock, ResNetCIFAR, resnet18_cifar

__all__ = [
    "FC",
    "MODEL_NAMES",
    "BasicBlock",
    "ConvNet",
    "ResNetCIFAR",
    "build_model",
    "conv2",
    "conv4",
    "conv6",
    "conv8",
    "resnet18_cifar",
    "scale_width",
]

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("fc", "conv2", "conv4", "conv6", "conv8", "resnet18")

_FC_HIDDEN = (300, 100)


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
) -> nn.Module:
    """Build one of the paper's networks by name.

    Args:
        name: one of :data:`MODEL_NAMES` (case-insensitive): ``"fc"`` (784-300-100-10 MLP,
            ``in_features = in_channels * image_size**2``), ``"conv2"`` ... ``"conv8"`` (Table 1 VGG-like
            nets), ``"resnet18"`` (CIFAR ResNet-18).
        num_classes: number of output logits.
        in_channels: input channels (1 for (Fashion-)MNIST, 3 for CIFAR-10).
        image_size: input height = width (28 or 32).
        width: width multiplier applied to every hidden layer (``max(1, round(c * width))``); for ``"fc"`` it
            scales the hidden widths 300 and 100.

    Returns:
        An ``nn.Module`` mapping ``(N, in_channels, image_size, image_size)`` to ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
    """
    key = name.lower().strip() if isinstance(name, str) else name
    if key == "fc":
        hidden = tuple(scale_width(h, width) for h in _FC_HIDDEN)
        return FC(in_features=in_channels * image_size * image_size, hidden=hidden, num_classes=num_classes)
    if key in ("conv2", "conv4", "conv6", "conv8"):
        return ConvNet(
            int(key[4:]),
            width=width,
            in_channels=in_channels,
            image_size=image_size,
            num_classes=num_classes,
        )
    if key in ("resnet18", "resnet18_cifar"):
        return resnet18_cifar(num_classes=num_classes, in_channels=in_channels, width=width)
    raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_NAMES)}")
