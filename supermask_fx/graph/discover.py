"""Which parameters are weights to gate: the pass that reads the model's graph.

**The rule** (one rule, two ways of reading a graph). A parameter is a *weight* when the model's computation uses
it, after views, casts, transposes and indexing, as the weight operand of a linear map (``linear``, ``conv*``,
``conv_transpose*``, ``embedding``) or as an operand of a matrix product (``mm``, ``addmm``, ``bmm``, ``baddbmm``,
``matmul``, ``einsum``, ``grouped_mm``). Normalization scales and shifts (found by the graph: ``LlamaRMSNorm`` and
``T5LayerNorm`` count) go to 1 / 0; everything else (biases, position tables added to activations, class tokens,
layer scales) is frozen at its value. Weights come back in ``named_modules()`` order, each Parameter once, so a
weight tied to several modules is gated once (preferably in a module that is not an embedding: the output layer).

**Reading the graph.**

1. ``torch.fx.symbolic_trace`` (torchvision, most timm and custom models): the weights of ``nn.Linear``,
   ``nn.Conv*``, ``nn.ConvTranspose*``, ``nn.Embedding`` and ``nn.MultiheadAttention`` modules, and every parameter
   the traced graph feeds as the weight of ``F.linear`` / ``F.conv*`` / ``F.embedding``.
2. ``torch.export`` (non-strict) when fx cannot trace the model, or when the fx graph feeds a parameter to a matrix
   product that rule 1 cannot lay out: the ATen graph read by ``supermask_fx.graph.rule``, which also tells each
   weight's layout (``(in, out)`` like GPT-2's ``Conv1D``; stacks of expert matrices). It needs example inputs:
   ``example_inputs=`` or, for Hugging Face ``PreTrainedModel``s and timm models, built from their config
   (``supermask_fx.graph.example_inputs``). Discovery only: the model stays an eager module of its own class.
3. Without a graph (no inputs, or export failed): the module types of rule 1, and a warning naming the parameters of
   2+ dimensions left ungated, with the fix.

``include=`` patterns (``fnmatch`` on qualified parameter names) add weights that no graph shows.
"""

from __future__ import annotations

import contextlib
import fnmatch
import operator
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .example_inputs import example_inputs_for, is_hf_model
from .rule import NORM_IDENTITY, GraphUse, read_graph

LINEAR_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)

# Normalization layers: never gated; popupify resets their affine values to scale 1 / shift 0 and freezes them.
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)

# functional ops whose second positional argument (or ``weight=``) is a weight
WEIGHT_OPS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.embedding,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
}

# matrix products: a parameter they read in an fx graph is laid out by the ATen reading (path 2)
PRODUCT_OPS = {
    operator.matmul,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.addmv,
    torch.mv,
    torch.einsum,
    torch.tensordot,
    torch.bilinear,
    F.bilinear,
}


@dataclass(frozen=True)
class WeightRef:
    """``module`` (qualified name, ``""`` for the root) holds the weight as parameter ``param``.

    ``fan_in_fan_out``: stored ``(..., in, out)`` (fan-in is the second-to-last dimension), like GPT-2's ``Conv1D``.
    ``expert_dims``: leading dimensions that index separate matrices (experts), each drawn and ranked as a layer.
    ``fans``: ``(fan_in, fan_out)`` of one matrix as the graph's product reads it, where the shape does not tell
    (an einsum contracting another dimension, a part of a weight joined by ``cat``); ``None``: from the shape.
    """

    module: str
    param: str
    fan_in_fan_out: bool = False
    expert_dims: int = 0
    fans: tuple[int, int] | None = None

    def to_record(self) -> dict:
        """The layout as a subnetwork file and the state_dict record store it (``fans`` only when set)."""
        out = {"name": self.name, "fan_in_fan_out": self.fan_in_fan_out, "expert_dims": self.expert_dims}
        if self.fans is not None:
            out["fans"] = list(self.fans)
        return out

    @classmethod
    def from_record(cls, layer: dict) -> WeightRef:
        """The inverse of ``to_record`` (``name`` is ``"<module>.<param>"``)."""
        module, _, param = layer["name"].rpartition(".")
        fans = layer.get("fans")
        return cls(
            module,
            param,
            bool(layer.get("fan_in_fan_out", False)),
            int(layer.get("expert_dims", 0)),
            (int(fans[0]), int(fans[1])) if fans is not None else None,
        )

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param


