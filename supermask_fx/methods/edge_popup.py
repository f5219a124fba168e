"""edge-popup (Ramanujan et al. 2020): keep the top-k |scores| of each layer, straight-through gradient.

Forward: ``w_eff = w * h(|s|)`` with ``h`` the exact top-k indicator of ``supermask_fx.selection.topk``.
Backward: straight through ``h``, so ``dL/ds = sign(s) * w * dL/dw_eff`` (``abs``'s derivative times the
gradient a dense weight would get times the weight), which is Algorithm 1 of the paper (Appendix B.2).
``dL/dw = h(|s|) * dL/dw_eff`` when the weights are trainable too. The score gradient is computed in the
backward from the scores and weights themselves (one compiled pass on the CPU), so nothing the size of the
weights is cached for it.

The mask of a layer comes from its ``selection.TopKSelector`` (popupify groups the layers ranked together) as a
``selection.LayerMask``: the method asks for it (``current()``), applies it (``apply``: ``w * mask``) or reads it as
a bool tensor; which back-end computed it, and in what form it is kept, is the selection's business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.method import Method, register_method
from ..selection.kernels import straight_through_grad


@register_method
class EdgePopup(Method):
    name = "edge_popup"
    uses_topk = True

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        scores = module._parameters[gate.scores]
        if torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad):
            # Training: a fresh w * mask per forward, freed with the graph; no cached copy held across steps.
            mask = gate.layer_mask.current()
            effective = StraightThrough.apply(scores, weight, mask)
            context = module.__dict__.get("_supermask_recompute")
            if context is not None:  # the backward rebuilds it instead of keeping it (supermask_fx.core.recompute)
                context.register(effective, weight, mask, gate.name)
            return effective
        return gate.layer_mask.effective()

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        return gate.layer_mask.current().tensor()


@register_method
class RandomSubnetwork(EdgePopup):
    """A fixed random subnetwork: the top-k of random, frozen scores. Nothing is trained, nothing else changes."""

    name = "random"
    trains_scores = False


class StraightThrough(torch.autograd.Function):
    """Returns ``w * mask`` (a new tensor in the weight's memory format; ``mask`` a ``selection.LayerMask``); sends
    ``grad * w * sign(s)`` to the scores and ``grad * mask`` to w.

    The scores and weight are saved as they are (parameters: no copy); an optimizer step between a forward and
    its backward is then caught by autograd's version check instead of giving a gradient for other scores."""

    @staticmethod
    def forward(ctx, scores, weight, mask):
        keep = mask.tensor(cache=False).to(weight.device) if weight.requires_grad else None
        ctx.save_for_backward(scores, weight, keep)
        return mask.apply(weight)

    @staticmethod
    def backward(ctx, grad):
        scores, weight, mask = ctx.saved_tensors
        grad_scores = straight_through_grad(grad, scores, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad * mask if ctx.needs_input_grad[1] else None
        return grad_scores, grad_weight, None
