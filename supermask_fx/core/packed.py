"""Frozen weights held as one sign bit each plus one scale per layer (``PopupConfig(weight_storage="bits")``).

A signed-constant weight (``init="signed_constant"``, ``"xavier_signed_constant"``, ``"unsigned_constant"``, scaled
or not) takes two values, ``+c`` and ``-c``, with ``c`` the layer's standard deviation. ``PackedSigns`` stores it as

    w[i] = c * (2 * b[i] - 1),    b[i] = bit (i mod 8) of byte ``bits[i // 8]``,

``i`` the flat (row-major) index over the weight's shape ``S`` and ``bits`` a uint8 tensor of ``ceil(numel / 8)``
bytes: 1/32 of the float32 weight. Rows of the first dimension that hold zeros only (an embedding's
``padding_idx`` row) are listed in ``zero_rows`` and read as 0.

It is a tensor subclass (a wrapper, like torchao's quantized tensors) with the weight's shape, dtype and device,
installed as the module's Parameter (in every module tied to it: still one object), so ``state_dict`` keys,
``named_parameters`` and every reader are unchanged. An operation on it runs on the expanded weight (a transient
tensor of ``S``, freed when the operation returns; ``expanded()``), except those that need no values (``detach``,
``clone``, ``.to(device / dtype)``, ``empty_like`` and the other ``*_like`` constructors). The gated forward and
backward of ``edge_popup`` and the other methods therefore hold the packed form across the step:
``StraightThrough`` and the backward's rebuild of ``w * mask`` (``core.recompute``) save the packed tensor and
expand it when they run. An in-place write (IteRand redrawing pruned weights from the same distribution,
``load_state_dict``) packs its result again and must leave a tensor of the same two-valued form: anything else is
a ``ValueError``. Under FSDP2 (``fully_shard``) the weights are sharded as plain tensors of their values: the
shards hold 32 bits per weight again (``watch_fsdp`` warns).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..selection.kernels import compiled
from .initializers import INITIALIZERS

__all__ = ["PackedSigns", "pack_parameters", "unpack_parameters", "parameter_holders", "packable"]

_NO_VALUES = {  # constructors that read only the argument's shape, dtype and device
    torch.ops.aten.empty_like.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.ones_like.default,
    torch.ops.aten.full_like.default,
    torch.ops.aten.rand_like.default,
    torch.ops.aten.randn_like.default,
}
_BIT = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_NOT_TWO_VALUED = (
    "weight_storage='bits' holds weights of one magnitude per layer (+c or -c: init='signed_constant', "
    "'xavier_signed_constant' or 'unsigned_constant', where it is the default); this weight takes other values: "
    "popupify with weight_storage='dense' to hold weights that change"
)


class PackedSigns(Tensor):
    """A weight of shape ``S`` whose entries are ``+scale`` or ``-scale`` (0 in ``zero_rows``), one bit each.

    Attributes:
        bits: uint8, ``ceil(numel / 8)`` bytes on the weight's device (bit ``j`` of byte ``i``: entry ``8 i + j``).
        scale: the magnitude ``c`` as a Python float (the float32 value the draw wrote).
        zero_rows: indices along the first dimension whose entries are all 0.
        memory_format: the strides the tensor reports and ``expanded`` gives (contiguous, or channels-last after
            ``model.to(memory_format=torch.channels_last)``); the bits are in row-major order either way.
    """

    bits: Tensor
    scale: float
    zero_rows: tuple[int, ...]
    memory_format: torch.memory_format

    @staticmethod
    def __new__(cls, bits, scale, shape, dtype, zero_rows=(), memory_format=torch.contiguous_format):
        strides = torch.empty(tuple(shape), device="meta").contiguous(memory_format=memory_format).stride()
        return Tensor._make_wrapper_subclass(
            cls, tuple(shape), strides=strides, dtype=dtype, device=bits.device, requires_grad=False
        )

    def __init__(self, bits, scale, shape, dtype, zero_rows=(), memory_format=torch.contiguous_format) -> None:
        self.bits = bits
        self.scale = float(scale)
        self.zero_rows = tuple(int(r) for r in zero_rows)
        self.memory_format = memory_format

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"PackedSigns(shape={tuple(self.shape)}, scale={self.scale!r}, dtype={self.dtype}, device={self.device}"
            + (f", zero_rows={self.zero_rows}" if self.zero_rows else "")
            + ")"
        )

    # ------------------------------------------------------------------------------------------ the two forms

    @classmethod
    def pack(cls, weight: Tensor) -> PackedSigns:
        """The packed form of ``weight`` (any float tensor), which must hold one magnitude ``c > 0`` everywhere
        but rows of zeros; else ``ValueError``. A contiguous float32 CPU weight is packed by one compiled pass
        (``selection.native``); any other is read a block of rows at a time (about 2^20 entries) with PyTorch ops,
        so that the temporaries stay small beside the weight. The memory format (channels-last) is kept:
        ``expanded`` gives the same strides."""
        weight = weight.detach()
        if isinstance(weight, PackedSigns):
            return weight._like(weight.bits)
        if not weight.is_floating_point() or weight.dim() == 0 or weight.numel() == 0:
            raise ValueError(f"packed sign weights need a float tensor with entries, got {weight.dtype} {weight.shape}")
        kern = _compiled(weight)
        if kern is not None:  # one compiled pass, the same rule and result as the blocks below
            bits = torch.empty(math.ceil(weight.numel() / 8), dtype=torch.uint8)
            row_zero = torch.empty(weight.shape[0], dtype=torch.uint8)
            scale = kern.pack_signs(weight, bits, row_zero, torch.get_num_threads())
            if scale is None:
                raise ValueError(_NOT_TWO_VALUED)
            zero_rows = row_zero.nonzero().flatten().tolist()
            return cls(bits, scale, weight.shape, weight.dtype, zero_rows, torch.contiguous_format)
        rows = weight.reshape(weight.shape[0], -1) if weight.is_contiguous() else None
        width = weight.numel() // weight.shape[0]
        step = max(8, (1 << 20) // max(width, 1) // 8 * 8)  # rows per block: a multiple of 8, so blocks fill bytes
        bits = torch.empty(math.ceil(weight.numel() / 8), dtype=torch.uint8, device=weight.device)
        scale, zero_rows = None, []
        for first in range(0, weight.shape[0], step):
            block = rows[first : first + step] if rows is not None else weight[first : first + step].reshape(-1, width)
            zero = (block == 0).all(1)
            live = block[~zero] if bool(zero.any()) else block
            zero_rows += (zero.nonzero().flatten() + first).tolist() if live is not block else []
            if scale is None and live.numel():
                scale = float(live.reshape(-1)[0].abs())
            if scale == 0 or (scale is not None and not bool((live.abs() == scale).all())):
                raise ValueError(_NOT_TWO_VALUED)
            positive = (block > 0).reshape(-1)
            padded = torch.zeros(math.ceil(positive.numel() / 8) * 8, dtype=torch.uint8, device=weight.device)
            padded[: positive.numel()] = positive
            start = first * width // 8
            torch.sum(
                padded.view(-1, 8) * _BIT.to(weight.device),
                1,
                dtype=torch.uint8,
                out=bits[start : start + padded.numel() // 8],
            )
        return cls(bits, 1.0 if scale is None else scale, weight.shape, weight.dtype, zero_rows, _format_of(weight))

    def expanded(self) -> Tensor:
        """The weight as a plain tensor of shape ``S``, this dtype and memory format (a new tensor): one compiled
        pass for a contiguous float32 CPU weight, else a lookup of each byte's eight values."""
        signs = self.sign_bits()
        kern = _compiled(self) if signs is not None else None
        if kern is not None:
            bits, scale, zero_rows = signs
            out = torch.empty(self.shape, dtype=self.dtype)
            kern.expand_signs(bits, scale, out, torch.get_num_threads())
            if zero_rows is not None:
                out.view(self.shape[0], -1).index_fill_(0, zero_rows, 0)
            return out
        table = self._table()
        flat = table[self.bits.long()].reshape(-1)[: self.numel()]
        out = flat.view(self.shape)
        if self.zero_rows:  # an index tensor kept on the device: no copy from the host (a sync on CUDA) per call
            out.index_fill_(0, self._zero_row_index(), 0)
        if self.memory_format is not torch.contiguous_format:
            out = out.contiguous(memory_format=self.memory_format)
        return out

    def sign_bits(self) -> tuple[Tensor, float, Tensor | None] | None:
        """What a compiled pass needs to read this weight without expanding it (``selection.kernels.sign_bits``):
        ``(bits, scale, zero_rows)``, ``zero_rows`` a device index tensor of the rows held as zeros or ``None``;
        ``None`` where the expanded weight's strides are not row-major (channels-last)."""
        if self.memory_format is not torch.contiguous_format or not self.bits.is_contiguous():
            return None
        return self.bits, self.scale, self._zero_row_index() if self.zero_rows else None

    def _zero_row_index(self) -> Tensor:
        return self._cached("rows", lambda: torch.tensor(self.zero_rows, device=self.device))

    def _table(self) -> Tensor:
        """``table[b, j]``: the value of entry ``j`` of a byte ``b`` (256 x 8), cached per dtype and device."""

        def make() -> Tensor:
            signs = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) * 2 - 1
            return (signs.to(torch.float64) * self.scale).to(device=self.device, dtype=self.dtype)

        return self._cached("table", make)

    def _cached(self, name: str, make) -> Tensor:
        """A small tensor derived from the fields, kept per (name, dtype, device) until the fields change."""
        cache = self.__dict__.setdefault("_tables", {})
        key = (name, self.dtype, self.device)
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _like(self, bits: Tensor, dtype: torch.dtype | None = None, memory_format=None) -> PackedSigns:
        return PackedSigns(
            bits, self.scale, self.shape, dtype or self.dtype, self.zero_rows, memory_format or self.memory_format
        )

    # ------------------------------------------------------------------------------------------ torch protocols

    def _fields(self) -> tuple:
        return self.scale, tuple(self.shape), self.dtype, self.zero_rows, self.memory_format

    def __tensor_flatten__(self):
        return ["bits"], self._fields()

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return PackedSigns(inner["bits"], *meta)

    def __reduce_ex__(self, protocol):
        scale, shape, dtype, zero_rows, memory_format = self._fields()  # a memory format pickles as its name
        param = isinstance(self, nn.Parameter)
        return (_rebuild, (self.bits, scale, shape, dtype, zero_rows, str(memory_format), param))

    def share_memory_(self) -> PackedSigns:
        """Move the bits to shared memory (``model.share_memory()``, for ``torch.multiprocessing``): the tensor
        has no storage of its own, and ``Tensor.share_memory_`` would read one."""
        self.bits.share_memory_()
        return self

    def is_shared(self) -> bool:
        return self.bits.is_shared()

    def numpy(self, *, force: bool = False):
        """The values as a numpy array (``np.asarray``, TensorBoard's histograms): torch refuses ``numpy()`` and
        ``tolist()`` of a tensor subclass, so these two expand the weight."""
        return self.expanded().numpy(force=force)

    def tolist(self):
        return self.expanded().tolist()

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        copied = _rebuild(self.bits.clone(), *self._fields(), isinstance(self, nn.Parameter))
        memo[id(self)] = copied
        return copied

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, PackedSigns):
            if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
                return first._like(first.bits)
            if func is torch.ops.aten.clone.default:
                return first._like(first.bits.clone(), memory_format=_format_asked(first, kwargs))
            if func is torch.ops.aten._to_copy.default:
                moved = _moved(first, kwargs)
                if moved is not None:
                    return moved
            if func in _NO_VALUES:
                empty = torch.empty_strided(first.shape, first.stride(), dtype=first.dtype, device=first.device)
                return func(empty, *args[1:], **kwargs)
            if func is torch.ops.aten.copy_.default and isinstance(args[1], PackedSigns):
                return _assign(first, _moved(args[1], {"device": first.device, "dtype": first.dtype}))
        written = [
            i
            for i, arg in enumerate(func._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write and i < len(args)
        ]
        plain_args = tree_map(_expand, args)
        plain_kwargs = tree_map(_expand, kwargs)
        out = func(*plain_args, **plain_kwargs)
        for i in written:  # an in-place op or an out= argument: pack the result back
            if isinstance(args[i], PackedSigns):
                _assign(args[i], PackedSigns.pack(plain_args[i]))
                if out is plain_args[i]:
                    out = args[i]
        for name, value in kwargs.items():
            if isinstance(value, PackedSigns):
                _assign(value, PackedSigns.pack(plain_kwargs[name]))
                if out is plain_kwargs[name]:
                    out = value
        return out


def _expand(value):
    return value.expanded() if isinstance(value, PackedSigns) else value


def _moved(packed: PackedSigns, kwargs: dict) -> PackedSigns | None:
    """``packed.to(device=, dtype=)`` still packed, or ``None`` for a conversion packing cannot express."""
    dtype = kwargs.get("dtype") or packed.dtype
    if not dtype.is_floating_point or kwargs.get("layout", torch.strided) != torch.strided:
        return None
    device = kwargs.get("device") or packed.device
    return packed._like(packed.bits.to(device, copy=True), dtype, _format_asked(packed, kwargs))


def _format_asked(packed: PackedSigns, kwargs: dict) -> torch.memory_format:
    asked = kwargs.get("memory_format") or torch.preserve_format
    return packed.memory_format if asked is torch.preserve_format else asked


def _format_of(weight: Tensor) -> torch.memory_format:
    """The memory format ``weight``'s strides follow: channels-last (4-d, 5-d) or contiguous."""
    if not weight.is_contiguous():
        for candidate, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if weight.dim() == dims and weight.is_contiguous(memory_format=candidate):
                return candidate
    return torch.contiguous_format


def _assign(target: PackedSigns, source: PackedSigns) -> PackedSigns:
    """Write ``source`` into ``target`` in place (the bits tensor too, so views of it agree)."""
    if source.shape != target.shape:
        raise ValueError(f"cannot write a {tuple(source.shape)} weight into a packed {tuple(target.shape)} one")
    target.bits.copy_(source.bits)
    target.scale = source.scale
    target.zero_rows = source.zero_rows
    target.__dict__.pop("_tables", None)
    return target


def _rebuild(bits, scale, shape, dtype, zero_rows, memory_format, param) -> Tensor:
    if isinstance(memory_format, str):  # "torch.channels_last"
        memory_format = getattr(torch, memory_format.removeprefix("torch."))
    packed = PackedSigns(bits, scale, shape, dtype, zero_rows, memory_format)
    return nn.Parameter(packed, requires_grad=False) if param else packed


def packable(init: str) -> bool:
    """Whether weights drawn from ``init`` take one magnitude per layer (what ``weight_storage="bits"`` holds)."""
    return INITIALIZERS.get(init, ("",))[0] in ("signed_constant", "unsigned_constant")


def pack_parameters(model: nn.Module, params, holders: dict | None = None) -> None:
    """Replace each of ``params`` (frozen weights of ``model``) by a ``PackedSigns`` Parameter of the same values, in
    every module of ``model`` that holds it (tied weights stay one object); a ``ValueError`` for a weight that
    takes more than one magnitude. The float tensors are freed unless something else holds them. ``holders``:
    ``parameter_holders(model)``, to replace layer by layer without walking the model each time."""
    _replace(model, params, lambda p: nn.Parameter(PackedSigns.pack(p), requires_grad=p.requires_grad), holders)


def unpack_parameters(model: nn.Module, params) -> None:
    """Replace each packed one of ``params`` by a plain Parameter of its values (expanded) in every module of
    ``model`` that holds it: weights about to take other values (retraining a subnetwork, ``materialize``)."""
    packed = [p for p in params if isinstance(p, PackedSigns)]
    _replace(model, packed, lambda p: nn.Parameter(p.expanded(), requires_grad=p.requires_grad))


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """``{id(parameter): [(module, name), ...]}``: every module entry that holds each parameter of ``model``."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, held in module._parameters.items():
            if held is not None:
                out.setdefault(id(held), []).append((module, name))
    return out


def _replace(model: nn.Module, params, make, holders: dict | None = None) -> None:
    params = list(params)
    if not params:
        return
    holders = parameter_holders(model) if holders is None else holders
    for param in params:
        new = make(param)
        entries = holders.pop(id(param), [])
        for module, name in entries:
            module._parameters[name] = new
        holders[id(new)] = entries


def _compiled(tensor: Tensor):
    """The compiled passes for a contiguous float32 CPU tensor (``selection.kernels.compiled``), else ``None``."""
    return compiled(tensor) if tensor.dtype == torch.float32 else None