def module_weights(module: nn.Module) -> list[str]:
    """Names of the weights a linear-map module holds itself (not those of its children)."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, LINEAR_MODULES):
        return ["weight"]
    return []


@dataclass
class Discovery:
    """What ``find_weights`` found.

    Attributes:
        refs: the weights to gate, in ``named_modules()`` order, each Parameter once.
        path: how the graph was read: ``"fx"``, ``"export"`` or ``"modules"`` (no graph).
        trace_error: why ``torch.fx`` could not trace the model, ``None`` when it could.
        export_error: why ``torch.export`` could not capture it (path ``"modules"`` after a failed export).
        ungated: names of parameters with 2+ dimensions that are not gated and look like weights (path
            ``"modules"``: every such parameter outside embeddings and normalization layers; path ``"fx"``: those
            fed to a matrix product).
        norms: ``{parameter name: role}`` (``rule.NORM_IDENTITY``: scale, shift, ``1 + w`` scale) found by the
            ATen graph (normalization classes other than ``NORM_TYPES``).
        frozen: ``{parameter name: why it is not gated}`` for every other parameter.
        seconds: time spent capturing the graph.
        untrained: names of the parameters the model did not train (``requires_grad=False``), left as they are.
    """

    refs: list[WeightRef]
    path: str = "fx"
    trace_error: str | None = None
    export_error: str | None = None
    ungated: list[str] = field(default_factory=list)
    norms: dict[str, str] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    untrained: list[str] = field(default_factory=list)


def find_weights(
    model: nn.Module,
    include: tuple[str, ...] = (),
    fan_in_fan_out: bool = False,
    example_inputs=None,
) -> Discovery:
    """The weights to gate (see the module docstring for the rule and the three ways of reading the graph).

    A parameter with ``requires_grad=False`` (a fixed sinusoidal position table, a part the user froze) is data,
    not a weight: it is neither gated nor reset, unless an ``include`` pattern names it.

    Args:
        model: the model, unchanged.
        include: ``fnmatch`` patterns of parameter names to gate as well, stored ``(in, out)`` when
            ``fan_in_fan_out`` (unless the graph says otherwise).
        example_inputs: ``(args, kwargs)``, a tuple of positional args, a dict of keyword args, or a single tensor:
            inputs to capture the ATen graph with when fx cannot trace the model. ``None``: built for Hugging Face
            models, else no ATen graph.

    Raises:
        ValueError: an ``include`` pattern that matches no parameter, or matches one with fewer than 2 dimensions.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    included = _included(params, include)
    found = _find_weights(model, params, included, fan_in_fan_out, example_inputs)
    return _leave_untrained(found, params, included)


def _leave_untrained(found: Discovery, params: dict[str, nn.Parameter], included: list[str]) -> Discovery:
    """Drop the parameters the model does not train (``requires_grad=False``) from the weights and the norms: they
    stay exactly as they are."""
    untrained = {id(p) for name, p in params.items() if not p.requires_grad and name not in included}
    if not untrained:
        return found
    why = "requires_grad=False in the model: not trained by it, kept exactly as it is"
    kept = [r for r in found.refs if id(params[r.name]) not in untrained]
    left = [r.name for r in found.refs if id(params[r.name]) in untrained]
    found.untrained = left + [n for n in found.norms if id(params[n]) in untrained]
    found.refs = kept
    found.norms = {n: kind for n, kind in found.norms.items() if id(params[n]) not in untrained}
    found.ungated = [n for n in found.ungated if id(params[n]) not in untrained]
    found.frozen = {**found.frozen, **{n: why for n, p in params.items() if id(p) in untrained}}
    return found


