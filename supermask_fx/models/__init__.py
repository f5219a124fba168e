"""The networks of Ramanujan et al. (CVPR 2020) as plain ``nn.Module``s (no supermask code).

All models map ``(N, C, H, W)`` images to logits ``(N, num_classes)``, contain no data-dependent control flow
(so ``torch.fx.symbolic_trace`` works), and only the ResNet and ``fc_bn`` have BatchNorm.

Use :func:`build_model` to build one by name; valid names are in :data:`MODEL_NAMES`. ``dataset=`` sizes the
input and output layers for a data set of :mod:`supermask_fx.data` (``build_model("conv4", dataset="cifar10")``).
"""

from __future__ import annotations

from torch import nn

from ..data.info import DatasetInfo, dataset_info
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
MODEL_NAMES: tuple[str, ...] = (
    "fc",
    "fc_bn",
    "fc1",
    "fc2",
    "fc4",
    "fc6",
    "conv2",
    "conv4",
    "conv6",
    "conv8",
    "resnet18",
)

_FC_HIDDEN = (300, 100)
#: Depth variants of the FC net (the CPU reproduction's depth claim): ``fcN`` has N hidden layers of 300 units.
_FC_DEPTHS = {"fc1": 1, "fc2": 2, "fc4": 4, "fc6": 6}


def build_model(
    name: str,
    *,
    dataset: str | DatasetInfo | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
    width: float = 1.0,
) -> nn.Module:
    """Build one of the paper's networks by name.

    Args:
        name: one of :data:`MODEL_NAMES` (case-insensitive): ``"fc"`` (784-300-100-10 MLP,
            ``in_features = in_channels * image_size**2``), ``"conv2"`` ... ``"conv8"`` (Table 1 VGG-like
            nets), ``"resnet18"`` (CIFAR ResNet-18); ``"fc_bn"``: ``"fc"`` with a BatchNorm after each hidden
            layer; ``"fc1"``, ``"fc2"``, ``"fc4"``, ``"fc6"``: the FC net with
            1, 2, 4 or 6 hidden layers of 300 units (depth variants; ``"fc2"`` is 784-300-300-10).
        dataset: a data set name (``"fashion_mnist"``, ``"cifar10"``, ... as :func:`supermask_fx.data.dataset_info`
            accepts) or its :class:`~supermask_fx.data.DatasetInfo`; sets ``num_classes``, ``in_channels`` and
            ``image_size`` from it. Explicit sizes may still be given but must agree with it.
        num_classes: number of output logits (default 10).
        in_channels: input channels (default 3; 1 for (Fashion-)MNIST, 3 for CIFAR-10).
        image_size: input height = width (default 32; 28 for (Fashion-)MNIST).
        width: width multiplier applied to every hidden layer (``max(1, round(c * width))``); for ``"fc"`` it
            scales the hidden widths 300 and 100.

    Returns:
        An ``nn.Module`` mapping ``(N, in_channels, image_size, image_size)`` to ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``name`` or ``dataset`` (the message lists the valid names), or an explicit size
            that differs from the data set's.
    """
    num_classes, in_channels, image_size = _sizes(dataset, num_classes, in_channels, image_size)
    key = name.lower().strip() if isinstance(name, str) else name
    if key in ("fc", "fc_bn"):
        hidden = tuple(scale_width(h, width) for h in _FC_HIDDEN)
        return FC(
            in_features=in_channels * image_size * image_size,
            hidden=hidden,
            num_classes=num_classes,
            batch_norm=key == "fc_bn",
        )
    if key in _FC_DEPTHS:
        hidden = (scale_width(300, width),) * _FC_DEPTHS[key]
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


def _sizes(
    dataset: str | DatasetInfo | None, num_classes: int | None, in_channels: int | None, image_size: int | None
) -> tuple[int, int, int]:
    """``(num_classes, in_channels, image_size)``: the explicit values, else the data set's, else 10, 3, 32."""
    given = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if dataset is None:
        defaults = {"num_classes": 10, "in_channels": 3, "image_size": 32}
        return tuple(defaults[key] if value is None else value for key, value in given.items())
    info = dataset if isinstance(dataset, DatasetInfo) else dataset_info(dataset)
    derived = {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size}
    conflicts = [
        f"{key}={value!r} (it has {derived[key]})"
        for key, value in given.items()
        if value is not None and value != derived[key]
    ]
    if conflicts:
        raise ValueError(
            f"build_model: dataset {info.name!r} conflicts with {', '.join(conflicts)}; "
            "pass either the dataset or explicit sizes that match it"
        )
    return tuple(derived.values())
