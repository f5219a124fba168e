"""The elementwise passes of edge-popup's training step: compiled on the CPU, PyTorch ops elsewhere.

Both give the values PyTorch's ops give (tests/test_native.py); the compiled pass runs for contiguous float32
CPU tensors when ``supermask_fx.native`` is available.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native


@dataclass(eq=False)
class BitMask:
    """A bool mask stored one bit per entry, as the compiled CPU top-k writes it (1/8 of a bool tensor's memory).

    Entry ``i`` (row-major over ``shape``) is bit ``i % 64`` of ``words[i // 64]``: ``ceil(numel / 64)`` int64
    words on the CPU, the bits past ``numel`` zero.
    """

    words: Tensor
    shape: torch.Size

    @classmethod
    def empty(cls, shape: torch.Size) -> BitMask:
        """Uninitialised words for a mask of ``shape`` (the compiled top-k writes every word)."""
        return cls(torch.empty(-(-shape.numel() // 64), dtype=torch.int64), torch.Size(shape))

    def to_bool(self, out: Tensor | None = None) -> Tensor:
        """The bool tensor of ``shape`` (into ``out``, contiguous, if given)."""
        out = torch.empty(self.shape, dtype=torch.bool) if out is None else out
        kern = native.kernel()
        if kern is not None:
            kern.unpack_bits(self.words, out, torch.get_num_threads())
            return out
        bits = (self.words.unsqueeze(1) >> torch.arange(64)) & 1
        return out.copy_(bits.view(-1)[: out.numel()].view(self.shape))


def _compiled(*tensors: Tensor):
    """The compiled kernel if every tensor is a contiguous CPU tensor of the first one's shape, else ``None``."""
    first = tensors[0]
    if first.device.type != "cpu" or not all(t.is_contiguous() and t.shape == first.shape for t in tensors):
        return None
    return native.kernel()


def masked_weight(weight: Tensor, mask: Tensor | BitMask, out: Tensor | None = None) -> Tensor:
    """``weight`` where ``mask`` (bool, or a ``BitMask``) is set, ``0`` elsewhere (a dropped weight is gone, even a
    NaN or infinite one), into ``out`` or a new tensor in the weight's memory format."""
    out = torch.empty_like(weight) if out is None else out
    if isinstance(mask, BitMask):
        if mask.shape != weight.shape:
            raise ValueError(f"a bit mask of shape {tuple(mask.shape)} cannot mask a weight of {tuple(weight.shape)}")
        kern = _compiled(weight, out) if weight.dtype == out.dtype == torch.float32 else None
        if kern is not None:
            kern.apply_bits(weight, mask.words, out, torch.get_num_threads())
            return out
        mask = mask.to_bool().to(weight.device)
    if mask.dtype != torch.bool:  # e.g. a fixed mask buffer a user registered as float: multiply as before
        return torch.mul(weight, mask, out=out)
    kern = _compiled(weight, mask, out) if weight.dtype == out.dtype == torch.float32 else None
    if kern is not None:
        kern.apply_mask(weight, mask, out, torch.get_num_threads())
        return out
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device), out=out)


def straight_through_grad(grad: Tensor, scores: Tensor, weight: Tensor) -> Tensor:
    """``grad * w * sign(s)``, shaped like ``scores``: one compiled pass, or three PyTorch ops (the same values:
    ``w * sign(s)`` is exact, so each entry is one rounded product)."""
    same = all(t.dtype == torch.float32 for t in (grad, scores, weight))
    kern = _compiled(grad, scores, weight) if same else None
    if kern is not None:
        out = torch.empty_like(scores)
        kern.straight_through(grad, scores, weight, out, torch.get_num_threads())
        return out
    return torch.sign(scores).mul_(weight).mul_(grad)
