"""The mask of one layer, as a selection back-end hands it to the gate and the methods.

A ``LayerMask`` answers the three questions the rest of the library asks of a top-k mask, whatever form its
back-end wrote it in: the mask as a bool tensor shaped like the weight (``tensor``), the weight times the mask
(``apply``, and the cached ``effective`` for reads without autograd), and what it was computed from (``key``: the
autograd version counters of the layer's scores and weights and those of the layers ranked with it). Only the
back-ends (``selection.reference``, ``selection.cpu``, ``selection.device``) write it: as a bool tensor, as a view
of the one buffer that holds a whole batch's masks (``device``), or as one bit per weight (the compiled ``cpu``
pass, ``selection.bits``), unpacked only when the bool tensor is asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bits import BitMask
from .kernels import buffer_like, masked_weight

__all__ = ["LayerMask"]


class LayerMask:
    """One member's mask in its ``TopKSelector``.

    Storage (written by the back-ends, read by nobody else): ``bool_mask`` (a bool tensor shaped like the weight,
    or ``None``), ``bits`` (a ``BitMask``, or ``None``; when set it is the current form and ``bool_mask``, if any,
    its unpacked copy), ``effective_buffer`` (``w * mask``, kept only between reads without autograd).
    """

    def __init__(self, selector) -> None:
        self.selector = selector
        self.bool_mask: Tensor | None = None
        self.bits: BitMask | None = None
        self.effective_buffer: Tensor | None = None
        self.member_key = None  # set by a back-end that writes this member alone (``selection.sharded``)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "bool_mask": None, "bits": None, "effective_buffer": None}

    # ------------------------------------------------------------------------------------- what callers use

    def current(self) -> LayerMask:
        """This mask, selected again first if the scores or weights of its selector changed."""
        self.selector.refresh(effective=False)
        return self

    def effective(self) -> Tensor:
        """The cached ``w * mask`` (for reads without autograd: evaluation, inference), current."""
        self.selector.refresh(effective=True)
        return self.effective_buffer

    @property
    def key(self):
        """What the mask was computed from: its selector's key (``None`` before the first selection), or, where a
        back-end wrote this member's mask alone (``selection.sharded``: the global top-k under FSDP2, whose selector
        key changes as FSDP gathers other layers), what this member's mask was written from."""
        return self.member_key if self.member_key is not None else self.selector.key

    def tensor(self, cache: bool = True) -> Tensor:
        """The mask as a bool tensor shaped like the weight. From bits it is unpacked, and with ``cache`` kept until
        the next selection (which drops it)."""
        if self.bits is not None and self.bool_mask is None:
            unpacked = self.bits.to_bool()
            if not cache:
                return unpacked
            self.bool_mask = unpacked
        return self.bool_mask

    def apply(self, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``weight * mask`` (a dropped weight is 0, even a NaN one) into ``out`` or a new tensor in the weight's
        memory format: one compiled pass from bits or bools where it applies."""
        if self.bits is not None:
            return self.bits.apply(weight, out)
        return masked_weight(weight, self.bool_mask, out)

    def clear(self) -> None:
        """Drop the storage (and make the selector select again at the next read)."""
        self.bool_mask = self.bits = self.effective_buffer = self.member_key = None
        self.selector.invalidate()

    # ------------------------------------------------------------------------------------- for the back-ends

    def hold_bool(self, weight: Tensor, effective: bool) -> None:
        """Make a bool tensor the mask's form (allocated once, again after a shape or device change; bits are
        dropped) and, with ``effective``, allocate the ``w * mask`` buffer; without it, release that buffer."""
        mask = self.bool_mask
        if self.bits is not None or mask is None or mask.shape != weight.shape or mask.device != weight.device:
            self.bool_mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
            self.bits = None
            self.effective_buffer = None
        self.hold_effective(weight, effective)

    def hold_bits(self, weight: Tensor, effective: bool) -> None:
        """Make bits the mask's form (the compiled top-k is about to write them; the unpacked copy is dropped)
        and, with ``effective``, allocate the ``w * mask`` buffer; without it, release that buffer."""
        if self.bits is None or self.bits.shape != weight.shape:
            self.bits = BitMask.empty(weight.shape)
        self.bool_mask = None
        self.hold_effective(weight, effective)

    def hold_view(self, view: Tensor) -> None:
        """Make ``view`` (a bool tensor the back-end writes, e.g. part of a batch's buffer) the mask's form."""
        self.bool_mask, self.bits = view, None

    def hold_effective(self, weight: Tensor, effective: bool) -> None:
        """With ``effective``, the ``w * mask`` buffer in the weight's memory format; without, none."""
        self.effective_buffer = buffer_like(self.effective_buffer, weight) if effective else None
