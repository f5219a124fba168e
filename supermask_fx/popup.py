"""``popupify``: the one verb that turns any PyTorch model into a supermask network, in place."""

from __future__ import annotations

import fnmatch
import warnings

import torch
from torch import nn

from .config import PopupConfig
from .discover import NORM_TYPES, WeightRef, find_weights
from .gate import Gate, alias_parameter, gate_parameter, is_gated, scores_name
from .initializers import draw_scores, draw_weight, generator_for, weight_std
from .methods import METHODS, TopKSelector
from .topk import kept_count

# The bias that goes with a gated weight, for the ``bias`` rule.
_BIAS_OF = {
    "weight": "bias",
    "in_proj_weight": "in_proj_bias",
    "q_proj_weight": "in_proj_bias",
    "k_proj_weight": "in_proj_bias",
    "v_proj_weight": "in_proj_bias",
}


def popupify(model: nn.Module, k: float | PopupConfig, **options) -> nn.Module:
    """Turn ``model`` into a supermask network in place and return it.

    Every weight-bearing layer found by ``supermask_fx.discover`` (Linear, Conv, ConvTranspose,
    MultiheadAttention projections, and weights the traced graph feeds to ``F.linear``/``F.conv*``) is gated:
    its weight is redrawn from ``init`` with ``seed`` and frozen, it gains a ``scores`` Parameter (for methods
    with scores), and reading ``module.weight`` gives ``weight * mask``. Module paths and ``state_dict`` names
    are unchanged. Then every other parameter is frozen: normalization layers get scale 1 / shift 0, biases of
    gated layers are zeroed (``bias="zero"``) or kept (``bias="keep"``), anything else keeps its value.

    Args:
        model: any ``nn.Module``; it is modified in place.
        k: fraction of weights kept in each layer (0 < k <= 1), or a whole ``PopupConfig``.
        **options: the other ``PopupConfig`` fields (``method``, ``init``, ``scaled``, ``seed``, ``scope``,
            ``layer_k``, ``mode``, ``nonlinearity``, ``bias``, ``include``, ``fan_in_fan_out``).

    Returns:
        ``model`` itself. Train it with ``torch.optim.SGD(supermask_parameters(model), ...)``.

    Warns:
        UserWarning: once, when ``torch.fx`` cannot trace the model, or when parameters of 2+ dimensions feed matrix
            products ungated; the message names them and how to gate them (``include=``).

    Raises:
        ValueError: bad options, a model that is already popupified, an ``include`` pattern that matches no
            parameter (or one with fewer than 2 dimensions), or no weight to gate.
    """
    if isinstance(k, PopupConfig):
        if options:
            raise TypeError(f"pass either a PopupConfig or keyword options, not both (got {sorted(options)})")
        config = k
    else:
        config = PopupConfig(k=k, **options)
    if any(is_gated(m) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already popupified; popupify a freshly built model instead "
            "(supermask_fx.materialize(model) gives a plain copy with the masks baked in)"
        )
    found = find_weights(model, config.include, config.fan_in_fan_out)
    refs = found.refs
    if found.trace_error is not None:
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({found.trace_error}); popupify falls back to gating "
            "the weights of its Linear, Conv, ConvTranspose and MultiheadAttention modules in place (and those "
            "matched by include=). Weights that a custom module passes to F.linear/F.conv* itself are not gated "
            f"(they stay frozen).{_ungated_note(found.ungated)}",
            stacklevel=2,
        )
    elif found.ungated:
        warnings.warn(
            f"{type(model).__name__} feeds parameters to matrix products that no rule gates."
            + _ungated_note(found.ungated),
            stacklevel=2,
        )
    if not refs:
        raise ValueError(f"{type(model).__name__} has no Linear, Conv or other weight-bearing layer to gate")
    _check_patterns(config, refs)

    method = METHODS[config.method]()
    layer_k = {ref: config.k_for(ref.module) for ref in refs}
    gates: list[tuple[nn.Module, Gate]] = []
    with torch.no_grad():
        for ref in refs:
            module = model.get_submodule(ref.module)
            k_layer = layer_k[ref] if layer_k[ref] is not None else config.k
            _redraw_weight(module, ref, config, k_layer, method.has_scores)
            if config.bias == "zero":
                bias = module._parameters.get(_BIAS_OF.get(ref.param, ""))
                if bias is not None:
                    bias.zero_()
            gate = Gate(ref.module, ref.param, method, k_layer, config=config, fan_in_fan_out=ref.fan_in_fan_out)
            gate_parameter(module, gate)
            gates.append((module, gate))
        _alias_tied(model, gates)
        _reset_norms(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module, gate in gates:
        module._parameters[gate.param].requires_grad_(method.trains_weights)
        if gate.scores is not None:
            module._parameters[gate.scores].requires_grad_(method.trains_scores)
    if method.uses_topk:
        _group(gates, config, layer_k)
    return model


def draw_layer_weight(
    config: PopupConfig, name: str, shape: tuple[int, ...], k: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """The float32 CPU weight ``popupify`` gives the gated parameter ``name`` (``"<module>.<param>"``); with
    ``fan_in_fan_out`` the weight is stored ``(in, out, ...)`` and its fans are read accordingly."""
    std = weight_std(
        shape,
        config.init,
        mode=config.mode,
        nonlinearity=config.nonlinearity,
        k=k,
        scaled=config.scaled,
        fan_in_fan_out=fan_in_fan_out,
    )
    return draw_weight(shape, config.init, std=std, generator=generator_for(config.seed, name, "weight"))


def _ungated_note(names: list[str]) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return (
        f" Not gated (frozen at their values): {shown}. To gate such weights, pass include=[fnmatch patterns of "
        "their names], with fan_in_fan_out=True if they are stored (in, out) like GPT-2's Conv1D."
    )


def _redraw_weight(module: nn.Module, ref: WeightRef, config: PopupConfig, k: float, with_scores: bool) -> None:
    weight = module._parameters[ref.param]
    shape = tuple(weight.shape)
    weight.copy_(draw_layer_weight(config, ref.name, shape, k, ref.fan_in_fan_out))
    if with_scores:
        name = scores_name(ref.param)
        if name in module._parameters or hasattr(module, name):
            raise ValueError(f"{ref.module or 'the model'} already has an attribute {name!r}; cannot add scores")
        scores = draw_scores(shape, generator_for(config.seed, ref.name, "scores"), ref.fan_in_fan_out)
        module.register_parameter(name, nn.Parameter(scores.to(weight.device, weight.dtype)))


def _alias_tied(model: nn.Module, gates: list[tuple[nn.Module, Gate]]) -> None:
    """Every other module holding a gated Parameter (tied weights: a language model's token embedding and output
    layer) reads it through the owner's gate, so the tied weight has one mask wherever it is used."""
    owners = {id(module._parameters[gate.param]): (module, gate) for module, gate in gates}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            owner = owners.get(id(param))
            if owner is not None and (owner[0] is not module or owner[1].param != name):
                alias_parameter(module, name, *owner)


def _reset_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.fill_(1.0)
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                module.bias.fill_(0.0)


def _group(gates: list[tuple[nn.Module, Gate]], config: PopupConfig, layer_k: dict) -> None:
    """Attach a TopKSelector to every gate: one per layer, or one shared by the globally ranked layers."""
    shared: list[tuple[nn.Module, Gate]] = []
    peers: list[TopKSelector] = []  # refreshed together on the compiled CPU path
    for (module, gate), override in zip(gates, layer_k.values()):
        if config.scope == "global" and override is None:
            shared.append((module, gate))
            continue
        weight = module._parameters[gate.param]
        _attach(TopKSelector(kept_count(weight.numel(), gate.k)), [(module, gate)], peers)
    if shared:
        total = sum(m._parameters[g.param].numel() for m, g in shared)
        _attach(TopKSelector(kept_count(total, config.k)), shared, peers)


def _attach(selector: TopKSelector, members: list[tuple[nn.Module, Gate]], peers: list[TopKSelector]) -> None:
    selector.members = members
    selector.peers = peers
    peers.append(selector)
    for _, gate in members:
        gate.selector = selector


def _check_patterns(config: PopupConfig, refs: list[WeightRef]) -> None:
    names = [ref.module for ref in refs]
    for pattern, _ in config.layer_k:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(f"layer_k pattern {pattern!r} matches no gated layer; gated layers are: {shown}")
