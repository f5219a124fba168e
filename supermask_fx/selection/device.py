"""The ``device`` back-end: every layer's top-k at once, in a fixed number of tensor operations, no host sync.

Built for accelerators (one step of a ResNet-50 selects 54 layers; launching sorts layer by layer, and waiting on
the host for thresholds, costs more than the work), exact by the same rule as ``selection.topk`` and testable
on the CPU, where it gives bit-identical masks.

**The rule, restated as integer keys.** Each magnitude ``a = |s|`` gets an order key: ``0`` for NaN, else the bits
of ``float32(a)`` plus one (non-negative floats order like their bit patterns; +inf is the largest). Within each
*segment* (a layer, a stack's matrix, or all layers of a global scope) the mask keeps the ``K`` largest keys, ties
at the threshold key by lowest flat index (what a stable descending sort keeps).

**How.** All segments' keys lie in one buffer (``torch.cat`` of the score tensors: one launch). The threshold key
``T`` of every segment is found by a radix select over the key's 32 bits, 8 bits a pass: per pass, one
``scatter_add_`` builds a 256-bin histogram per segment of the keys that still match the segment's prefix (fixed
shape ``segments x 256``, non-matching keys go to a spare bin), a reversed cumulative sum per segment picks the
digit where the count of larger keys reaches ``K``, and prefix and remaining count are updated. Then one pass
writes ``key > T`` or ``key == T`` and tie rank (a cumulative sum of ``key == T`` minus its value at the segment's
start) ``<= remaining``. Every shape depends only on the layer sizes, never on the data: no ``.item()``, no
``nonzero``, so a step can be captured in a CUDA graph. About 60 tensor operations whatever the number of layers.

**The plan** (``refresh``): for a batch of selectors (every peer of a ``popupify`` call on the device) the layout and
one bool buffer holding every mask are built once and kept; each ``LayerMask`` is a view of that buffer, so a
refresh writes all masks in one operation and allocates nothing new.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Segments", "order_keys", "segmented_topk", "refresh"]

_BINS = 256
_SHIFTS = (24, 16, 8, 0)


@dataclass
class Segments:
    """The fixed layout of a selection: ``sizes[i]`` entries per segment, in buffer order, ``kept[i]`` kept.

    Built once per layout (``Segments.build``) and reused every step; its index tensors live on ``device``."""

    sizes: list[int]
    kept_list: list[int]
    segment: Tensor  # (N,) int32: segment of each entry
    base_index: Tensor  # (S,) int64: flat index of each segment's first entry
    kept: Tensor  # (S,) int64
    offsets: Tensor  # (S,) int64: segment * 256, for the histogram's flat index

    @classmethod
    def build(cls, sizes: list[int], kept: list[int], device: torch.device) -> Segments:
        if len(sizes) != len(kept) or not sizes:
            raise ValueError("one kept count per segment, at least one segment")
        for n, k in zip(sizes, kept):
            if not 1 <= k <= n:
                raise ValueError(f"kept={k} must be between 1 and the segment's size ({n})")
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        starts = torch.cumsum(sizes_t, 0) - sizes_t
        segment = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t, output_size=sum(sizes))
        return cls(
            list(sizes),
            list(kept),
            segment.to(device, torch.int32),
            starts.to(device),
            torch.tensor(kept, dtype=torch.int64, device=device),
            (torch.arange(len(sizes), dtype=torch.int64) * _BINS).to(device),
        )

    @property
    def total(self) -> int:
        return sum(self.sizes)


def order_keys(magnitudes: Tensor) -> Tensor:
    """int32 order keys of non-negative magnitudes (any float dtype): NaN -> 0, else float32 bits + 1 (at most
    ``0x7f800001``, +inf's: every key fits in 31 bits)."""
    a = magnitudes.float()
    bits = a.view(torch.int32) + 1
    return torch.where(torch.isnan(a), torch.zeros_like(bits), bits)


def segmented_topk(keys: Tensor, segments: Segments, out: Tensor | None = None) -> Tensor:
    """The bool mask (``keys``' shape, 1-D) keeping in each segment its ``kept`` largest keys, ties by lowest index.

    ``keys``: 1-D int32 order keys (``order_keys``), the segments one after the other. Memory: a few int32 and one
    int64 temporary of the keys' length (the histogram index).
    """
    if keys.dim() != 1 or keys.numel() != segments.total:
        raise ValueError(f"keys must be 1-D with {segments.total} entries, got shape {tuple(keys.shape)}")
    seg = segments.segment
    count = len(segments.sizes)
    spare = count * _BINS
    prefix = torch.zeros(count, dtype=torch.int32, device=keys.device)
    remaining = segments.kept.clone()
    ones = torch.ones(keys.shape, dtype=torch.int64, device=keys.device)
    histogram = torch.empty(spare + 1, dtype=torch.int64, device=keys.device)
    top = torch.full((count, 1), _BINS - 1, dtype=torch.int64, device=keys.device)
    for shift in _SHIFTS:
        digit = (keys >> shift) & (_BINS - 1)
        bins = segments.offsets[seg] + digit  # int64 (offsets are): scatter_add_ wants an int64 index
        if shift != _SHIFTS[0]:
            matches = (keys >> (shift + 8)) == (prefix >> (shift + 8))[seg]
            bins = torch.where(matches, bins, spare)
        histogram.zero_().scatter_add_(0, bins, ones)
        counts = histogram[:spare].view(count, _BINS)
        at_least = counts.flip(1).cumsum(1).flip(1)  # [s, d]: keys of this prefix with digit >= d
        chosen = (at_least >= remaining[:, None]).sum(1, keepdim=True) - 1  # the largest d reaching K
        above = torch.where(chosen < top, at_least.gather(1, (chosen + 1).clamp(max=_BINS - 1)), 0)
        remaining = remaining - above.squeeze(1)
        prefix = prefix | (chosen.squeeze(1).to(torch.int32) << shift)
    threshold = prefix[seg]
    ties = keys == threshold
    running = torch.cumsum(ties, 0)
    before = torch.cat([running.new_zeros(1), running])[segments.base_index]  # ties before each segment
    keep = (keys > threshold) | (ties & (running - before[seg] <= remaining[seg]))
    if out is not None:
        out.copy_(keep)
        return out
    return keep


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def refresh(selectors: list, effective: bool) -> None:
    """Select the masks of every selector of the batch in one ``segmented_topk`` (see the module docstring, "the
    plan"); with ``effective``, also each member's ``w * mask``."""
    members = [(scores, weight, mask) for selector in selectors for scores, weight, mask in selector.tensors()]
    scores = [s for s, _, _ in members]
    signature = tuple((id(selector), len(selector.members), selector.kept) for selector in selectors) + tuple(
        (tuple(s.shape), s.device) for s in scores
    )
    plan = _PLANS.get(selectors[0])
    if plan is None or plan[0] != signature:
        segments = [segment for selector in selectors for segment in selector.segments()]
        layout = Segments.build([size for size, _ in segments], [kept for _, kept in segments], scores[0].device)
        buffer = torch.empty(layout.total, dtype=torch.bool, device=scores[0].device)
        views, offset = [], 0
        for s in scores:
            views.append(buffer[offset : offset + s.numel()].view(s.shape))
            offset += s.numel()
        plan = (signature, layout, buffer, views)
        _PLANS[selectors[0]] = plan
    _, layout, buffer, views = plan
    keys = order_keys(torch.cat([s.reshape(-1) for s in scores]).abs_())
    segmented_topk(keys, layout, out=buffer)
    for (_, weight, mask), view in zip(members, views):
        mask.hold_view(view)
        mask.hold_effective(weight, effective)
    if effective:
        for selector in selectors:
            selector.fill_effective()
