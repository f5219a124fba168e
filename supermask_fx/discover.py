"""Which parameters are weights to gate: the torch.fx pass.

A parameter is a weight to gate when

* it is the weight of a module that computes a linear map: ``nn.Linear``, ``nn.Conv1d/2d/3d``,
  ``nn.ConvTranspose1d/2d/3d`` (subclasses included) and the projections of ``nn.MultiheadAttention``; or
* the model's traced graph feeds it (a ``get_attr`` node) as the ``weight`` argument of ``F.linear``,
  ``F.conv*`` or ``F.conv_transpose*``: weights used functionally inside custom modules; or
* its qualified name matches one of the user's ``include`` patterns (``fnmatch``): weights the rules above cannot
  know, such as those of Hugging Face GPT-2's ``Conv1D`` (``torch.addmm(b, x, W)`` with ``W`` stored
  ``(in, out)``).

The first and third rules need no trace; the second does. When ``torch.fx`` cannot trace the model (data-dependent
control flow), the second rule is skipped and the reason is reported so that ``popupify`` can warn once, naming the
parameters of 2+ dimensions left ungated. A traced parameter that feeds a matrix product (``@``, ``torch.matmul``,
``mm``, ``addmm``, ``bmm``, ``einsum``, ...) and is not gated is reported too: it looks like a weight.
Parameters are returned in ``named_modules()`` order, each once, so a weight shared by two modules is gated once.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

LINEAR_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
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
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
}

# matrix products: a parameter they read directly is probably a weight that no rule above gates
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
    """``module`` (qualified name, ``""`` for the root) holds the weight as parameter ``param``."""

    module: str
    param: str
    fan_in_fan_out: bool = False  # stored (in, out, ...): fan-in is dimension 0 (``include`` with ``fan_in_fan_out``)

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
        trace_error: why ``torch.fx`` could not trace the model, ``None`` when it could.
        ungated: names of parameters with 2+ dimensions that are not gated and look like weights: those fed to a
            matrix product in the traced graph, or, when the trace failed, every such parameter outside
            embeddings and normalization layers.
    """

    refs: list[WeightRef]
    trace_error: str | None = None
    ungated: list[str] = field(default_factory=list)


def find_weights(model: nn.Module, include: tuple[str, ...] = (), fan_in_fan_out: bool = False) -> Discovery:
    """The weights to gate: the module rule, the traced ``F.linear``/``F.conv*`` rule and the ``include`` patterns
    (whose parameters are stored ``(in, out, ...)`` when ``fan_in_fan_out``).

    Raises:
        ValueError: an ``include`` pattern that matches no parameter, or matches one with fewer than 2 dimensions.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, WeightRef] = {}
    for name, module in model.named_modules():
        for param in module_weights(module):
            found[_join(name, param)] = WeightRef(name, param)
    for name in _included(params, include):
        if name not in found:
            module_name, _, param = name.rpartition(".")
            found[name] = WeightRef(module_name, param, fan_in_fan_out)
    try:
        graph = fx.Tracer().trace(model)
    except Exception as error:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        refs = _ordered(model, found)
        return Discovery(refs, reason, _untraced_matrices(model, refs))
    products = []
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
    ungated = []
    for name in products:
        p = params.get(name)
        if p is not None and p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            ungated.append(name)
    return Discovery(refs, None, ungated)


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
    """Without a trace: the parameters of 2+ dimensions that are not gated, outside embeddings and norms."""
    seen = _gated_ids(model, refs)
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag) + NORM_TYPES):
            continue
        for param_name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and id(p) not in seen:
                seen.add(id(p))
                names.append(_join(module_name, param_name))
    return names


def _gated_ids(model: nn.Module, refs: list[WeightRef]) -> set[int]:
    """``id`` of every Parameter the refs gate (a tied Parameter is one id under any of its names)."""
    return {id(model.get_submodule(r.module)._parameters[r.param]) for r in refs}


def _feeds_weight(node: fx.Node, user: fx.Node) -> bool:
    if user.op != "call_function" or user.target not in WEIGHT_OPS:
        return False
    weight = user.kwargs.get("weight", user.args[1] if len(user.args) > 1 else None)
    return weight is node


def _ordered(model: nn.Module, found: dict[str, WeightRef]) -> list[WeightRef]:
    """Keep real Parameters, in ``named_modules`` order, each Parameter object once."""
    rank = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    seen: set[int] = set()
    refs = []
    for ref in sorted(found.values(), key=lambda r: (rank.get(r.module, len(rank)), r.param)):
        module = model.get_submodule(ref.module)
        param = module._parameters.get(ref.param)
        if not isinstance(param, nn.Parameter) or id(param) in seen:
            continue
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{ref.name} is a lazy parameter that is not materialized yet: run one forward pass through the "
                "model (so lazy modules know their shapes) before popupify"
            )
        seen.add(id(param))
        refs.append(ref)
    return refs


def _join(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param
