"""biprop (Diffenderfer & Kailkhura, "Multi-Prize Lottery Ticket Hypothesis", ICLR 2021): a subnetwork of binary
weights with a gain, in a random network.

Forward, per layer: ``m`` the exact top-k mask of ``|s|`` (as edge-popup: ``selection``), ``alpha`` the mean magnitude
of the kept real weights, ``alpha = sum(|w| * m) / sum(m)``, and ``w_eff = alpha * sign(w) * m``: the kept weights
binarized, scaled so that the layer's output scale follows the weights it keeps (recomputed whenever the mask
changes). Backward: straight through ``h`` as edge-popup, with the binary weight in place of ``w``:
``dL/ds = sign(s) * alpha * sign(w) * dL/dw_eff`` (``alpha`` taken as a constant, as the authors' code does). The
weights are frozen; a file stores the seed and the masks, as for edge-popup.

``popupify(model, k, method="biprop", init="kaiming_normal")`` (the authors binarize Kaiming-normal weights; with a
signed-constant init every ``|w|`` is equal and biprop is edge-popup).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.method import register_method
from .edge_popup import EdgePopup, StraightThrough

__all__ = ["Biprop", "binarized"]


def binarized(weight: Tensor, mask: Tensor) -> Tensor:
    """``alpha * sign(w)`` with ``alpha`` the mean ``|w|`` over the kept entries (``mask``), no gradient."""
    weight = weight.detach()
    keep = mask.to(weight.device, weight.dtype)
    alpha = (weight.abs() * keep).sum() / keep.sum().clamp_min(1.0)
    return torch.sign(weight) * alpha


@register_method
class Biprop(EdgePopup):
    name = "biprop"

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        scores = module._parameters[gate.scores]
        mask = gate.layer_mask.current()
        binary = binarized(weight, mask.tensor(cache=False))
        if torch.is_grad_enabled() and scores.requires_grad:
            return StraightThrough.apply(scores, binary, mask)  # w_eff = binary * m; dL/ds = g * binary * sign(s)
        return mask.apply(binary)

    def masked(self, weight: Tensor, mask: Tensor) -> Tensor:
        """``alpha * sign(w) * mask`` (a fixed mask: a loaded file, ``fix_masks``)."""
        return binarized(weight, mask) * mask.to(weight.device, weight.dtype)

    def is_baked(self, stored: Tensor, weight: Tensor) -> bool:
        """``alpha * sign(w)`` where kept, 0 elsewhere, for one ``alpha > 0``."""
        kept = stored != 0
        if not bool(kept.any()):
            return True
        magnitudes = stored[kept].abs()
        alpha = magnitudes[0]
        return bool((magnitudes == alpha).all()) and torch.equal(torch.sign(stored[kept]), torch.sign(weight[kept]))