def _find_weights(model, params, included, fan_in_fan_out, example_inputs) -> Discovery:
    found: dict[str, WeightRef] = {}
    for name, module in model.named_modules():
        for param in module_weights(module):
            found[_join(name, param)] = WeightRef(name, param)
    for name in included:
        if name not in found:
            module_name, _, param = name.rpartition(".")
            found[name] = WeightRef(module_name, param, fan_in_fan_out)
    trace_error, products = None, []
    try:
        with _unchanged(model):
            graph = fx.Tracer().trace(model)
    except Exception as error:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        trace_error = _reason(error)
    else:
        for node in graph.nodes:
            if node.op != "get_attr" or node.target in found:
                continue
            if any(_feeds_weight(node, user) for user in node.users):
                module_name, _, param = node.target.rpartition(".")
                found[node.target] = WeightRef(module_name, param)
            elif any(user.op == "call_function" and user.target in PRODUCT_OPS for user in node.users):
                products.append(node.target)
        refs = _ordered(model, found)
        seen = _gated_ids(model, refs)
        products = [n for n in products if n in params and params[n].dim() >= 2 and id(params[n]) not in seen]
        if not products:
            return Discovery(refs, "fx", frozen=_frozen_by_modules(model, refs))
    inputs = _normalize_inputs(example_inputs) if example_inputs is not None else example_inputs_for(model)
    export_error = None
    if inputs is not None:
        start = time.perf_counter()
        try:
            uses = _export_uses(model, *inputs)
        except Exception as error:
            export_error = _reason(error)
        else:
            return _from_graph(model, params, uses, included, fan_in_fan_out, trace_error, time.perf_counter() - start)
    elif trace_error is None:  # fx traced, but some products need the ATen reading and there are no inputs
        refs = _ordered(model, found)
        return Discovery(refs, "fx", ungated=_unique(model, products), frozen=_frozen_by_modules(model, refs))
    refs = _ordered(model, found)
    return Discovery(
        refs,
        "modules",
        trace_error,
        export_error,
        _untraced_matrices(model, refs),
        frozen=_frozen_by_modules(model, refs),
    )


def _from_graph(model, params, uses: dict[str, GraphUse], included, fan_in_fan_out, trace_error, seconds) -> Discovery:
    # tied parameters: one placeholder is used for all their names; every name of a Parameter shares its best use
    by_id: dict[int, GraphUse] = {}
    for name, use in uses.items():
        p = params.get(name)
        if p is not None and (id(p) not in by_id or by_id[id(p)].kind != "weight"):
            by_id[id(p)] = use
    found: dict[str, WeightRef] = {}
    norms, frozen = {}, {}
    for name, p in params.items():
        use = by_id.get(id(p), GraphUse("other", "not used by the graph"))
        module_name, _, param = name.rpartition(".")
        if use.kind == "weight" and p.dim() >= 2:
            found[name] = WeightRef(module_name, param, use.fan_in_fan_out, use.expert_dims, use.fans)
        elif name in included:
            found[name] = WeightRef(module_name, param, fan_in_fan_out)
        elif use.kind in NORM_IDENTITY:
            norms[name] = use.kind
        else:
            frozen[name] = _describe(use, name)
    refs = _ordered(model, found)
    gated = {ref.name for ref in refs}
    frozen = {n: why for n, why in frozen.items() if n not in gated}
    return Discovery(refs, "export", trace_error, norms=norms, frozen=frozen, seconds=seconds)


def _describe(use: GraphUse, name: str) -> str:
    if use.kind == "added":
        return "bias" if name.endswith("bias") else f"added to activations ({use.op}): a position table or bias"
    if use.kind == "concatenated":
        return f"concatenated to activations ({use.op}): a class token"
    if use.kind == "scale":
        return f"multiplies activations ({use.op}): a layer scale"
    if use.kind == "weight":
        return "a weight of fewer than 2 dimensions"
    return f"other use ({use.op})" if use.op else "not used by the graph"


