"""The weight rule read off a captured ATen graph (``torch.export``): which parameters are weights, and how.

A parameter is a **weight** when the graph uses it, after view-like ops (views, reshapes, casts, transposes,
permutes, ``expand``, indexing and slicing, ``split``/``chunk``, weight normalization's ``v``), as

* the weight operand of ``linear``, ``conv*`` / ``convolution``, ``conv_transpose*``, ``embedding``,
  ``embedding_bag``; or
* an operand of ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``matmul``, ``mv``, ``addmv``, ``einsum`` or
  ``_grouped_mm``.

Its **layout** comes from the same use: which dimension is the fan-in. ``linear`` and ``embedding`` read
``(out, in)``; a matrix product's right operand ``x @ W`` reads ``(in, out)`` (GPT-2's ``Conv1D``), its left
operand ``W @ x`` reads ``(out, in)``; a transpose on the way flips that. A weight with more than two dimensions used
by a matrix product (mixture-of-experts tensors ``(experts, out, in)``) is a stack of matrices: each one is drawn
and ranked as a layer of its own. Convolution weights keep ``torch.nn.init``'s layout.

A parameter is a **normalization** parameter when it is the weight or bias of ``layer_norm``, ``group_norm``,
``batch_norm``, ``instance_norm``, ``rms_norm``, or, for the RMS norms that models write out by hand
(``LlamaRMSNorm``, ``T5LayerNorm``: ``weight * (x * rsqrt(mean(x^2) + eps))``), a factor of ``mul`` whose other
operand comes from ``x * rsqrt(...)``. Parameters joined by ``cat`` / ``stack`` into one weight (MobileBERT's
output layer, ``cat([decoder.weight.t(), dense.weight])``) are each a weight, laid out and ranked as a layer of their
own (fans of their own shape). Norms that scale by ``(1 + w)`` (Gemma's ``Gemma3RMSNorm``, its ``q_norm`` /
``k_norm``: ``x_normed * (1 + w)``) are recognised by the ``add 1`` before that ``mul``: their identity is ``w = 0``
(kind ``norm_offset_scale``), whatever values the model was loaded with. Everything else (biases, position tables
added to activations, class tokens, layer scales) is neither: it is frozen at its value. Where a parameter has
several uses (tied weights), the first weight use in graph order sets its layout.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["GraphUse", "read_graph", "NORM_IDENTITY", "NORM_ROLES"]

# Normalization roles and the value that makes each one the identity (what popupify sets them to).
NORM_IDENTITY = {"norm_scale": 1.0, "norm_shift": 0.0, "norm_offset_scale": 0.0}
NORM_ROLES = {
    "norm_scale": "normalization scale (1)",
    "norm_shift": "normalization shift (0)",
    "norm_offset_scale": "normalization scale 1 + w (w = 0)",
}


@dataclass(frozen=True)
class GraphUse:
    """How the graph uses one parameter.

    Attributes:
        kind: ``"weight"``, ``"norm_scale"``, ``"norm_shift"``, ``"norm_offset_scale"`` (a norm scaling by
            ``1 + w``), ``"added"`` (added to activations: position tables,
            biases), ``"concatenated"`` (class tokens), ``"scale"`` (multiplies activations: layer scales) or
            ``"other"``.
        op: the ATen op of that use (``"aten.addmm"``), for reports.
        fan_in_fan_out: (weights) stored ``(..., in, out)``: the fan-in is the second-to-last dimension.
        expert_dims: (weights) leading dimensions that index separate matrices (experts), 0 for a plain weight.
        fans: (weights) ``(fan_in, fan_out)`` of one matrix as the product reads it, where the parameter's own shape
            does not tell them: an einsum contracting a dimension that is not the second-to-last (Funnel's
            ``r_kernel`` ``(d_model, heads, d_head)`` in ``"td,dnh->tnh"``: fan-in ``d_model``), or a part of a
            weight joined by ``cat`` (fan-in of the whole joined matrix). ``None`` otherwise.
    """

    kind: str
    op: str
    fan_in_fan_out: bool = False
    expert_dims: int = 0
    fans: tuple[int, int] | None = None


def _packets(*ops) -> set:
    out = set()
    for op in ops:
        packet = getattr(aten, op, None)
        if packet is not None:
            out.update(getattr(packet, name) for name in packet.overloads())
    return out


# Ops whose output is a view, cast or slice of their first operand: the walk follows the parameter through them.
_PASS_THROUGH = _packets(
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "_to_copy",
    "to",
    "type_as",
    "contiguous",
    "clone",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "lift_fresh_copy",
    "index",
    "select",
    "slice",
    "narrow",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "flatten",
    "unflatten",
    "_weight_norm",
    "numpy_T",
    "mT",
    "adjoint",
    "repeat",
    "movedim",
    "swapaxes",
    "view_as",
    "reshape_as",
    "_assert_tensor_metadata",
)
_WEIGHT_ARG = {
    op: 1
    for op in _packets(
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "_convolution",
        "conv_tbc",
    )
}
_WEIGHT_ARG.update({op: 0 for op in _packets("embedding", "embedding_bag", "_embedding_bag")})
_LINEAR_LIKE = _packets("linear", "embedding", "embedding_bag", "_embedding_bag")  # weight read (out, in)
# matrix products: operand positions (left, right)
_PRODUCTS = {op: (0, 1) for op in _packets("mm", "bmm", "matmul", "mv", "_grouped_mm", "grouped_mm")}
_PRODUCTS.update({op: (1, 2) for op in _packets("addmm", "baddbmm", "addbmm", "addmv")})
_EINSUM = _packets("einsum")
_NORMS = {op: (2, 3) for op in _packets("layer_norm", "native_layer_norm", "group_norm", "native_group_norm")}
_NORMS.update(
    {
        op: (1, 2)
        for op in _packets(
            "batch_norm",
            "native_batch_norm",
            "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training",
            "_native_batch_norm_legit_functional",
            "instance_norm",
            "cudnn_batch_norm",
            "miopen_batch_norm",
        )
    }
)
_NORMS.update({op: (2, None) for op in _packets("rms_norm", "_fused_rms_norm")})
_MUL = _packets("mul")
_RSQRT = _packets("rsqrt")
_ADD = _packets("add", "sub", "add_")
_CAT = _packets("cat", "concat", "stack")


def read_graph(graph: fx.Graph, placeholders: dict[str, str]) -> dict[str, GraphUse]:
    """``{parameter name: its use}`` for the parameters of an exported graph.

    Args:
        graph: the ATen graph of ``torch.export.export(...).graph``.
        placeholders: ``graph_signature.inputs_to_parameters``: placeholder name -> parameter name.
    """
    uses: dict[str, GraphUse] = {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in placeholders:
            node.meta["parameter"] = placeholders[node.name]
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in placeholders:
            continue
        name = placeholders[node.name]
        found = [use for use in _walk(node, node) if use is not None]
        rank = {"weight": 0, **dict.fromkeys(NORM_IDENTITY, 1), "concatenated": 2, "added": 3, "scale": 4}
        uses[name] = min(found, key=lambda use: rank.get(use.kind, 5)) if found else GraphUse("other", "")
    return uses


def _walk(source: fx.Node, node: fx.Node, swapped: bool = False, depth: int = 0):
    """Yield a ``GraphUse`` (or ``None``) for each use of ``node``, a view chain of the parameter ``source``."""
    if depth > 32:
        return
    for user in node.users:
        target = user.target
        if user.op != "call_function":
            continue
        inner = _into_subgraph(user, node)
        if inner is not None:  # a region under torch.no_grad / autocast: follow the operand into its subgraph
            for placeholder in inner:
                yield from _walk(source, placeholder, swapped, depth + 1)
            continue
        if target is operator.getitem or target in _PASS_THROUGH:
            if target in _PASS_THROUGH and _operand_index(user, node) != 0:
                yield GraphUse("other", _name(target))  # an index, a shape, a norm's g: not a view of the weight
                continue
            yield from _walk(source, user, swapped ^ _swaps(user), depth + 1)
        elif target in _WEIGHT_ARG:
            if _operand_index(user, node) == _WEIGHT_ARG[target]:
                yield _linear_weight(source, target, node, swapped)
            else:
                yield GraphUse("added" if _operand_index(user, node) == 2 else "other", _name(target))
        elif _product_operands(target) is not None:
            left, right = _product_operands(target)
            position = _operand_index(user, node)
            if position not in (left, right):
                yield GraphUse("added", _name(target))  # addmm's bias
                continue
            stored_in_out = (position == right) != swapped
            # the operand as the product reads it: (..., in, out) on the right, (..., out, in) on the left
            shape = _shape(node)
            read = None
            if len(shape) >= 2:
                read = (shape[-2], shape[-1]) if position == right else (shape[-1], shape[-2])
            yield _weight(source, target, fan_in_fan_out=stored_in_out, product=True, read=read, operand=node)
        elif target in _EINSUM:
            yield _einsum_use(source, user, node, swapped)
        elif target in _NORMS and _operand_index(user, node) == 0 and _derived_only_from(node, source):
            # the parameter itself normalized (weight standardization, BiT's StdConv2d): follow it to its use
            for use in _walk(source, user, swapped, depth + 1):
                yield use if use is None or use.kind == "weight" else GraphUse("other", _name(target))
        elif target in _NORMS:
            scale, shift = _NORMS[target]
            position = _operand_index(user, node)
            kind = "norm_scale" if position == scale else "norm_shift" if position == shift else "other"
            yield GraphUse(kind, _name(target))
        elif target in _MUL:
            other = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            if other and _is_rms_normalized(other[0]):
                yield GraphUse("norm_scale", "aten.mul (x * rsqrt(mean(x^2) + eps))")
            else:
                yield GraphUse("scale", _name(target))
        elif target in _ADD:
            yield GraphUse("norm_offset_scale" if _scales_rms_by_one_plus(user, node) else "added", _name(target))
        elif target in _CAT:
            if _all_parameters(user.args[0] if user.args else []):  # parameters joined into one weight: follow it
                found = [use for use in _walk(source, user, swapped, depth + 1) if use is not None]
                if any(use.kind == "weight" for use in found):
                    yield from found
                    continue
            yield GraphUse("concatenated", _name(target))
        else:
            yield GraphUse("other", _name(target))


def _into_subgraph(user: fx.Node, node: fx.Node) -> list[fx.Node] | None:
    """For a higher-order op that runs a subgraph on its operands (``wrap_with_set_grad_enabled``: a region under
    ``torch.no_grad()``, RWKV's; ``wrap_with_autocast``), the subgraph's placeholders ``node`` is passed as; else
    ``None``. The operands after the subgraph's ``get_attr`` map to its placeholders in order."""
    if not isinstance(user.target, torch._ops.HigherOrderOperator):
        return None
    owner = user.graph.owning_module
    args = list(user.args)
    at = next((i for i, a in enumerate(args) if isinstance(a, fx.Node) and a.op == "get_attr"), None)
    if owner is None or at is None:
        return None
    subgraph = getattr(owner, args[at].target, None)
    if not isinstance(subgraph, fx.GraphModule):
        return None
    placeholders = [n for n in subgraph.graph.nodes if n.op == "placeholder"]
    operands = args[at + 1 :]
    found = [placeholders[i] for i, a in enumerate(operands) if a is node and i < len(placeholders)]
    return found or None


def _all_parameters(nodes, depth: int = 0) -> bool:
    """Whether every tensor of a ``cat`` / ``stack`` comes from parameters (through views and casts): the pieces of
    one weight (MobileBERT's output layer: ``cat([decoder.weight.t(), dense.weight])``), not activations joined to
    a class token."""
    if not isinstance(nodes, (list, tuple)) or not nodes:
        return False
    for node in nodes:
        while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _PASS_THROUGH and depth < 32:
            node, depth = node.args[0], depth + 1
        if not (isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and node.meta.get("parameter")):
            return False
    return True


def _product_operands(target) -> tuple[int, int] | None:
    """(left, right) operand positions of a matrix product, also for custom ops named ``*grouped_mm*``
    (``transformers::grouped_mm_fallback``: same signature as ``aten._grouped_mm``)."""
    if target in _PRODUCTS:
        return _PRODUCTS[target]
    name = getattr(target, "__name__", "") if isinstance(target, torch._ops.OpOverload) else ""
    return (0, 1) if "grouped_mm" in name else None


def _weight(
    source: fx.Node,
    target,
    fan_in_fan_out: bool,
    product: bool = False,
    read: tuple[int, int] | None = None,
    operand: fx.Node | None = None,
    expert_dims: int | None = None,
) -> GraphUse:
    """A weight use. ``read``: ``(fan_in, fan_out)`` of one matrix as the product reads it (from the operand's
    shape at the product); kept as ``fans`` only where the parameter's own shape and layout give other fans."""
    shape = _shape(source)
    dims = len(shape)
    if expert_dims is None:
        expert_dims = max(0, dims - 2) if product else 0
        if operand is not None and expert_dims and _shape(operand)[:expert_dims] != shape[:expert_dims]:
            expert_dims = 0  # reshaped on the way: the leading dimensions are not separate matrices
    fan_in_fan_out = fan_in_fan_out if dims >= 2 else False
    fans = None
    if read is not None and dims >= 2 and shape:
        matrix = shape[expert_dims:]
        own = _own_fans(matrix, fan_in_fan_out) if len(matrix) >= 2 else None
        if own != tuple(read):
            fans = (int(read[0]), int(read[1]))
    return GraphUse("weight", _name(target), fan_in_fan_out=fan_in_fan_out, expert_dims=expert_dims, fans=fans)


def _linear_weight(source: fx.Node, target, node: fx.Node, swapped: bool) -> GraphUse:
    """The weight operand of ``linear`` / ``embedding`` / a convolution. A stack of matrices indexed down to one
    before a ``linear`` (JetMoE's experts: ``F.linear(x, weight[i])``) is a stack of experts: each matrix is drawn
    with its own fans and ranked as a layer of its own."""
    if target not in _LINEAR_LIKE:
        return _weight(source, target, fan_in_fan_out=False)
    whole, used = _shape(source), _shape(node)
    extra = len(whole) - len(used)
    if extra > 0 and len(used) == 2 and tuple(whole[extra:]) in (tuple(used), tuple(used[::-1])):
        return _weight(source, target, fan_in_fan_out=swapped, expert_dims=extra)
    return _weight(source, target, fan_in_fan_out=swapped)


def _own_fans(matrix: tuple[int, ...], fan_in_fan_out: bool) -> tuple[int, int]:
    """The fans ``supermask_fx.core.initializers.fans`` gives a matrix of this shape and layout."""
    receptive = math.prod(matrix[2:])
    fan_in, fan_out = matrix[1] * receptive, matrix[0] * receptive
    return (fan_out, fan_in) if fan_in_fan_out else (fan_in, fan_out)


def _einsum_use(source: fx.Node, user: fx.Node, node: fx.Node, swapped: bool) -> GraphUse:
    """An einsum operand, laid out by its subscripts: a subscript also in another operand and in the output is a
    batch dimension, one in another operand but not in the output is contracted (the fan-in), one only in this
    operand and the output is free (the fan-out). The fans are those of one matrix (batch dimensions excluded);
    leading batch dimensions are a stack of expert matrices, each ranked on its own; with a batch dimension
    elsewhere the tensor is ranked as one layer."""
    equation, operands = user.args[0], user.args[1]
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    position = next((i for i, o in enumerate(operands) if o is node), None)
    if position is None or "." in inputs or not arrow or len(terms[position]) < 2:
        return GraphUse("other", "aten.einsum")
    term = terms[position]
    shape = _shape(node)
    others = set("".join(t for i, t in enumerate(terms) if i != position))
    roles = [_einsum_role(c, others, output) for c in term]
    if "?" in roles or "in" not in roles or "out" not in roles or len(shape) != len(term):
        return GraphUse("other", "aten.einsum")
    leading = next((i for i, role in enumerate(roles) if role != "batch"), len(roles))
    if "batch" in roles[leading:] or _shape(source)[:leading] != shape[:leading]:
        leading = 0  # batch dimensions in the middle (Funnel's seg_embed, per head), or reshaped: ranked as one layer
    fan_in = math.prod(n for n, role in zip(shape, roles) if role == "in")
    fan_out = math.prod(n for n, role in zip(shape, roles) if role == "out")
    # after the walk's transposes the operand's last two dims are swapped relative to storage
    row, col = (roles[-1], roles[-2]) if swapped else (roles[-2], roles[-1])
    stored_in_out = row == "in" and col == "out"
    return _weight(
        source,
        aten.einsum.default,
        fan_in_fan_out=stored_in_out,
        product=True,
        read=(fan_in, fan_out),
        operand=node,
        expert_dims=leading,
    )


def _scales_rms_by_one_plus(add: fx.Node, node: fx.Node) -> bool:
    """Whether ``add`` is ``node + 1`` (or ``1 + node``) and its result, after casts, scales normalized activations:
    Gemma's ``x_normed * (1 + w)``, or the scale argument of a norm op (Nemotron's ``layer_norm(x, w + 1, b)``)."""
    if add.target not in _packets("add") or _operand_index(add, node) is None:
        return False
    constants = [a for a in add.args if not isinstance(a, fx.Node)]
    if constants != [1] and constants != [1.0]:
        return False
    if add.kwargs.get("alpha", 1) != 1:
        return False
    frontier = [add]
    for _ in range(4):  # through casts and views
        following = []
        for current in frontier:
            for user in current.users:
                if user.op != "call_function":
                    continue
                if user.target in _MUL:
                    other = [a for a in user.args if isinstance(a, fx.Node) and a is not current]
                    if other and _is_rms_normalized(other[0]):
                        return True
                elif user.target in _NORMS and _operand_index(user, current) == _NORMS[user.target][0]:
                    return True
                elif user.target in _PASS_THROUGH and _operand_index(user, current) == 0:
                    following.append(user)
        frontier = following
    return False


def _derived_only_from(node: fx.Node, source: fx.Node, depth: int = 0) -> bool:
    """Whether ``node`` is ``source`` seen through views and casts only."""
    while node is not source and depth < 32:
        if node.op != "call_function" or node.target not in _PASS_THROUGH or not node.args:
            return False
        node, depth = node.args[0], depth + 1
    return node is source


def _einsum_role(subscript: str, others: set[str], output: str) -> str:
    if subscript in others:
        return "batch" if subscript in output else "in"
    return "out" if subscript in output else "?"


def _is_rms_normalized(node: fx.Node, depth: int = 0) -> bool:
    """Whether ``node`` is ``x * rsqrt(...)`` (after casts): the normalized activations of a hand-written RMS norm."""
    if depth > 4 or node.op != "call_function":
        return False
    if node.target in _MUL:
        return any(isinstance(a, fx.Node) and a.op == "call_function" and a.target in _RSQRT for a in node.args)
    if node.target in _PASS_THROUGH:
        first = node.args[0] if node.args else None
        return isinstance(first, fx.Node) and _is_rms_normalized(first, depth + 1)
    return False


def _swaps(node: fx.Node) -> bool:
    """Whether a view op exchanges the last two dimensions of its operand."""
    target = node.target
    rank = len(_shape(node.args[0])) if isinstance(node.args[0], fx.Node) else 0
    if target in _packets("t", "numpy_T", "mT", "adjoint"):
        return True
    if target in _packets("transpose", "swapaxes"):
        dims = {d % rank for d in node.args[1:3]} if rank else set()
        return rank >= 2 and dims == {rank - 2, rank - 1}
    if target in _packets("permute"):
        dims = [d % rank for d in node.args[1]] if rank else []
        return rank >= 2 and dims[-2:] == [rank - 1, rank - 2]
    return False


def _operand_index(user: fx.Node, node: fx.Node) -> int | None:
    for i, arg in enumerate(user.args):
        if arg is node or (isinstance(arg, (list, tuple)) and any(a is node for a in arg)):
            return i
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return "aten." + name.split(".")[0] if hasattr(target, "overloadpacket") else name
