"""Bit masks: the form in which the ``cpu`` back-end's compiled top-k writes a mask (1/8 of a bool tensor).

Kept only inside the selection back-ends: a ``LayerMask`` backed by bits applies them (``w * mask`` in one
compiled pass) or unpacks them into a bool tensor when asked; the gate and the methods never see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import native
from .kernels import compiled, masked_weight, plain, sign_bits

__all__ = ["BitMask"]


@dataclass(eq=False)
class BitMask:
    """A bool mask of ``shape`` stored one bit per entry.

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

    def apply(self, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``weight`` where the bit is set, ``0`` elsewhere (``kernels.masked_weight``'s values), into ``out`` or a
        new tensor in the weight's memory format: one compiled pass over the words for contiguous float32 CPU
        tensors, else through the unpacked bool tensor."""
        if self.shape != weight.shape:
            raise ValueError(f"a bit mask of shape {tuple(self.shape)} cannot mask a weight of {tuple(weight.shape)}")
        signs = sign_bits(weight)
        kern = native.kernel() if signs is not None and (out is None or _row_major_float(out)) else None
        if kern is not None:  # a weight held as sign bits: w * mask from two bits per entry
            bits, scale, zero_rows = signs
            out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
            kern.apply_signs(bits, scale, self.words, out, torch.get_num_threads())
            if zero_rows is not None:
                out.view(out.shape[0], -1).index_fill_(0, zero_rows, 0)
            return out
        weight = plain(weight)
        out = torch.empty_like(weight) if out is None else out
        kern = compiled(weight, out) if weight.dtype == out.dtype == torch.float32 else None
        if kern is not None:
            kern.apply_bits(weight, self.words, out, torch.get_num_threads())
            return out
        return masked_weight(weight, self.to_bool().to(weight.device), out)


def _row_major_float(out: Tensor) -> bool:
    return out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous()
