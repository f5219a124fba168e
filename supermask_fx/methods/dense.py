"""Learned dense weights: no mask, the weights train. The baseline with the same initialization."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.method import Method, register_method


@register_method
class Dense(Method):
    name = "dense"
    has_scores = False
    trains_scores = False
    trains_weights = True
    has_mask = False

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        return weight

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        weight = module._parameters[gate.param]
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    def bake(self, gate, module: nn.Module) -> Tensor:
        return module._parameters[gate.param].detach().clone()

    def is_baked(self, stored: Tensor, weight: Tensor) -> bool:
        return True  # trained weights: any values