def _export_uses(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, GraphUse]:
    """Capture ``model``'s ATen graph (eval mode, non-strict ``torch.export``, no key/value cache) and read it; the
    model is left exactly as it was (``_unchanged``). For a Hugging Face MoE model whose experts loop over
    ``nonzero()`` (not exportable), retry with its ``grouped_mm`` experts; if that is not possible either, the
    first export's error is the one raised."""
    with _eval_mode(model), _unchanged(model), _without_cache(model):
        try:
            program = torch.export.export(model, args, kwargs, strict=False)
        except Exception as error:
            program = _export_with_grouped_experts(model, args, kwargs, error)
    return read_graph(program.graph, program.graph_signature.inputs_to_parameters)


def _export_with_grouped_experts(model: nn.Module, args: tuple, kwargs: dict, error: Exception):
    """Retry the export with ``grouped_mm`` experts, or raise ``error`` (the real cause) when the model has no
    experts implementation to switch or the retry fails too."""
    if not (is_hf_model(model) and hasattr(model, "set_experts_implementation")):
        raise error
    before = model.get_experts_implementation()
    if all(v in (None, "grouped_mm") for v in before.values()):
        raise error
    try:
        model.set_experts_implementation("grouped_mm")
    except Exception:
        raise error from None  # no experts to switch (Longformer): the first export's error is the cause
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception:
        raise error from None
    finally:
        model.set_experts_implementation(before)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


_PLAIN = (str, int, float, bool, type(None))


@contextlib.contextmanager
def _unchanged(model: nn.Module):
    """Leave ``model`` as it was, whatever its forward did while the graph was captured: the submodules,
    parameters, buffers and hooks each module holds, its plain attributes (strings, numbers, flags) and those of
    its Hugging Face configs, and no attribute it did not have. BigBird, given a sequence too short for
    block-sparse attention, swaps its attention modules for full ones and records that in an attribute; a
    transformers model's first forward installs output-capturing hooks and sets a flag; capturing the graph must
    do neither to the user's model."""
    modules = list(model.modules())
    configs = _configs(model)
    saved = [(m, {k: dict(v) for k, v in _stores(m)}, _plain_attributes(m), set(vars(m))) for m in modules]
    saved_configs = [(c, _plain_attributes(c)) for c in configs]
    try:
        yield
    finally:
        for module, stores, plain, names in saved:
            for key, store in _stores(module):
                before = stores.get(key, {})
                if store != before or any(store[k] is not v for k, v in before.items()):
                    store.clear()
                    store.update(before)
            for key in set(vars(module)) - names:  # attributes the forward added
                del vars(module)[key]
            _restore_plain(module, plain)
        for config, plain in saved_configs:
            _restore_plain(config, plain)


def _stores(module: nn.Module):
    """``(name, dict)`` of the dicts a module holds its children, tensors and hooks in."""
    for key, value in vars(module).items():
        if isinstance(value, dict) and (key in ("_modules", "_parameters", "_buffers") or "hook" in key):
            yield key, value


def _plain_attributes(obj) -> dict:
    return {key: value for key, value in vars(obj).items() if isinstance(value, _PLAIN)}


def _restore_plain(obj, plain: dict) -> None:
    current = vars(obj)
    for key, value in plain.items():
        if current.get(key, _MISSING) is not value and current.get(key, _MISSING) != value:
            current[key] = value


_MISSING = object()


def _configs(model: nn.Module) -> list:
    """A Hugging Face model's config and its sub-configs (text, vision, ...), each once."""
    root = getattr(model, "config", None) if is_hf_model(model) else None
    out, stack = [], [root] if root is not None else []
    while stack:
        config = stack.pop()
        if any(config is seen for seen in out):
            continue
        out.append(config)
        stack.extend(v for v in vars(config).values() if type(v).__name__.endswith("Config") and hasattr(v, "to_dict"))
    return out


@contextlib.contextmanager
def _without_cache(model: nn.Module):
    """``use_cache=False`` in a Hugging Face model's config and sub-configs while the graph is captured: models that
    take ``use_cache`` through ``**kwargs`` (GraniteMoE, Llava, BLIP-2) otherwise return a ``DynamicCache``, which
    export cannot flatten. Restored afterwards (``_unchanged`` restores it too)."""
    configs = [c for c in _configs(model) if getattr(c, "use_cache", None)]
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def _normalize_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], dict)
    ):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(
        f"example_inputs={type(example_inputs).__name__} is not understood: pass a tensor, a tuple of positional "
        "inputs, a dict of keyword inputs, or (args, kwargs)"
    )


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}".rstrip(": ")


