"""Fully connected network from Ramanujan et al. (CVPR 2020), Section 4 / Figure 2: FC 784-300-100-10."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FC"]


class FC(nn.Module):
    """Multi-layer perceptron without biases: ``Flatten -> [Linear -> (BatchNorm1d) -> ReLU] * len(hidden) -> Linear``.

    With the defaults this is the paper's LeNet-300-100 style network 784-300-100-10
    (``784*300 + 300*100 + 100*10 = 266,200`` weights, no biases).

    Args:
        in_features: number of input features after flattening (``C * H * W``; 784 for 28x28x1).
        hidden: widths of the hidden layers.
        num_classes: number of output logits.
        batch_norm: a ``BatchNorm1d`` after each hidden ``Linear`` (before its ReLU): ``"fc_bn"``, the model of
            the learned-norms comparison.

    Shapes:
        input ``(N, C, H, W)`` (any shape whose trailing dims multiply to ``in_features``, e.g. ``(N, 784)``)
        -> logits ``(N, num_classes)``.

    Weights keep PyTorch's default initialisation; supermask code is expected to re-initialise them.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        batch_norm: bool = False,
    ):
        super().__init__()
        widths = [int(in_features), *(int(h) for h in hidden)]
        if any(w < 1 for w in widths) or num_classes < 1:
            raise ValueError(f"FC widths must be positive, got in_features={in_features}, hidden={hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(widths):
            layers.append(nn.Linear(fan_in, fan_out, bias=False))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[-1], num_classes, bias=False))
        self.layers = nn.Sequential(*layers)
        self.in_features = widths[0]
        self.hidden = tuple(widths[1:])
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
