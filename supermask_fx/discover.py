"""Which parameters are weights to gate: the torch.fx pass.

A parameter is a weight to gate when

* it is the weight of a module that computes a linear map: ``nn.Linear``, ``nn.Conv1d/2d/3d``,
  ``nn.ConvTranspose1d/2d/3d`` (subclasses included) and the projections of ``nn.MultiheadAttention``; or
* the model's traced graph feeds it (a ``get_attr`` node) as the ``weight`` argument of ``F.linear``,
  ``F.conv*`` or ``F.conv_transpose*``: weights used functionally inside custom modules.

The first rule needs no trace; the second does. When ``torch.fx`` cannot trace the model (data-dependent control
flow), only the first rule applies and the reason is reported so that ``popupify`` can warn once.
Parameters are returned in ``named_modules()`` order, each once, so a weight shared by two modules is gated once.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class WeightRef:
    """``module`` (qualified name, ``""`` for the root) holds the weight as parameter ``param``."""

    module: str
    param: str

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


def find_weights(model: nn.Module) -> tuple[list[WeightRef], str | None]:
    """The weights to gate, and why tracing failed (``None`` when it worked)."""
    found: dict[str, WeightRef] = {}
    for name, module in model.named_modules():
        for param in module_weights(module):
            found[_join(name, param)] = WeightRef(name, param)
    try:
        graph = fx.Tracer().trace(model)
    except Exception as error:  # torch.fx raises TraceError, TypeError, NotImplementedError, ...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        return _ordered(model, found), reason
    for node in graph.nodes:
        if node.op != "get_attr" or node.target in found:
            continue
        if any(_feeds_weight(node, user) for user in node.users):
            module_name, _, param = node.target.rpartition(".")
            found[node.target] = WeightRef(module_name, param)
    return _ordered(model, found), None


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
