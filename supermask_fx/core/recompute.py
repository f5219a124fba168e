"""Rebuild the effective weight in the backward instead of keeping it from the forward.

A training forward of a gated ``nn.Linear`` / ``nn.Conv{1,2,3}d`` builds ``w_eff = w * mask`` (as large as the
weight) and the matmul or convolution saves it for its backward. Kept from every layer's forward until its
backward, these copies make the backward's memory peak hold one more copy of all the model's weights. Inside
such a forward a pair of saved-tensor hooks stores, for ``w_eff`` (or a view of it, ``w_eff.t()`` in
``F.linear``), a recipe instead: the frozen weight and the layer's mask (a ``selection.LayerMask``), which its
selection back-end keeps anyway (on the compiled CPU path as one bit per weight). The backward rebuilds
``w * mask`` (one elementwise pass, ``LayerMask.apply``) when it needs it. Values are identical, and ``w_eff`` is
freed as soon as the forward returns.

Saved-tensor hooks switch off autograd's check that a saved tensor was not modified in place; the hooks do that
check themselves for every other tensor the forward saves (``x``, the scores), and the recipe checks that the
mask did not change between the forward and the backward (its ``key``: the version counters it was selected
from). They stay out of the way of any other saved-tensor hooks (``torch.utils.checkpoint``, CPU offloading: those
see every tensor as before), of ``torch.compile``, and of every module whose forward is not exactly
``nn.Linear``'s or ``nn.Conv{1,2,3}d``'s (those save only their inputs, so holding them here makes no reference
cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

# Set by ``gate.gate_parameter`` in a gated module's ``__dict__``: True when one of its gates was popupified with
# ``rebuild_effective=False`` (its forward then runs without the hooks and autograd keeps ``w * mask``).
KEEPS_EFFECTIVE = "_supermask_keeps_effective"

# Forwards that save only their inputs (x, the weight, the bias): holding what they save makes no cycle.
_FORWARDS = {cls.forward for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)}


def supports(base: type) -> bool:
    """Whether gated modules of class ``base`` rebuild their effective weight in the backward."""
    return base.forward in _FORWARDS


@dataclass
class _Recipe:
    """How to rebuild a saved ``w_eff`` (or a view of it): ``mask.apply(weight)`` as of ``key``."""

    weight: Tensor
    version: int
    mask: object  # a selection.LayerMask: ``apply(weight)`` and ``key``
    key: object
    name: str
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class RecomputeEffective:
    """Context of one training forward of a gated module (see the module docstring)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.sources: dict[int, tuple[Tensor, object, str]] = {}  # storage of a w_eff -> (weight, mask, name)
        self.hooks = saved_tensors_hooks(self.pack, self.unpack)

    @staticmethod
    def wanted() -> bool:
        return torch.is_grad_enabled() and not compiling() and not _other_hooks()

    def __enter__(self) -> RecomputeEffective:
        self.module.__dict__["_supermask_recompute"] = self
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)
        self.module.__dict__.pop("_supermask_recompute", None)

    def register(self, effective: Tensor, weight: Tensor, mask, name: str) -> None:
        """Called by the method that built ``effective = mask.apply(weight)`` for this forward (``name``: the
        gated weight's, for errors)."""
        self.sources[effective.untyped_storage().data_ptr()] = (weight, mask, name)

    def pack(self, t: Tensor):
        try:
            source = self.sources.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage (sparse, subclasses)
            source = None
        if source is None:
            return t, t._version
        weight, mask, name = source
        return _Recipe(weight, weight._version, mask, mask.key, name, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(packed) -> Tensor:
        if isinstance(packed, _Recipe):
            weight, mask = packed.weight, packed.mask
            if mask.key != packed.key or weight._version != packed.version:
                raise RuntimeError(
                    f"supermask_fx: the mask or weight of {packed.name} changed between a forward and its backward "
                    "(an optimizer step or a load in between?): call backward before changing scores or weights"
                )
            with torch.no_grad():
                rebuilt = mask.apply(weight)
            return rebuilt.as_strided(packed.size, packed.stride, packed.offset)
        t, version = packed
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"a {tuple(t.shape)} tensor saved by a gated layer is at version {t._version}, expected {version}"
            )
        return t


_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)  # torch >= 2.3 has it


def compiling() -> bool:
    """Whether ``torch.compile`` (dynamo) is tracing the calling code (checked on every gated weight read)."""
    return _is_compiling()


def _other_hooks() -> bool:
    """Whether another pair of saved-tensor hooks is active (they must see every tensor: stand aside)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True  # cannot tell on this torch version: keep w_eff as autograd would
    try:
        return top(False) is not None
    except TypeError:  # older signature without ``ignore_is_tracing``
        return top() is not None


def gated_forward(base: type):
    """``base.forward`` run inside ``RecomputeEffective`` when training (see ``supports``), unless a gate of the
    module was popupified with ``rebuild_effective=False``."""
    forward = base.forward

    def forward_recomputing(self, *args, **kwargs):
        if not RecomputeEffective.wanted() or self.__dict__.get(KEEPS_EFFECTIVE, False):
            return forward(self, *args, **kwargs)
        with RecomputeEffective(self):
            return forward(self, *args, **kwargs)

    forward_recomputing.__doc__ = forward.__doc__
    forward_recomputing.__wrapped__ = forward
    return forward_recomputing
