"""The supermask of Zhou et al. (2019), as the edge-popup paper's baseline.

Training forward: ``p = sigmoid(s)``, ``m ~ Bernoulli(p)`` drawn afresh at every read of the weight,
``w_eff = w * m``. Backward: straight through the sampling, so ``dL/ds = sigmoid'(s) * w * dL/dw_eff``.

Evaluation rule (``module.eval()``): the deterministic mask ``p >= 0.5``, i.e. ``s >= 0``, as in the edge-popup
authors' reference code; it is also what ``mask_stats``, ``fix_masks`` and subnetwork files use. The kept
fraction is therefore learned, not fixed: ``k`` has no effect on this method beyond ``scaled`` inits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..gate import version_key
from ..kernels import masked_weight
from .base import Method


class Sampled(Method):
    name = "sampled"

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        scores = module._parameters[gate.scores]
        if module.training:
            sample = torch.rand_like(scores) < torch.sigmoid(scores.detach())
            if torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad):
                return SampledStraightThrough.apply(scores, weight, sample)
            return weight * sample
        self._refresh_eval(gate, scores, weight)
        return gate.effective_buffer

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        self._refresh_eval(gate, module._parameters[gate.scores], module._parameters[gate.param])
        return gate.mask

    @staticmethod
    def _refresh_eval(gate, scores: Tensor, weight: Tensor) -> None:
        key = (version_key(scores), version_key(weight))
        if key == gate.key:
            return
        with torch.inference_mode(False), torch.no_grad():
            gate.ensure_buffers(weight)
            torch.ge(scores.detach(), 0, out=gate.mask)
            masked_weight(weight.detach(), gate.mask, gate.effective_buffer)
        gate.key = key


class SampledStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, weight, sample):
        ctx.save_for_backward(scores, weight, sample)
        return weight * sample

    @staticmethod
    def backward(ctx, grad):
        scores, weight, sample = ctx.saved_tensors
        grad_scores = grad_weight = None
        if ctx.needs_input_grad[0]:
            p = torch.sigmoid(scores)
            grad_scores = grad * weight * p * (1 - p)
        if ctx.needs_input_grad[1]:
            grad_weight = grad * sample
        return grad_scores, grad_weight, None
