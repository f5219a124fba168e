"""``popupify``: the one verb that turns any PyTorch model into a supermask network, in place."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import warnings

import torch
from torch import nn

from ..graph.discover import NORM_TYPES, Discovery, WeightRef, find_weights
from ..graph.rule import NORM_IDENTITY
from ..selection import RankedLayer, TopKSelector
from ..selection.topk import kept_count
from .config import PopupConfig
from .gate import (
    Gate,
    adapter_modules,
    alias_parameter,
    follow_steps,
    gate_parameter,
    is_gated,
    scores_name,
    watch_fsdp,
    watch_optimizers,
)
from .initializers import can_draw_into, draw_scores, generator_for
from .method import Method
from .packed import pack_parameters, parameter_holders
from .source import KEEP
from .state import attach_hooks
from .wrappers import wrapper_kind

# The bias that goes with a gated weight, for the ``bias`` rule (``constant_parameters``).
BIAS_OF = {
    "weight": "bias",
    "in_proj_weight": "in_proj_bias",
    "q_proj_weight": "in_proj_bias",
    "k_proj_weight": "in_proj_bias",
    "v_proj_weight": "in_proj_bias",
}


def popupify(
    model: nn.Module,
    k: float | PopupConfig,
    *,
    example_inputs=None,
    weights: list[WeightRef] | None = None,
    **options,
) -> nn.Module:
    """Turn ``model`` into a supermask network in place and return it.

    Every weight found by ``supermask_fx.graph.discover`` (the weight operands of linear maps, convolutions, embeddings
    and matrix products in the model's graph) is gated: it is redrawn from ``init`` with ``seed`` and frozen, it
    gains a score Parameter (for methods with scores), and reading it gives ``weight * mask``. Module classes,
    paths and ``state_dict`` names are unchanged. Then every other parameter is frozen: normalization scales and
    shifts get 1 / 0, biases of gated layers are zeroed (``bias="zero"``) or kept (``bias="keep"``), anything
    else keeps its value. ``coverage(model)`` lists what was gated and why the rest was not.

    Args:
        model: any ``nn.Module``; it is modified in place.
        k: fraction of weights kept in each layer (0 < k <= 1), or a whole ``PopupConfig``.
        example_inputs: inputs for one forward pass (a tensor, a tuple of args, a dict of kwargs, or
            ``(args, kwargs)``), used only when ``torch.fx`` cannot trace the model, to read its graph with
            ``torch.export``. Hugging Face ``PreTrainedModel``s need none: they are built from the config.
        weights: the exact weights to gate (``WeightRef``s, as recorded in a subnetwork file or checkpoint); skips
            discovery. Used by ``load_subnetwork`` and ``restore``.
        **options: the other ``PopupConfig`` fields (``method``, ``init``, ``scaled``, ``seed``, ``scope``,
            ``layer_k``, ``mode``, ``nonlinearity``, ``bias``, ``norms``, ``scores``, ``include``,
            ``fan_in_fan_out``, ``method_options``, ``score_dtype``, ``weight_storage``, ``rebuild_effective``).
            ``init="keep"`` masks the weights the model holds (a pretrained model's) instead of redrawing them; a
            Hugging Face model loaded with ``from_pretrained`` needs ``init`` named (``"keep"``, or a distribution
            to redraw it on purpose).

    Returns:
        ``model`` itself. Train it with ``torch.optim.SGD(supermask_parameters(model), ...)``.

    Warns:
        UserWarning: once, when no graph could be read (the message names the weights left ungated and the fix), or
            when a traced graph feeds parameters to matrix products and there are no inputs to lay them out.

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
    _check_model(model)
    if weights is None:
        _check_not_saved_subnetwork(model)
        if not isinstance(k, PopupConfig) and "init" not in options:
            _check_not_pretrained(model)
    if any(is_gated(m) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} is already popupified; popupify a freshly built model instead "
            "(supermask_fx.materialize(model) gives a plain copy with the masks baked in)"
        )
    if weights is not None:
        found = Discovery(list(weights), "recorded")
    else:
        found = find_weights(model, config.include, config.fan_in_fan_out, example_inputs)
        _warn_coverage(model, found)
    refs = found.refs
    if not refs and found.untrained:
        raise ValueError(
            f"every weight of {type(model).__name__} has requires_grad=False ({_shown(found.untrained)}): popupify "
            "leaves parameters the model does not train exactly as they are. Call model.requires_grad_(True) first "
            "to gate them, or name the ones to gate with include="
        )
    if not refs:
        raise ValueError(f"{type(model).__name__} has no Linear, Conv or other weight-bearing layer to gate")
    _check_patterns(config, refs)

    method = config.make_method()
    layer_k = {ref: config.k_for(ref.module) for ref in refs}
    gates: list[tuple[nn.Module, Gate]] = []
    padding = _padding_rows(model)
    holders = parameter_holders(model) if config.weight_storage == "bits" else None
    with torch.no_grad():
        for ref in refs:
            module = model.get_submodule(ref.module)
            k_layer = layer_k[ref] if layer_k[ref] is not None else config.k
            padding_idx = padding.get(id(module._parameters[ref.param]))
            _redraw_weight(module, ref, config, k_layer, method, padding_idx)
            if holders is not None:  # layer by layer: each float weight is freed before the next is drawn
                pack_parameters(model, [module._parameters[ref.param]], holders)
            gate = Gate(ref.module, ref.param, method, k_layer, config=config, layout=ref, padding_idx=padding_idx)
            gate_parameter(module, gate)
            gates.append((module, gate))
        _alias_tied(model, gates)
        untrained = [name for name, p in model.named_parameters() if not p.requires_grad]
        _set_constants(model, gates, config, untrained, found.norms)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.norms == "learn":
        for param in learned_norms(model, found.norms, untrained):
            param.requires_grad_(True)
    for module, gate in gates:
        module._parameters[gate.param].requires_grad_(method.trains_weights)
        if gate.scores is not None:
            module._parameters[gate.scores].requires_grad_(method.trains_scores)
    if method.uses_topk:
        _group(gates, config, layer_k)
    if method.wants_steps and method.has_scores:
        for module, gate in gates:
            follow_steps(module, gate)
    attach_hooks(model)
    watch_optimizers()
    watch_fsdp()
    model.__dict__["_supermask_discovery"] = dataclasses.replace(found, refs=[], untrained=untrained)
    _mark_config(model, config)
    return model


# The key a popupified Hugging Face model's config carries (saved in config.json by save_pretrained).
CONFIG_KEY = "supermask_fx"


class _LiveSettings(dict):
    """The settings popupify wrote into a config in this process. Copies of the config (``from_config`` deep-copies
    it) keep this same object, so a model built in memory from a config another popupify call marked is not taken
    for a saved subnetwork; a config read from ``config.json`` holds a plain ``dict`` instead."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


def _mark_config(model: nn.Module, config: PopupConfig) -> None:
    """Write the settings into a Hugging Face model's config, so that ``config.json`` says the saved weights are a
    subnetwork: a plain ``from_pretrained`` of it and ``popupify`` again would start over from new random weights
    (``_check_not_saved_subnetwork`` refuses that)."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        setattr(hf_config, CONFIG_KEY, _LiveSettings(popupify=config.to_dict(), reload_with="supermask_fx.restore"))


def unmark_config(model: nn.Module) -> None:
    """Remove the settings ``popupify`` wrote into a Hugging Face config (``materialize``: the copy is a plain
    model)."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and CONFIG_KEY in vars(hf_config):
        delattr(hf_config, CONFIG_KEY)


def _check_not_saved_subnetwork(model: nn.Module) -> None:
    hf_config = getattr(model, "config", None)
    saved = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(saved, dict) or isinstance(saved, _LiveSettings):
        return
    raise ValueError(
        f"{type(model).__name__}'s config carries supermask_fx settings ({CONFIG_KEY!r}): it was loaded from a "
        "popupified model's save. Its weights are that subnetwork's masked random weights, and popupify would "
        "replace them with new random ones. To continue training the saved model, rebuild it with "
        "supermask_fx.restore(model, directory) (or supermask_fx.integrations.huggingface.from_pretrained(cls, "
        f"directory)); to start over on purpose, delete the key first: del model.config.{CONFIG_KEY}"
    )


def _check_not_pretrained(model: nn.Module) -> None:
    """Refuse to redraw a Hugging Face model loaded from a checkpoint when no ``init`` was chosen: its config names
    where the weights came from (``_name_or_path``), and popupify's default would silently replace them."""
    hf_config = getattr(model, "config", None)
    origin = getattr(hf_config, "_name_or_path", "") if hasattr(hf_config, "to_json_string") else ""
    if isinstance(origin, str) and origin:
        raise ValueError(
            f"{type(model).__name__} was loaded from {origin!r} (its config says so), and popupify redraws the "
            "weights it gates unless told otherwise. To learn masks over these pretrained weights, pass "
            "init='keep' (the weights, biases and norms stay bit for bit; the first mask is each layer's top-k by "
            "magnitude); to find a subnetwork in random weights on purpose, name the distribution, e.g. "
            "init='signed_constant'"
        )


def _check_no_adapters(model: nn.Module) -> None:
    adapters = adapter_modules(model)
    if adapters:
        raise ValueError(
            f"popupify got a model with PEFT adapters ({adapters[0]}): it would gate and redraw the adapter matrices "
            "(lora_B, zero by design, would become random). supermask_fx does not combine masks with PEFT adapters: "
            "popupify the base model without adapters to train masks, or train the adapters without popupify"
        )


def _check_model(model: nn.Module) -> None:
    """Refuse models popupify cannot rewrite correctly: wrapped ones (the wrapper would not learn of the scores, and
    names would carry its prefix), ones with PEFT adapters, and ones without real tensors."""
    _check_no_adapters(model)
    kind = wrapper_kind(model)
    if kind is not None:
        raise ValueError(
            f"popupify got a model wrapped by {kind}: popupify the model first and wrap it afterwards, e.g. "
            "model = popupify(model, k); model = DistributedDataParallel(model) (or accelerator.prepare(model), "
            "torch.compile(model)); the wrapper must see the score parameters popupify adds"
        )
    meta = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise ValueError(
            f"{meta} is on the meta device (a model built without memory): give it real storage first, e.g. "
            "model.to_empty(device='cpu'); popupify draws every weight it gates from the seed anyway"
        )


def _warn_coverage(model: nn.Module, found: Discovery) -> None:
    name = type(model).__name__
    if found.path == "modules":
        traced = (
            f"torch.fx could not trace {name} ({found.trace_error})"
            if found.trace_error
            else f"{name}'s torch.fx graph feeds parameters to matrix products"
        )
        if found.export_error is not None:
            why = f"{traced} and torch.export could not capture it ({found.export_error})"
            fix = (
                "Make the forward exportable with these inputs (torch.export cannot follow Python branches on "
                "tensor values), or name the weights with include=."
            )
        else:
            why = f"{traced} and no example inputs were given"
            fix = (
                "Pass example_inputs= (inputs for one forward pass) so that popupify reads the graph with "
                "torch.export, or name the weights with include=."
            )
        warnings.warn(
            f"{why}: popupify falls back to gating the weights of its Linear, Conv, ConvTranspose, Embedding and "
            f"MultiheadAttention modules in place (and those matched by include=).{_ungated_note(found.ungated)} "
            + fix,
            stacklevel=3,
        )
    elif found.ungated:
        warnings.warn(
            f"{name} feeds parameters to matrix products, and without example inputs popupify cannot read how: "
            f"{_ungated_note(found.ungated)} Pass example_inputs= (inputs for one forward pass) to gate them from "
            "the torch.export graph, or name them with include= (fan_in_fan_out=True if stored (in, out)).",
            stacklevel=3,
        )


def expected_weight(gate, current: torch.Tensor | None = None, module: nn.Module | None = None):
    """The weight a gated layer must hold, from its config's source (``core.source``): the seeded draw (float32,
    CPU), or for kept weights ``current`` itself. With ``module`` (the one holding the weight), what the layer's
    method makes of that draw (``Method.weight_of``: IteRand's redrawn weights, read off its buffers)."""
    shape = tuple(current.shape) if current is not None else None
    k = getattr(gate, "k_popupify", gate.k)  # the k it was drawn for (set_k and a k warm-up change gate.k)
    drawn = gate.config.source.weight(gate.name, shape, k, gate, current)
    if module is None or drawn is None:
        return drawn
    return gate.method.weight_of(gate, module, drawn)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _ungated_note(names: list[str]) -> str:
    return f" Not gated (frozen at their values): {_shown(names)}." if names else ""


def _padding_rows(model: nn.Module) -> dict[int, int]:
    """``{id(weight): padding_idx}`` of the embeddings that keep a zero padding row (also when the weight is gated
    in another module it is tied to: RoBERTa's output layer)."""
    rows = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.padding_idx is not None:
            weight = module._parameters.get("weight")
            if weight is not None:
                rows[id(weight)] = module.padding_idx % weight.shape[0]
    return rows


def _redraw_weight(
    module: nn.Module, ref: WeightRef, config: PopupConfig, k: float, method, padding_idx: int | None
) -> None:
    weight = module._parameters[ref.param]
    shape = tuple(weight.shape)
    source = config.source
    if source.regenerates:
        if can_draw_into(weight):  # in place: no temporary the size of the layer
            source.weight(ref.name, shape, k, ref, padding_idx=padding_idx, out=weight.data)
        else:
            weight.copy_(source.weight(ref.name, shape, k, ref, padding_idx=padding_idx))
    if method.has_scores:
        name = scores_name(ref.param)
        if name in module._parameters or hasattr(module, name):
            raise ValueError(f"{ref.module or 'the model'} already has an attribute {name!r}; cannot add scores")
        dtype = getattr(torch, config.score_dtype) if config.score_dtype else weight.dtype
        # scores drawn straight into a narrower dtype when the method starts from the draw itself (same values)
        narrow = dtype if type(method).initial_scores is Method.initial_scores and dtype.itemsize < 4 else torch.float32
        if config.scores == "magnitude":  # the first mask: the weights' own top-k by |w|
            drawn = weight.detach().abs().to("cpu", torch.float32, copy=True)
        else:
            generator = generator_for(config.seed, ref.name, "scores")
            drawn = draw_scores(shape, generator, ref.fan_in_fan_out, ref.expert_dims, ref.fans, dtype=narrow)
        scores = method.initial_scores(drawn)
        module.register_parameter(name, nn.Parameter(scores.to(weight.device, dtype)))


def _alias_tied(model: nn.Module, gates: list[tuple[nn.Module, Gate]]) -> None:
    """Every other module holding a gated Parameter (tied weights: a language model's token embedding and output
    layer) reads it through the owner's gate, so the tied weight has one mask wherever it is used."""
    owners = {id(module._parameters[gate.param]): (module, gate) for module, gate in gates}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            owner = owners.get(id(param))
            if owner is not None and (owner[0] is not module or owner[1].param != name):
                alias_parameter(module, name, *owner)


def constant_parameters(
    model: nn.Module, pairs: list[tuple[nn.Module, Gate]], config: PopupConfig, untrained
) -> dict[str, float]:
    """``{qualified name: value}`` of the parameters ``popupify`` sets to a constant by module type, the one rule
    popupify applies and subnetwork files rely on (they store such a parameter only when it holds another value):
    the biases of gated layers with ``bias="zero"`` (0), and with ``norms="identity"`` the scales (1) and shifts (0)
    of ``NORM_TYPES`` modules; never a parameter the model did not train (``untrained`` names: ``requires_grad=False``
    before popupify). Norms found only by the graph (hand-written RMS norms) are not here: popupify resets them from its
    discovery, and files store their values."""
    untrained = set(untrained)
    prefix = {id(m): f"{name}." if name else "" for name, m in model.named_modules(remove_duplicate=False)}
    out: dict[str, float] = {}
    if config.bias == "zero":
        for module, gate in pairs:
            bias = BIAS_OF.get(gate.param)
            if bias is not None and isinstance(module._parameters.get(bias), torch.Tensor):
                out[prefix[id(module)] + bias] = 0.0
    if _resets_norms(config):
        out.update(_norm_affine(model, prefix))
    return {name: value for name, value in out.items() if name not in untrained}


def _norm_affine(model: nn.Module, prefix: dict[int, str]):
    """``(qualified name, identity value)`` of the scale (1) and shift (0) of every ``NORM_TYPES`` module
    (``prefix``: ``{id(module): "its.name."}``)."""
    for module in model.modules():
        if isinstance(module, NORM_TYPES) and id(module) in prefix:
            for name, value in (("weight", 1.0), ("bias", 0.0)):
                if isinstance(module._parameters.get(name), torch.Tensor):
                    yield prefix[id(module)] + name, value


def _resets_norms(config: PopupConfig) -> bool:
    """Whether popupify sets the norms to identity: ``norms="identity"``, and ``"learn"`` over random weights."""
    return config.norms == "identity" or (config.norms == "learn" and config.init != KEEP)


def learned_norms(model: nn.Module, graph_norms, untrained=()) -> list[nn.Parameter]:
    """The affine parameters of the model's norms (``NORM_TYPES`` modules and those the graph found), that
    ``norms="learn"`` trains; none the model did not train (``untrained`` names)."""
    untrained = set(untrained)
    params = dict(model.named_parameters(remove_duplicate=False))
    prefix = {id(m): f"{name}." if name else "" for name, m in model.named_modules(remove_duplicate=False)}
    names = [name for name, _ in _norm_affine(model, prefix)] + list(graph_norms)
    return [params[n] for n in dict.fromkeys(names) if n in params and n not in untrained]


def _set_constants(model, gates, config: PopupConfig, untrained, graph_norms: dict[str, str]) -> None:
    """Apply ``constant_parameters``, then (``norms="identity"``) set the norms the graph found to their identity
    (``{name: role}``, roles of ``graph.rule.NORM_IDENTITY``: hand-written RMS norms, Gemma's ``1 + w``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in constant_parameters(model, gates, config, untrained).items():
        params[name].fill_(value)
    if _resets_norms(config):
        for name, kind in graph_norms.items():
            if name not in untrained:
                params[name].fill_(NORM_IDENTITY[kind])


def _group(gates: list[tuple[nn.Module, Gate]], config: PopupConfig, layer_k: dict) -> None:
    """Attach a TopKSelector to every gate: one per layer, or one shared by the globally ranked layers."""
    shared: list[tuple[nn.Module, Gate]] = []
    peers: list[TopKSelector] = []  # refreshed together on the compiled CPU path
    for (module, gate), override in zip(gates, layer_k.values()):
        if config.scope == "global" and override is None:
            shared.append((module, gate))
            continue
        weight = module._parameters[gate.param]
        blocks = math.prod(weight.shape[: gate.expert_dims])  # each expert's matrix is ranked as a layer
        _attach(TopKSelector(kept_count(weight.numel() // blocks, gate.k), blocks=blocks), [(module, gate)], peers)
    if shared:
        total = sum(m._parameters[g.param].numel() for m, g in shared)
        _attach(TopKSelector(kept_count(total, config.k)), shared, peers)


def _attach(selector: TopKSelector, members: list[tuple[nn.Module, Gate]], peers: list[TopKSelector]) -> None:
    selector.peers = peers
    peers.append(selector)
    for module, gate in members:
        gate.selector = selector
        gate.layer_mask = selector.add(RankedLayer(module, gate))


def _check_patterns(config: PopupConfig, refs: list[WeightRef]) -> None:
    names = [ref.module for ref in refs]
    for pattern, _ in config.layer_k:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ValueError(f"layer_k pattern {pattern!r} matches no gated layer; gated layers are: {shown}")
