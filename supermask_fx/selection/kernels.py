"""The elementwise passes of edge-popup's training step: compiled on the CPU, PyTorch ops elsewhere.

Both give the values PyTorch's ops give (tests/test_native.py); the compiled pass runs for contiguous float32
CPU tensors when ``supermask_fx.selection.native`` is available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


def plain(tensor: Tensor) -> Tensor:
    """``tensor`` as a plain tensor: one that stores its values in another form (``core.packed.PackedSigns``: sign
    bits and a scale) gives them expanded (a transient tensor of its shape and dtype), any other is returned as is."""
    expand = getattr(type(tensor), "expanded", None)
    return expand(tensor) if expand is not None else tensor


def sign_bits(tensor: Tensor) -> tuple[Tensor, float, Tensor | None] | None:
    """``(bits, scale, zero_rows)`` of a float32 CPU tensor held as sign bits and one magnitude
    (``core.packed.PackedSigns.sign_bits``: entry ``i`` is ``+scale`` where bit ``i % 8`` of byte ``bits[i // 8]``
    is set, else ``-scale``, and 0 in the rows ``zero_rows`` lists), which the compiled passes read without
    expanding it; ``None`` for any other tensor."""
    read = getattr(type(tensor), "sign_bits", None)
    if read is None or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        return None
    return read(tensor)


def compiled(*tensors: Tensor):
    """The compiled kernel if every tensor is a contiguous CPU tensor of the first one's shape, else ``None``."""
    first = tensors[0]
    if first.device.type != "cpu" or not all(t.is_contiguous() and t.shape == first.shape for t in tensors):
        return None
    return native.kernel()


def masked_weight(weight: Tensor, mask: Tensor, out: Tensor | None = None) -> Tensor:
    """``weight`` where ``mask`` (bool) is set, ``0`` elsewhere (a dropped weight is gone, even a NaN or infinite
    one), into ``out`` or a new tensor in the weight's memory format. A float ``mask`` (a fixed mask buffer a user
    registered as float) multiplies."""
    weight = plain(weight)
    out = torch.empty_like(weight) if out is None else out
    if mask.dtype != torch.bool:
        return torch.mul(weight, mask, out=out)
    kern = compiled(weight, mask, out) if weight.dtype == out.dtype == torch.float32 else None
    if kern is not None:
        kern.apply_mask(weight, mask, out, torch.get_num_threads())
        return out
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device), out=out)


def buffer_like(buffer: Tensor | None, weight: Tensor) -> Tensor:
    """``buffer`` if it can hold ``weight * mask`` as is (shape, strides, i.e. memory format such as channels-last,
    dtype and device all the weight's), else a new uninitialised tensor like ``weight``."""
    if (
        buffer is None
        or buffer.shape != weight.shape
        or buffer.stride() != weight.stride()
        or buffer.dtype != weight.dtype
        or buffer.device != weight.device
    ):
        return torch.empty_like(weight)  # same memory format (channels-last convs stay fast)
    return buffer


def straight_through_grad(grad: Tensor, scores: Tensor, weight: Tensor) -> Tensor:
    """``grad * w * sign(s)``, shaped like ``scores``: one compiled pass, or three PyTorch ops (the same values:
    ``w * sign(s)`` is exact, so each entry is one rounded product). A weight held as sign bits is read as bits."""
    signs = sign_bits(weight)
    kern = compiled(grad, scores) if signs is not None and grad.dtype == scores.dtype == torch.float32 else None
    if kern is not None and grad.shape == weight.shape:
        bits, scale, zero_rows = signs
        out = torch.empty_like(scores)
        kern.straight_through_signs(grad, scores, bits, scale, out, torch.get_num_threads())
        if zero_rows is not None:  # entries there are 0: the same values as the float weight's pass gives
            rows = grad.view(grad.shape[0], -1), scores.view(grad.shape[0], -1)
            g, s = (t.index_select(0, zero_rows) for t in rows)
            fixed = torch.empty_like(g)
            kern.straight_through(g, s, torch.zeros_like(g), fixed, torch.get_num_threads())
            out.view(grad.shape[0], -1).index_copy_(0, zero_rows, fixed)
        return out
    weight = plain(weight)
    same = all(t.dtype == torch.float32 for t in (grad, scores, weight))
    kern = compiled(grad, scores, weight) if same else None
    if kern is not None:
        out = torch.empty_like(scores)
        kern.straight_through(grad, scores, weight, out, torch.get_num_threads())
        return out
    return torch.sign(scores).mul_(weight).mul_(grad)
