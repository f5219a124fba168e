"""Several named masks over one set of frozen weights (Supermasks in Superposition, Wortsman et al. 2020; one mask
per task, as PEFT holds one adapter per task).

Every gated layer holds mask *heads* by name; ``popupify`` makes one, ``"default"``. One head is active: its mask
comes from the layer's ``scores`` Parameter (trained as usual) or a fixed ``mask`` buffer. Every other head is held
as bits, a uint8 buffer of ``ceil(numel / 8)`` bytes named like the scores with ``mask_bits_<head>`` in place of
``scores`` (``weight`` -> ``mask_bits_<head>``, ``in_proj_weight`` -> ``in_proj_mask_bits_<head>``): 1 bit per
weight per head, in the ``state_dict`` (so checkpoints, ``restore``, the Hugging Face ``Trainer`` and Lightning carry
it) and in subnetwork files. Training the active head leaves the others bit for bit as they were.

``set_mask(model, name)`` packs the active head's current mask into its bits and makes ``name`` active: a head that
was never active starts from scores drawn as ``popupify`` would draw them (role ``scores/<name>`` of the seed, or
``|w|`` with ``scores="magnitude"``); one that was trained before starts from scores equal to its mask (1 kept, 0
dropped), whose top-k is exactly that mask. Optimizer state belongs to the scores of the head it was built for: build
the optimizer after ``set_mask``. A head may keep its own ``k`` (layers matched by ``layer_k`` keep theirs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..selection.topk import kept_count
from .config import _check_k
from .gate import Gate, gates_of, scores_name
from .initializers import draw_scores, generator_for

__all__ = [
    "set_k",
    "add_mask",
    "set_mask",
    "list_masks",
    "active_mask",
    "delete_mask",
    "mask_of",
    "install_heads",
    "heads_record",
]

DEFAULT = "default"


def bits_name(param: str, head: str) -> str:
    """The buffer holding head ``head`` of the gated parameter ``param`` as bits."""
    return scores_name(param)[: -len("scores")] + f"mask_bits_{head}"


def pack(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bits (entry ``i`` of the row-major flattening is bit ``i % 8`` of byte ``i // 8``),
    built 8 bits at a time into the output: no temporary larger than the bool mask."""
    flat = mask.detach().reshape(-1)
    flat = torch.nn.functional.pad(flat.view(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)
    out = flat[:, 0].clone()
    for bit in range(1, 8):
        out |= flat[:, bit] << bit
    return out


def unpack(bits: Tensor, shape: torch.Size) -> Tensor:
    """The bool tensor of ``shape`` that ``pack`` gave ``bits``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[: math.prod(shape)]
    return flat.view(shape).bool()


# ------------------------------------------------------------------------------------------------ the verbs


def add_mask(model: nn.Module, name: str, k: float | None = None) -> nn.Module:
    """Add an inactive mask head ``name`` to every gated layer, starting where ``popupify`` starts (its first
    mask is the top-k of the scores ``popupify`` would draw for it); ``k`` defaults to the model's."""
    pairs = _pairs(model)
    _check_name(name)
    if name in pairs[0][1].heads:
        raise ValueError(f"the model already has a mask named {name!r}; masks: {', '.join(list_masks(model))}")
    if k is not None:
        _check_k(k, "k")
    with torch.no_grad():
        for module, gate in pairs:
            scores = _fresh_scores(module, gate, name)
            mask = _top_k(scores, module, gate, _layer_k(gate, k))
            module.register_buffer(bits_name(gate.param, name), pack(mask))
            gate.heads[name] = k
            gate.fresh.add(name)
    return model


def set_mask(model: nn.Module, name: str) -> nn.Module:
    """Make head ``name`` the active one (see the module docstring); returns ``model``."""
    pairs = _pairs(model)
    _known(model, pairs, name)
    current = pairs[0][1].active
    if name == current:
        return model
    with torch.no_grad():
        for module, gate in pairs:  # the active head's mask, as bits, before anything changes
            module.register_buffer(bits_name(gate.param, current), pack(gate.current_mask(module)))
        _set_kept(pairs, pairs[0][1].heads[name])
        for module, gate in pairs:
            bits = module._buffers.pop(bits_name(gate.param, name))
            weight = module._parameters[gate.param]
            mask = unpack(bits, weight.shape).to(weight.device)
            fixed = module._buffers.get(gate.mask_buffer)
            if fixed is not None:
                fixed.copy_(mask)
            elif gate.scores is not None:
                scores = _fresh_scores(module, gate, name) if name in gate.fresh else mask.to(torch.float32)
                module._parameters[gate.scores].copy_(scores)  # in place: the Parameter stays the same object
            gate.fresh.discard(name)
            gate.active = name
            gate.clear_cache()
            if gate.selector is not None:
                gate.selector.invalidate()
    return model


def set_k(model: nn.Module, k: float) -> nn.Module:
    """Change the fraction the active mask keeps, between steps, without popupifying again (a k schedule: keep
    more at the start, biprop's ``--prune_rate_epoch``). Layers matched by ``layer_k`` keep theirs; with
    ``scope="global"`` the global count follows. The scores are unchanged: the next read selects the top-k at the new
    ``k``. Recorded in the ``state_dict`` and files, so a resume or a reload keeps it."""
    _check_k(k, "k")
    pairs = _pairs(model)
    active = pairs[0][1].active
    for _, gate in pairs:
        gate.heads[active] = float(k)
        gate.clear_cache()
    _set_kept(pairs, float(k))
    return model


def list_masks(model: nn.Module) -> list[str]:
    """The mask heads' names, in the order they were added (``"default"`` first)."""
    return list(_pairs(model)[0][1].heads)


def active_mask(model: nn.Module) -> str:
    return _pairs(model)[0][1].active


def delete_mask(model: nn.Module, name: str) -> nn.Module:
    """Remove head ``name`` (not the active one: ``set_mask`` another first)."""
    pairs = _pairs(model)
    _known(model, pairs, name)
    if name == pairs[0][1].active:
        raise ValueError(f"{name!r} is the active mask: set_mask(model, another) first, then delete it")
    for module, gate in pairs:
        module._buffers.pop(bits_name(gate.param, name), None)
        del gate.heads[name]
        gate.fresh.discard(name)
    return model


def mask_of(module: nn.Module, gate: Gate, name: str | None = None) -> Tensor:
    """The bool mask of head ``name`` (default: the active one) of one gated layer, shaped like the weight."""
    if name is None or name == gate.active:
        return gate.current_mask(module)
    weight = module._parameters[gate.param]
    return unpack(module._buffers[bits_name(gate.param, name)], weight.shape).to(weight.device)


# ------------------------------------------------------------------------------------------------ records


def heads_record(pairs) -> dict | None:
    """What records and files store of the heads (``None`` for the single ``"default"`` head)."""
    gate = pairs[0][1]
    if list(gate.heads) == [DEFAULT] and gate.active == DEFAULT and gate.heads[DEFAULT] is None:
        return None
    return {"active": gate.active, "heads": dict(gate.heads), "fresh": sorted(gate.fresh)}


def install_heads(model: nn.Module, record: dict | None) -> None:
    """Give a freshly popupified model the heads of a record (buffers of zeros, the active head and its ``k``), so
    that a ``state_dict`` or a file saved with them loads: what the record says, not a selection."""
    if not record:
        return
    pairs = _pairs(model)
    heads, active = dict(record["heads"]), record["active"]
    if active not in heads or DEFAULT not in heads:
        raise ValueError(f"a damaged record of masks: {record!r}")
    for module, gate in pairs:
        weight = module._parameters[gate.param]
        for name in heads:
            if name != active:
                module.register_buffer(bits_name(gate.param, name), pack(torch.zeros(weight.shape, dtype=torch.bool)))
        gate.heads = {name: (None if k is None else float(k)) for name, k in heads.items()}
        gate.active = active
        gate.fresh = set(record.get("fresh", ()))
        gate.clear_cache()
    _set_kept(pairs, heads[active])


# ------------------------------------------------------------------------------------------------ helpers


def _pairs(model: nn.Module) -> list[tuple[nn.Module, Gate]]:
    pairs = [(m, g) for m in model.modules() for g in gates_of(m).values()]
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    if not pairs[0][1].method.uses_topk:
        raise ValueError(f"method={pairs[0][1].method.name!r}: named masks need a top-k method (edge_popup, random)")
    return pairs


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a mask name must be a Python identifier (letters, digits, _), got {name!r}")


def _known(model: nn.Module, pairs, name: str) -> None:
    if name not in pairs[0][1].heads:
        raise ValueError(f"no mask named {name!r}; masks: {', '.join(list_masks(model))} (add_mask to add one)")


def _layer_k(gate: Gate, head_k: float | None) -> float:
    """The fraction a layer keeps under a head: its ``layer_k`` override, the head's ``k``, or popupify's."""
    override = gate.config.k_for(gate.layer)
    if override is not None or head_k is None:
        return gate.k_popupify
    return head_k


def _set_kept(pairs, head_k: float | None) -> None:
    """Every selector's kept count, and every gate's ``k``, for a head's ``k``."""
    selectors: dict[int, tuple] = {}
    for module, gate in pairs:
        gate.k = _layer_k(gate, head_k)
        if gate.selector is not None:
            selectors.setdefault(id(gate.selector), (gate.selector, []))[1].append((module, gate))
    for selector, members in selectors.values():
        if len(members) > 1:  # scope="global": one top-k over the layers together
            total = sum(m._parameters[g.param].numel() for m, g in members)
            k = head_k if head_k is not None else members[0][1].config.k
            selector.kept = kept_count(total, k)
        else:
            module, gate = members[0]
            selector.kept = kept_count(module._parameters[gate.param].numel() // selector.blocks, gate.k)
        selector.invalidate()


def _fresh_scores(module: nn.Module, gate: Gate, name: str) -> Tensor:
    """The scores popupify would give head ``name`` (float32 CPU, then the scores' device and dtype)."""
    weight = module._parameters[gate.param]
    if gate.config.scores == "magnitude":
        drawn = weight.detach().abs().to("cpu", torch.float32, copy=True)
    else:
        role = "scores" if name == DEFAULT else f"scores/{name}"
        generator = generator_for(gate.config.seed, gate.name, role)
        drawn = draw_scores(tuple(weight.shape), generator, gate.fan_in_fan_out, gate.expert_dims, gate.fans)
    scores = gate.method.initial_scores(drawn)
    target = module._parameters[gate.scores] if gate.scores is not None else weight
    return scores.to(target.device, target.dtype)


def _top_k(scores: Tensor, module: nn.Module, gate: Gate, k: float) -> Tensor:
    """The top-k mask of ``scores`` for one layer by the selection rule (per expert matrix for a stack; a globally
    ranked layer by its own ``k``: a new head's first mask only)."""
    from ..selection.topk import select_topk

    blocks = math.prod(scores.shape[: gate.expert_dims])
    magnitudes = scores.detach().abs().reshape(blocks, -1)
    mask = torch.empty(magnitudes.shape, dtype=torch.bool, device=scores.device)
    kept = kept_count(magnitudes.shape[1], k)
    for row, out in zip(magnitudes, mask):  # the selection's exact top-k, without a sort of the layer
        select_topk([row], kept, [out])
    return mask.view(scores.shape)
