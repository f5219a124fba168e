"""Exact top-k selection of scores: the function ``h`` of edge-popup.

The rule
--------
Let ``a`` be the magnitudes ``|s|`` of one layer's scores flattened in row-major order (``n`` values), or of
several layers concatenated in the order given (global scope), and ``K`` the kept count (``1 <= K <= n``).
The mask keeps exactly ``K`` entries:

* every entry whose value is larger than ``T``, the ``K``-th largest value of ``a``;
* among the entries equal to ``T``, those with the **lowest flat index** until ``K`` are kept.

This is what a stable descending sort followed by "keep the first ``K``" gives (``topk_mask_reference``), so it
matches the paper's Algorithm 1 (which sorts and keeps the top ``K``) and makes the result unique: the same
mask on every machine and device.

Non-finite scores rank by the same rule, with ``|s| = NaN`` placed **below every number** (0 included) and all
NaNs equal to each other, and ``+inf`` above every finite value as usual. So exactly ``K`` entries are always
kept: an infinite score is kept before any finite one (ties among infinities by lowest flat index), and a NaN
score only when fewer than ``K`` entries are numbers (then the NaNs with the lowest flat indices). Every path
below (the reference, ``band``, ``select`` and the compiled ``band`` of ``selection.native``) gives this same
mask, bit for bit, whatever the mix of NaN, inf and numbers, per layer and under global scope.

How it is computed
------------------
Sorting every layer at every step is what makes the reference implementation slow. Two exact strategies:

``band`` (CPU)
    Scores move little in one optimizer step, so last step's threshold is a strong hint. With a band
    ``[lo, hi)`` around it: count the entries ``>= hi`` (one comparison pass, written straight into the mask);
    if fewer than ``K`` are above the band and at least ``K`` are above ``lo``, the threshold lies in the band,
    and only the few entries inside it (typically far below 1 % of the layer) are sorted. If the band misses,
    it is widened; if that misses too, one exact ``kthvalue`` finds ``T`` and the band ``[T, next float)``
    finishes the job (for an infinite or NaN ``T``, the ``select`` computation below). The comparisons are IEEE
    float comparisons, false for NaN: a NaN is never above a band nor in one, as the rule wants. The result never
    depends on the hint; only the speed does.
``select`` (any device, no host synchronisation)
    ``T`` from a device sort of ``a`` with NaN replaced by -1 (below every magnitude), ties resolved with a
    cumulative sum over ``a == T``. Every step is a tensor operation with a fixed shape, so nothing waits for the
    device; used on CUDA and other accelerators.

Both strategies write into caller-owned boolean buffers, so the hot path allocates almost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "kept_count",
    "topk_mask_reference",
    "select_topk",
    "select_topk_native",
    "select_topk_native_many",
    "NativeGroup",
    "BandHint",
]


def kept_count(numel: int, k: float) -> int:
    """Number of entries kept out of ``numel`` for the kept fraction ``k``.

    Identical to the paper's code (``j = int((1 - k) * numel)`` entries dropped), clamped to at least one kept
    entry, so ``|kept - k * numel| < 1``.
    """
    return min(numel, max(1, numel - int((1.0 - k) * numel)))


def topk_mask_reference(a: Tensor, kept: int) -> Tensor:
    """The rule, by a stable sort: slow and obviously right. ``a`` of any shape; returns a bool mask like it."""
    flat = _nan_lowest(a.reshape(-1))
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=a.device)
    mask[order[:kept]] = True
    return mask.view(a.shape)


@dataclass
class BandHint:
    """State the ``band`` strategy carries between calls: last threshold, band half-width, a scratch buffer."""

    threshold: float
    half_width: float
    scratch: Tensor | None = None  # band: bool, padded to a multiple of 8 (word-wise ``nonzero``)


def select_topk(
    parts: list[Tensor], kept: int, masks: list[Tensor], hint: BandHint | None = None, strategy: str = "auto"
) -> BandHint | None:
    """Write the top-``kept`` mask of the concatenation of ``parts`` into ``masks``.

    Args:
        parts: 1-D non-negative float tensors (the magnitudes ``|s|``); their concatenation is ranked as one
            vector.
        kept: number of entries to keep, ``1 <= kept <= total``.
        masks: 1-D bool tensors, one per part, same sizes; overwritten.
        hint: the value this function returned last time for the same parts, or ``None``.
        strategy: ``"band"``, ``"select"`` or ``"auto"`` (``band`` on CPU, ``select`` elsewhere).

    Returns:
        The hint for the next call (``None`` for the ``select`` strategy, which needs none, and after an infinite
        or NaN threshold, which gives no band to start from).
    """
    total = sum(p.numel() for p in parts)
    if not 1 <= kept <= total:
        raise ValueError(f"kept={kept} must be between 1 and the number of scores ({total})")
    if strategy == "auto":
        strategy = "band" if parts[0].device.type == "cpu" else "select"
    if strategy == "select":
        _select_sync_free(parts, kept, masks)
        return None
    if strategy != "band":
        raise ValueError(f"unknown strategy {strategy!r}; use 'band', 'select' or 'auto'")
    if kept == total:
        for m in masks:
            m.fill_(True)
        return hint
    scratch = _scratch_for(parts, hint)
    return _band_search(
        lambda lo, hi: _band_select(parts, kept, masks, lo, hi, scratch),
        lambda: _kth_largest_exact(parts, kept),
        lambda threshold: _select_given(parts, kept, masks, threshold),
        hint,
        parts[0].dtype,
        scratch,
    )


@dataclass
class NativeGroup:
    """One selector's work for ``select_topk_native_many``: the parts ranked together (one layer, or several
    under global scope) and where to write. Every tensor is 1-D, contiguous, on the CPU: scores, weights and
    ``effective`` float32 and equal in size part by part; ``masks`` the int64 words of bit masks
    (``selection.bits.BitMask``: ``ceil(n / 64)`` words per part); ``effective``: a list, or ``None`` (not written);
    ``weights`` are read only where ``effective`` is given (``None`` allowed without it)."""

    scores: list[Tensor]
    weights: list[Tensor] | None
    masks: list[Tensor]
    effective: list[Tensor] | None
    kept: int
    hint: BandHint | None = None


def select_topk_native(
    scores: list[Tensor],
    weights: list[Tensor],
    kept: int,
    masks: list[Tensor],
    effective: list[Tensor] | None,
    hint: BandHint | None = None,
) -> BandHint | None:
    """The ``band`` strategy in C (``selection.native``) for one selector; see ``select_topk_native_many``."""
    return select_topk_native_many([NativeGroup(scores, weights, masks, effective, kept, hint)])[0]


def select_topk_native_many(groups: list[NativeGroup]) -> list[BandHint | None]:
    """The ``band`` strategy for many selectors at once, each pass one call of the compiled kernel.

    Same rule and same result per group as ``select_topk`` on ``[s.abs() for s in group.scores]``; in the same
    pass it writes, if given, ``effective[i] = weights[i] * masks[i]``.
    The kernel reads every score once (threads over chunks of all the groups' layers) and ranks each group's
    band in C; a group whose threshold left its band is tried again with a 16x wider band, then with the exact
    ``T`` (``kthvalue``), in further calls for those groups only. Returns the hint for each group's next call
    (``None`` after an infinite or NaN threshold).

    Raises:
        RuntimeError: if the compiled kernel is not available (``supermask_fx.selection.native.unavailable_reason()``).
    """
    from . import native

    kern = native.kernel()
    if kern is None:
        raise RuntimeError(f"the compiled top-k is not available: {native.unavailable_reason()}")
    for group in groups:
        total = sum(s.numel() for s in group.scores)
        if not 1 <= group.kept <= total:
            raise ValueError(f"kept={group.kept} must be between 1 and the number of scores ({total})")
    threads = torch.get_num_threads()
    hints: list[BandHint | None] = [group.hint for group in groups]
    # Per group the next band to try, in order keys (native.order_key: NaN 0, a number its bits + 1): (lo, hi,
    # tries so far). Keep-all groups: [0, 0), every key is kept.
    bands = {}
    for i, group in enumerate(groups):
        if group.kept == sum(s.numel() for s in group.scores):
            bands[i] = (0, 0, -1)
        else:
            bands[i] = _native_band(group, 0)
    while bands:
        order = list(bands)
        table, rows = [], []
        for g, i in enumerate(order):
            group, (lo, hi, _) = groups[i], bands[i]
            for p, (s, m) in enumerate(zip(group.scores, group.masks)):
                eff = w = 0
                if group.effective is not None:
                    eff, w = group.effective[p].data_ptr(), group.weights[p].data_ptr()
                table.append([s.data_ptr(), w, m.data_ptr(), eff, s.numel(), g])
            rows.append([lo, hi, group.kept, 0, 0, 0, 0])
        out = torch.tensor(rows, dtype=torch.int64)
        kern.topk(torch.tensor(table, dtype=torch.int64), out, threads)
        for i, (status, threshold_key) in zip(order, out[:, 3:5].tolist()):
            tries = bands.pop(i)[2]
            if tries < 0:
                continue  # keep-all: done, the hint stays
            if status == 1:
                previous = None if groups[i].hint is None else groups[i].hint.threshold
                hints[i] = _next_hint(native.from_order_key(threshold_key), previous, torch.float32, None)
            elif tries >= 2:  # cannot happen: every magnitude has an integer key, so [T, T + 1) holds T
                raise RuntimeError(f"supermask_fx.selection.native: the exact band missed the threshold (group {i})")
            else:
                bands[i] = _native_band(groups[i], tries + 1)
    return hints


def _native_band(group: NativeGroup, tries: int) -> tuple[int, int, int]:
    """The band of a group's try number ``tries``, in order keys: the hint's band, 16x wider, then ``[T, T + 1)``
    (``T`` the exact threshold's key: NaN's and +inf's have one too)."""
    from . import native

    hint = group.hint
    if hint is None or tries >= 2:
        threshold = native.order_key(_kth_largest_exact([s.abs() for s in group.scores], group.kept))
        return threshold, threshold + 1, 2
    half = hint.half_width * (16.0 if tries else 1.0)
    return native.order_key(hint.threshold - half), native.order_key(hint.threshold + half), tries


def _band_search(
    try_band, exact_threshold, select_by_rule, hint: BandHint | None, dtype: torch.dtype, scratch
) -> BandHint | None:
    """Try the band around last step's threshold, then a 16x wider one, then find ``T`` exactly.

    ``try_band(lo, hi)`` writes the mask and returns the kept threshold, or ``None`` if ``T`` is not in
    ``[lo, hi)``; ``exact_threshold()`` returns ``T`` (NaN when fewer than ``kept`` entries are numbers). A
    finite ``T`` is always in the band ``[T, next float)``; an infinite or NaN one is kept by
    ``select_by_rule(T)``, and no hint is returned (the next call starts from the exact threshold).
    """
    if hint is not None:
        for widen in (1.0, 16.0):
            half = hint.half_width * widen
            lo, hi = _representable(hint.threshold - half, dtype), _representable(hint.threshold + half, dtype)
            found = try_band(lo, hi)
            if found is not None:
                return _next_hint(found, hint.threshold, dtype, scratch)
    threshold = exact_threshold()
    if not math.isfinite(threshold):  # T is +inf or NaN: no float band [T, next float) holds it
        select_by_rule(threshold)
        return None
    found = try_band(threshold, _next_float(threshold, dtype))
    if found is None:  # cannot happen: [T, next float) holds T, and a finite T leaves no NaN above the band
        raise RuntimeError(
            f"supermask_fx.selection.topk: the band [T, next float) missed the threshold T = {threshold!r}"
        )
    # Keep last step's movement in the next hint: a fresh hint's band is tiny and would miss again.
    return _next_hint(found, None if hint is None else hint.threshold, dtype, scratch)


def _band_select(
    parts: list[Tensor], kept: int, masks: list[Tensor], lo: float, hi: float, scratch: Tensor
) -> float | None:
    """Keep everything ``>= hi`` plus the best entries of ``[lo, hi)``; ``None`` if ``T`` is not in the band.

    Float comparisons: a NaN is neither ``>= hi`` nor in ``[lo, hi)``, so it is never kept here (the rule ranks
    it below every number; a NaN ``T`` is in no band, and the caller then keeps NaNs by ``_select_given``)."""
    counts = []
    for p, m in zip(parts, masks):
        torch.ge(p, hi, out=m)
        counts.append(torch.count_nonzero(m))
    above = int(counts[0]) if len(counts) == 1 else int(torch.stack(counts).sum())
    if above >= kept:
        return None
    values, positions = [], []
    for p, m in zip(parts, masks):
        n = p.numel()
        band = scratch[:n]
        torch.ge(p, lo, out=band)
        band.logical_xor_(m)  # ge(lo) and not ge(hi): lo <= p < hi
        where = _flat_nonzero(scratch, n)
        values.append(p[where])
        positions.append(where)
    band_values = values[0] if len(values) == 1 else torch.cat(values)
    missing = kept - above
    if band_values.numel() < missing:
        return None
    chosen, threshold = _best_of_band(band_values, missing)
    start = 0
    for m, where in zip(masks, positions):
        m[where[chosen[start : start + where.numel()]]] = True
        start += where.numel()
    return threshold


#: Bands up to this size are ranked by a stable sort; larger ones by ``kthvalue`` and the cumulative-sum tie rule.
_SORT_BAND_LIMIT = 1 << 11


def _best_of_band(values: Tensor, count: int) -> tuple[Tensor, float]:
    """The ``count`` largest of ``values`` (given in flat order, so ties go to the lowest position) as a bool
    mask, and the smallest value kept. ``1 <= count <= values.numel()``."""
    n = values.numel()
    if n <= _SORT_BAND_LIMIT:
        order = torch.sort(values, descending=True, stable=True).indices[:count]
        chosen = torch.zeros(n, dtype=torch.bool, device=values.device)
        chosen[order] = True
        return chosen, float(values[order[-1]])
    threshold = torch.kthvalue(values, n - count + 1).values
    return _keep_with_ties(values, count, threshold), float(threshold)


def _keep_with_ties(flat: Tensor, kept: int, threshold: Tensor) -> Tensor:
    """The rule given ``T`` (the ``kept``-th largest of 1-D ``flat``, a 0-d tensor): everything above ``T``, then
    the entries equal to ``T`` with the lowest indices. Tensor operations only, so no host synchronisation."""
    above = flat > threshold
    ties = flat == threshold
    return above | (ties & (torch.cumsum(ties, 0) <= kept - above.sum()))


def _flat_nonzero(scratch: Tensor, n: int) -> Tensor:
    """Indices of the true entries of ``scratch[:n]``, found 8 at a time: ``nonzero`` on int64 words first."""
    padded = -(-n // 8) * 8
    scratch[n:padded] = False
    words = scratch[:padded].view(torch.int64)
    hit = words.nonzero().squeeze(1)
    candidates = (hit.unsqueeze(1) * 8 + torch.arange(8, device=scratch.device)).view(-1)
    return candidates[scratch[candidates]]


def _scratch_for(parts: list[Tensor], hint: BandHint | None) -> Tensor:
    need = -(-max(p.numel() for p in parts) // 8) * 8
    scratch = None if hint is None else hint.scratch
    if scratch is None or scratch.numel() < need or scratch.device != parts[0].device or scratch.dtype != torch.bool:
        scratch = torch.zeros(need, dtype=torch.bool, device=parts[0].device)
    return scratch


def _nan_lowest(flat: Tensor) -> Tensor:
    """The magnitudes with every NaN replaced by -1: below every magnitude and equal to each other, the rule's
    order (torch's sorts and ``kthvalue`` put NaN above everything). Infinities stay."""
    return flat.nan_to_num(nan=-1.0, posinf=math.inf, neginf=-math.inf)


def _kth_largest_exact(parts: list[Tensor], kept: int) -> float:
    """``T`` by the rule: the ``kept``-th largest magnitude; NaN if fewer than ``kept`` entries are numbers."""
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    nans = int(torch.isnan(flat).sum())
    if kept > flat.numel() - nans:
        return math.nan
    if nans:
        flat = _nan_lowest(flat)
    return float(torch.kthvalue(flat, flat.numel() - kept + 1).values)


def _select_given(parts: list[Tensor], kept: int, masks: list[Tensor], threshold: float) -> None:
    """The rule's mask for a known threshold ``T`` (+inf, NaN or a number)."""
    flat = _nan_lowest(parts[0] if len(parts) == 1 else torch.cat(parts))
    key = torch.tensor(-1.0 if math.isnan(threshold) else threshold, dtype=flat.dtype, device=flat.device)
    _write_parts(_keep_with_ties(flat, kept, key), masks)


def _select_sync_free(parts: list[Tensor], kept: int, masks: list[Tensor]) -> None:
    flat = _nan_lowest(parts[0] if len(parts) == 1 else torch.cat(parts))
    # T from a full sort, not torch.kthvalue: CUDA's kthvalue runs one thread block per slice (127 ms for
    # ResNet-50's layers on an H100, against 5 ms for a radix sort; docs/performance.md).
    _write_parts(_keep_with_ties(flat, kept, torch.sort(flat).values[flat.numel() - kept]), masks)


def _write_parts(keep: Tensor, masks: list[Tensor]) -> None:
    start = 0
    for m in masks:
        m.copy_(keep[start : start + m.numel()])
        start += m.numel()


def _next_hint(threshold: float, previous: float | None, dtype: torch.dtype, scratch: Tensor) -> BandHint | None:
    # Expect the threshold to move about as much as it just did; never let the band collapse to nothing.
    if not math.isfinite(threshold):
        return None  # an infinite or NaN threshold gives no band to search next time: start from the exact T
    moved = 0.0 if previous is None or not math.isfinite(previous) else abs(threshold - previous)
    floor = max(abs(threshold) * 2.0**-12, torch.finfo(dtype).tiny)
    return BandHint(threshold, max(4.0 * moved, floor), scratch)


def _representable(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, so a comparison against it means the same thing every time."""
    if math.isinf(value):
        return value
    if dtype == torch.float32:
        from .native import to_float32  # struct, not a tensor: called a few times per layer and step

        return to_float32(value)
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


def _next_float(value: float, dtype: torch.dtype) -> float:
    t = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)))