def _included(params: dict[str, nn.Parameter], include: tuple[str, ...]) -> list[str]:
    """Names of the parameters (``{qualified name: parameter}``) matched by the ``include`` patterns (checked: each
    matches, each has 2+ dims)."""
    names: list[str] = []
    for pattern in include:
        matched = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            candidates = [name for name, p in params.items() if p.dim() >= 2]
            shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
            raise ValueError(
                f"include pattern {pattern!r} matches no parameter; it is matched against qualified parameter names "
                f"such as: {shown}"
            )
        for name in matched:
            if params[name].dim() < 2:
                raise ValueError(
                    f"include pattern {pattern!r} matches {name} of shape {tuple(params[name].shape)}: only weights "
                    "with 2+ dimensions can be gated; narrow the pattern to the weights (e.g. '*.c_attn.weight')"
                )
            names.append(name)
    return names


def _untraced_matrices(model: nn.Module, refs: list[WeightRef]) -> list[str]:
    """Without a graph: the parameters of 2+ dimensions that are not gated, outside normalization layers."""
    seen = _gated_ids(model, refs)
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                names.append(_join(module_name, param_name))
    return names


def _unique(model: nn.Module, names: list[str]) -> list[str]:
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    out = []
    for name in names:
        if id(params[name]) not in seen:
            seen.add(id(params[name]))
            out.append(name)
    return out


def _frozen_by_modules(model: nn.Module, refs: list[WeightRef]) -> dict[str, str]:
    """Why each parameter that is not gated is frozen, from module types (paths ``"fx"`` and ``"modules"``)."""
    gated = _gated_ids(model, refs)
    frozen = {}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in gated:
                continue
            name = _join(module_name, param_name)
            if isinstance(module, NORM_TYPES):
                frozen[name] = "normalization (scale 1, shift 0)"
            elif param_name.endswith("bias"):
                frozen[name] = "bias"
            else:
                frozen[name] = "not a weight of a linear map the graph shows"
    return frozen


def _gated_ids(model: nn.Module, refs: list[WeightRef]) -> set[int]:
    """``id`` of every Parameter the refs gate (a tied Parameter is one id under any of its names)."""
    return {id(model.get_submodule(r.module)._parameters[r.param]) for r in refs}


def _feeds_weight(node: fx.Node, user: fx.Node) -> bool:
    if user.op != "call_function" or user.target not in WEIGHT_OPS:
        return False
    weight = user.kwargs.get("weight", user.args[1] if len(user.args) > 1 else None)
    return weight is node


def _ordered(model: nn.Module, found: dict[str, WeightRef]) -> list[WeightRef]:
    """Keep real Parameters, in ``named_modules`` order, each Parameter object once: a tied Parameter is gated in
    the first module holding it that is not an embedding (the output layer, a linear map), else in the first."""
    modules = dict(model.named_modules(remove_duplicate=False))
    rank = {name: i for i, name in enumerate(modules)}
    chosen: dict[int, WeightRef] = {}
    for ref in sorted(found.values(), key=lambda r: (rank.get(r.module, len(rank)), r.param)):
        module = modules.get(ref.module) or model.get_submodule(ref.module)
        param = module._parameters.get(ref.param)
        if not isinstance(param, nn.Parameter):
            continue
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{ref.name} is a lazy parameter that is not materialized yet: run one forward pass through the "
                "model (so lazy modules know their shapes) before popupify"
            )
        held = chosen.get(id(param))
        if held is None or (_is_embedding(modules.get(held.module)) and not _is_embedding(module)):
            chosen[id(param)] = ref
    return sorted(chosen.values(), key=lambda r: (rank.get(r.module, len(rank)), r.param))


def _is_embedding(module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param
