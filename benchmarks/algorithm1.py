"""The paper's Algorithm 1 (Ramanujan et al. 2020, Appendix B.2), re-implemented as the reference.

This is the published ``SubnetConv`` pattern: every forward sorts all of a layer's ``|scores|``, keeps the top
``k`` fraction as a 0/1 tensor, multiplies it into the frozen weight, and passes the gradient straight through
the 0/1 tensor. It exists to be timed against (``benchmarks/speed.py``) and compared with
(``tests/test_cuda.py``); it is not part of the library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, autograd, nn
from torch.nn import functional as F

__all__ = ["GetSubnet", "SubnetConv", "SubnetLinear", "algorithm1"]


class GetSubnet(autograd.Function):
    """Top-``k`` fraction of ``scores`` as a 0/1 tensor by a full sort; straight-through gradient."""

    @staticmethod
    def forward(ctx, scores: Tensor, k: float) -> Tensor:
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - k) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return flat_out.view_as(scores)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class _Subnet:
    """Mixin of the swapped classes: ``k`` and the masked weight."""

    k: float

    def subnet_weight(self) -> Tensor:
        return self.weight * GetSubnet.apply(self.scores.abs(), self.k)


class SubnetConv(_Subnet, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.subnet_weight(), self.bias)


class SubnetLinear(_Subnet, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.subnet_weight(), self.bias)


_SWAPS = {nn.Conv2d: SubnetConv, nn.Linear: SubnetLinear}


def algorithm1(model: nn.Module, k: float) -> nn.Module:
    """Swap every Conv2d/Linear of ``model`` to its ``Subnet`` class, in place; only the scores train.

    Scores start Kaiming-uniform (the paper's code); weights keep their values and are frozen, as is every
    other parameter.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        cls = _SWAPS.get(type(module))
        if cls is None:
            continue
        scores = torch.empty_like(module.weight)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        module.__class__ = cls
        module.k = k
        module.register_parameter("scores", nn.Parameter(scores))
    return model
