"""VGG-like Conv2/4/6/8 networks of Ramanujan et al. (CVPR 2020), Table 1 (after Frankle & Carbin, 2019).

=========  ===========================================================================
Conv2      64, 64, pool
Conv4      64, 64, pool, 128, 128, pool
Conv6      64, 64, pool, 128, 128, pool, 256, 256, pool
Conv8      64, 64, pool, 128, 128, pool, 256, 256, pool, 512, 512, pool
FC         256, 256, num_classes  (for every depth)
=========  ===========================================================================

All convolutions are 3x3 with padding 1 and no bias, followed by ReLU; pools are 2x2 max-pools with stride 2
(floor rounding, so 28 -> 14 -> 7 -> 3 -> 1 and 32 -> 16 -> 8 -> 4 -> 2). There is no BatchNorm, as in the
paper.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONV_STAGES", "ConvNet", "conv2", "conv4", "conv6", "conv8", "scale_width"]

#: Output channels of the two convolutions in each stage; every stage ends with a 2x2 max-pool.
CONV_STAGES: tuple[int, ...] = (64, 128, 256, 512)
#: Hidden widths of the classifier.
FC_HIDDEN: tuple[int, ...] = (256, 256)


def scale_width(channels: int, width: float) -> int:
    """Scale a layer width by ``width``: ``max(1, int(round(channels * width)))``."""
    return max(1, round(channels * width))


class ConvNet(nn.Module):
    """Conv-``depth`` network from Table 1 of the paper (``depth`` in 2, 4, 6, 8).

    Structure: ``features`` (``depth // 2`` stages of ``[conv3x3 -> ReLU] * 2 -> maxpool2x2``) then
    ``classifier`` (``Flatten -> Linear 256 -> ReLU -> Linear 256 -> ReLU -> Linear num_classes``).
    No layer has a bias and there is no normalisation.

    Args:
        depth: number of conv layers: 2, 4, 6 or 8.
        width: multiplier applied to every conv and hidden FC width (``max(1, round(c * width))``).
        in_channels: input channels (3 for CIFAR-10, 1 for (Fashion-)MNIST).
        image_size: input height = width; the flattened feature size is computed from it with the floor rule
            of 2x2 pooling. A ``ValueError`` is raised if the spatial size would reach 0.
        num_classes: number of output logits.

    Shapes:
        input ``(N, in_channels, image_size, image_size)`` -> logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        depth: int,
        width: float = 1.0,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
    ):
        super().__init__()
        if depth not in (2, 4, 6, 8):
            raise ValueError(f"ConvNet depth must be one of 2, 4, 6, 8 (got {depth!r})")
        if width <= 0:
            raise ValueError(f"width must be positive (got {width!r})")
        n_stages = depth // 2
        layers: list[nn.Module] = []
        channels = in_channels
        spatial = int(image_size)
        for stage, base in enumerate(CONV_STAGES[:n_stages]):
            out = scale_width(base, width)
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=2, stride=2),
            ]
            channels = out
            spatial //= 2
            if spatial < 1:
                raise ValueError(
                    f"image_size={image_size} is too small for Conv{depth}: the feature map shrinks to 0x0 "
                    f"after pool {stage + 1} of {n_stages} (each 2x2 max-pool halves it, rounding down)"
                )
        self.features = nn.Sequential(*layers)
        flat = channels * spatial * spatial
        h1, h2 = (scale_width(h, width) for h in FC_HIDDEN)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, h1, bias=False),
            nn.ReLU(),
            nn.Linear(h1, h2, bias=False),
            nn.ReLU(),
            nn.Linear(h2, num_classes, bias=False),
        )
        self.depth = depth
        self.width = width
        self.in_channels = in_channels
        self.image_size = int(image_size)
        self.num_classes = num_classes
        self.feature_shape = (channels, spatial, spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv2(**kwargs) -> ConvNet:
    """Conv2: ``[64, 64, pool]`` + FC 256, 256, num_classes. Keyword arguments go to :class:`ConvNet`."""
    return ConvNet(2, **kwargs)


def conv4(**kwargs) -> ConvNet:
    """Conv4: ``[64, 64, pool, 128, 128, pool]`` + FC 256, 256, num_classes."""
    return ConvNet(4, **kwargs)


def conv6(**kwargs) -> ConvNet:
    """Conv6: Conv4 + ``[256, 256, pool]`` + FC 256, 256, num_classes."""
    return ConvNet(6, **kwargs)


def conv8(**kwargs) -> ConvNet:
    """Conv8: Conv6 + ``[512, 512, pool]`` + FC 256, 256, num_classes."""
    return ConvNet(8, **kwargs)
