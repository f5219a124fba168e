"""Learned dense weights: no mask, the weights train. The baseline with the same initialization."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Method


class Dense(Method):
    name = "dense"
    has_scores = False
    trains_scores = False
    trains_weights = True

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        return weight

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        weight = module._parameters[gate.param]
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
