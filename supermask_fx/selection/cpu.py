"""The ``cpu`` back-end: the exact ``band`` strategy of ``selection.topk`` (last step's threshold as a hint).

Two paths, the same masks:

* compiled (``selection.native``; contiguous float32 CPU tensors, strategy ``auto`` or ``native``, no expert
  blocks): every stale selector of a ``popupify`` call in one kernel call (``topk.select_topk_native_many``), which
  writes each mask as bits (``selection.bits``: 1/8 of a bool tensor, what the backward's rebuild of ``w * mask``
  reads) and, for reads without autograd, ``w * mask`` in the same pass;
* PyTorch (``topk.select_topk``) otherwise, one selector at a time, into bool masks; with ``effective`` the
  ``w * mask`` buffer doubles as scratch for ``|s|``.

The hint (``topk.BandHint``, or a list of them, one per expert block) lives on the selector between calls; it only
changes the speed, never the mask.
"""

from __future__ import annotations

import torch

from . import native
from .backend import is_shard
from .kernels import sign_bits
from .topk import NativeGroup, select_topk, select_topk_native_many

__all__ = ["native_fits", "refresh_native", "refresh_torch"]


def native_fits(selector, as_peer: bool = False) -> bool:
    """Whether the compiled pass applies to ``selector``: strategy ``auto`` or ``native``, no expert blocks, float32
    contiguous CPU tensors. ``as_peer``: refreshed ahead of its own read: never raise (its own read will, for
    ``strategy="native"``), and not when a member's mask is fixed (its gate reads that instead)."""
    if selector.strategy not in ("auto", "native") or selector.blocks > 1:
        return False
    if as_peer and any(member.frozen() for member in selector.members):
        return False
    fits = all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32 and not is_shard(t)
        for scores, weight, _ in selector.tensors()
        for t in (scores, weight)
    )
    if fits and native.kernel() is not None:
        return True
    if selector.strategy == "native" and not as_peer:
        why = native.unavailable_reason() or "it needs contiguous float32 scores and weights on the CPU"
        raise RuntimeError(f"strategy='native' cannot be used: {why}; use strategy='auto'")
    return False


def refresh_native(selectors: list, effective: bool) -> None:
    """Refresh ``selectors`` (each ``native_fits``) in one call of the compiled kernel: masks as bits and, with
    ``effective``, ``w * mask``."""
    for selector in selectors:
        selector.hold(effective, bits=True)
    # A weight held as sign bits is not expanded for the pass: its ``w * mask`` is written from the bits after.
    packed = [effective and any(sign_bits(w) is not None for _, w, _ in one.tensors()) for one in selectors]
    groups = [_group(selector, effective and not later) for selector, later in zip(selectors, packed)]
    hints = select_topk_native_many(groups)
    for selector, hint, later in zip(selectors, hints, packed):
        selector.hint = hint
        if later:
            selector.fill_effective()


def _group(selector, effective: bool) -> NativeGroup:
    scores, weights, masks = zip(*selector.tensors())
    return NativeGroup(
        [s.view(-1) for s in scores],
        [w.view(-1) for w in weights] if effective else None,
        [m.bits.words for m in masks],
        [m.effective_buffer.view(-1) for m in masks] if effective else None,
        selector.kept,
        selector.hint,
    )


def refresh_torch(selector, effective: bool) -> None:
    """The band strategy in PyTorch (``topk.select_topk``) into bool masks; with ``effective``, ``w * mask``."""
    selector.hold(effective)
    parts, masks = [], []
    for scores, _, mask in selector.tensors():
        buffer = mask.effective_buffer if effective else None
        if buffer is not None and scores.dtype == buffer.dtype and scores.is_contiguous() and buffer.is_contiguous():
            magnitudes = torch.abs(scores, out=buffer)  # the effective-weight buffer as scratch for |s|
        else:  # no buffer, channels-last or mixed dtypes: rank in row-major order all the same
            magnitudes = scores.abs().contiguous()
        parts.append(magnitudes.view(-1))
        masks.append(mask.bool_mask.view(-1))
    if selector.blocks > 1:  # one member: each of its matrices is ranked on its own
        hints = selector.hint if isinstance(selector.hint, list) else [None] * selector.blocks
        chunks = zip(parts[0].view(selector.blocks, -1), masks[0].view(selector.blocks, -1), hints)
        selector.hint = [select_topk([a], selector.kept, [m], h, selector.strategy) for a, m, h in chunks]
    else:
        selector.hint = select_topk(parts, selector.kept, masks, selector.hint, selector.strategy)
    if effective:
        selector.fill_effective()
