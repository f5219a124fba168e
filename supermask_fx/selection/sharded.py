"""The global top-k (``scope="global"``) when FSDP2 holds the ranked layers sharded across processes.

Each process holds, of every member (layer) ranked together, its own shard: FSDP2 splits a parameter along dim 0
as ``torch.chunk`` does (a ``DTensor`` between forwards; while a layer runs, the whole tensor, of which this
process's shard is ``chunk(world)[rank]``). The mask keeps the ``kept`` largest ``|s|`` of all members together,
ties by lowest index in the concatenation (members in order, each row-major), exactly as the other back-ends,
computed without gathering any scores:

1. **The threshold.** With ``key = order_keys(|s|)`` (31-bit integers that order like the magnitudes), a radix
   select over 8-bit digits, most significant first: each process histograms the digit of its shards' keys that
   still match the prefix found so far (256 bins), the histograms are summed across processes (``all_reduce``, 4
   rounds), and the digit where the count from the top reaches the number still needed is fixed. The result is the
   exact ``kept``-th largest key ``T`` and ``need``, how many of the keys equal to ``T`` are kept.
2. **The ties.** Each process counts its keys equal to ``T`` per member; the counts are gathered (``all_gather``:
   ``world x members`` integers). Within a member, process ``r``'s shard comes before process ``r + 1``'s in
   row-major order, so the kept ties are the first ``need`` in the order (member, process): member ``m`` keeps the
   first ``allowance[m]`` of its own ties.
3. **The mask** of a member whose whole tensor is at hand (the layer FSDP gathered for its forward):
   ``key > T or (key == T and the tie is among the member's first allowance[m])``.

Every process calls the same collectives in the same order (each runs the same forwards), and ends with the same
``T`` and allowances. Members held as shards get no mask here: theirs is computed when FSDP gathers them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .backend import is_shard, version_key
from .device import order_keys

__all__ = ["refresh", "local_shard", "threshold_of", "allowances"]

DIGIT = 8


def local_shard(t: Tensor) -> Tensor:
    """This process's shard of ``t``: a ``DTensor``'s local part (sharded along dim 0), or ``chunk(world)[rank]`` of a
    whole tensor (what FSDP2 holds of it between forwards)."""
    if is_shard(t):
        placements = getattr(t, "placements", ())
        if any(type(p).__name__ != "Shard" or getattr(p, "dim", 0) != 0 for p in placements):
            raise ValueError(
                f"scope='global' under FSDP needs parameters sharded along dim 0 (FSDP2's default), got {placements}"
            )
        return t.to_local()
    pieces = t.chunk(dist.get_world_size(), dim=0) if t.dim() else (t,)
    rank = dist.get_rank()
    return pieces[rank] if rank < len(pieces) else t[:0]


def threshold_of(keys: Tensor, kept: int, group=None) -> tuple[int, int]:
    """``(T, need)``: the ``kept``-th largest key over every process's ``keys`` (1-D int64, this process's) and how
    many keys equal to ``T`` the top-k keeps (at least 1)."""
    prefix, need, high = 0, int(kept), 32
    candidates = keys
    for shift in range(32 - DIGIT, -1, -DIGIT):
        if high < 32:  # the keys whose digits above this one are the prefix found so far
            candidates = candidates[(candidates >> high) == (prefix >> high)]
        digits = (candidates >> shift) & ((1 << DIGIT) - 1)
        histogram = torch.bincount(digits, minlength=1 << DIGIT).to(torch.int64)
        dist.all_reduce(histogram, group=group)
        from_top = histogram.flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(need, dtype=from_top.dtype)))
        digit = (1 << DIGIT) - 1 - index
        above = int(from_top[index]) - int(histogram[digit])
        need -= above
        prefix |= digit << shift
        high = shift
    return prefix, need


def allowances(tie_counts: Tensor, need: int, group=None) -> list[int]:
    """How many of its ties at ``T`` each member keeps: ``tie_counts`` is this process's count per member; the
    first ``need`` ties in the order (member, process) are kept."""
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(tie_counts) for _ in range(world)]
    dist.all_gather(gathered, tie_counts, group=group)
    per_member = torch.stack(gathered).sum(0).tolist()  # every process's ties of each member
    out, left = [], need
    for count in per_member:
        take = max(0, min(count, left))
        out.append(take)
        left -= take
    return out


def refresh(selector, effective: bool) -> None:
    """Select the global top-k of ``selector``'s members, some held as FSDP2 shards; write the masks (and with
    ``effective`` the ``w * mask`` buffers) of the members held whole."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("scope='global' with sharded parameters needs torch.distributed initialized (FSDP2)")
    members = list(selector.tensors())
    shards = [order_keys(local_shard(scores).abs()).reshape(-1).to(torch.int64) for scores, _, _ in members]
    threshold, need = threshold_of(torch.cat(shards), selector.kept)
    ties = torch.tensor([int((keys == threshold).sum()) for keys in shards], dtype=torch.int64)
    allowed = allowances(ties, need)
    for (scores, weight, mask), allowance in zip(members, allowed):
        if is_shard(scores):
            continue  # selected when FSDP gathers this layer for its forward
        keys = order_keys(scores.abs()).reshape(-1).to(torch.int64)
        tied = keys == threshold
        keep = (keys > threshold) | (tied & (tied.cumsum(0) <= allowance))
        mask.hold_bool(weight, effective)
        mask.bool_mask.copy_(keep.view(mask.bool_mask.shape))
        # its own key: the selector's changes whenever FSDP gathers another member, this mask's does not
        mask.member_key = (version_key(scores), version_key(weight), selector.selections)
        if effective:
            mask.apply(weight, mask.effective_buffer)
