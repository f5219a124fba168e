"""``materialize``: a plain copy of a popupified model with the masked weights baked in."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.gate import aliases_of, gates_of, ungate
from ..core.heads import bits_name, mask_of
from ..core.masks import gated_layers
from ..core.packed import unpack_parameters
from ..core.popup import unmark_config
from ..core.state import detach_hooks
from ..core.wrappers import unwrap
from ..selection.kernels import masked_weight


def materialize(model: nn.Module, mask: str | None = None) -> nn.Module:
    """Return a deep copy of ``model`` in its original classes, each gated weight replaced by what its method bakes
    (``Method.bake``: ``weight * mask`` for top-k methods, what threshold evaluation computes for ``sampled``).

    The copy has no scores, no mask buffers and no supermask code: its ``state_dict`` loads into a freshly built
    model of the original architecture with ``load_state_dict`` and gives the same eval outputs; it exports with
    ``torch.export`` / ``torch.onnx.export``. Masks are the evaluation masks (for ``sampled``: ``scores >= 0``,
    with its rescaling multiplier when ``rescale=True``).
    The parameters of the copy require grad as they did before ``popupify`` (a fixed position table stays
    ``requires_grad=False``). ``model`` itself is unchanged. ``mask`` names one of several masks
    (``add_mask``); default: the active one.
    """
    out = copy.deepcopy(unwrap(model))
    pairs = list(gated_layers(out))
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    with torch.no_grad():
        baked = []
        for module, gate in pairs:
            if mask is None or mask == gate.active:
                baked.append(gate.bake(module))  # what the method computes in evaluation (Method.bake)
            else:
                weight = module._parameters[gate.param].detach()
                baked.append(masked_weight(weight, mask_of(module, gate, mask)))
        unpack_parameters(out, [module._parameters[gate.param] for module, gate in pairs])  # sign bits hold no 0
        for (module, gate), value in zip(pairs, baked):
            module._parameters[gate.param].copy_(value)  # in place: modules tied to this weight read it too
            if gate.scores is not None:
                del module._parameters[gate.scores]
            module._buffers.pop(gate.mask_buffer, None)
            for name in gate.method.buffer_names(gate):  # the method's own (IteRand's generations)
                module._buffers.pop(name, None)
            for head in gate.heads:
                module._buffers.pop(bits_name(gate.param, head), None)
    discoveries = [m.__dict__["_supermask_discovery"] for m in out.modules() if "_supermask_discovery" in m.__dict__]
    untrained = {name for discovery in discoveries for name in getattr(discovery, "untrained", ())}
    for module in out.modules():
        if gates_of(module) or aliases_of(module):
            ungate(module)
        module.__dict__.pop("_supermask_discovery", None)
    detach_hooks(out)
    unmark_config(out)
    for name, p in out.named_parameters():
        p.requires_grad_(name not in untrained)
    return out
