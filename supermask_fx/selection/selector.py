"""``TopKSelector``: the masks of the layers ranked together, kept current against their scores and weights.

A selector holds ``members`` (one layer, ``scope="layer"``; every globally ranked layer, ``scope="global"``), each
an object with ``tensors() -> (scores, weight)`` (the current Parameters) and ``frozen() -> bool`` (its mask is
fixed elsewhere), and one ``LayerMask`` per member. The mask of member ``i`` keeps the ``kept`` largest ``|s|`` of
the concatenation of all members' scores (flattened row-major, in member order), by the rule of
``selection.topk``; with ``blocks > 1`` (one member, a stack of expert matrices) its scores are ``blocks`` equal
consecutive chunks, each ranked on its own and keeping ``kept``.

``refresh(effective)`` is called on every read of a member's mask; it selects again only when some member's scores
or weights changed (the key: their autograd version counters, ``version_key``). With ``effective=True`` (reads
without autograd: evaluation, inference) it also fills each member's cached ``w * mask``; a read with
``effective=False`` (training) releases those copies: training builds ``w * mask`` per forward and holds no copy of
the weights between steps. ``peers`` are the selectors of the same ``popupify`` call: the ``cpu`` back-end's
compiled pass refreshes every stale peer in the first stale selector's kernel call, the ``device`` back-end every
peer in one batched select (an optimizer step changes all scores at once), so a step's masks cost one pass over all
the scores.
"""

from __future__ import annotations

import torch

from . import cpu, device, reference, sharded
from .backend import backend_for, is_shard, version_key
from .layer_mask import LayerMask

__all__ = ["TopKSelector"]


class TopKSelector:
    def __init__(self, kept: int, strategy: str = "auto", blocks: int = 1) -> None:
        self.kept = kept
        self.strategy = strategy  # the cpu back-end's: "auto", "native", "band" or "select" (selection.topk)
        self.blocks = blocks
        self.selections = 0  # how many times this selector's masks were computed (diagnostics, tests)
        self.members: list = []
        self.masks: list[LayerMask] = []  # one per member
        self.peers: list[TopKSelector] = [self]
        self.key = None  # what the masks were computed from
        self.effective_key = None  # what the effective buffers were computed from (None: not filled)
        self.hint = None  # the cpu back-end's band hint(s)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "key": None, "effective_key": None, "hint": None}

    def add(self, member) -> LayerMask:
        """Rank ``member`` with the others (after them in the concatenation); returns its mask."""
        mask = LayerMask(self)
        self.members.append(member)
        self.masks.append(mask)
        self.invalidate()
        return mask

    def invalidate(self) -> None:
        self.key = self.effective_key = None

    def current_key(self) -> tuple:
        """What the cache is computed from: the version keys of every member's scores and weight."""
        return tuple(
            (version_key(s), s.requires_grad, version_key(w)) for s, w in (member.tensors() for member in self.members)
        )

    def refresh(self, effective: bool = True) -> None:
        key = self.current_key()
        if key == self.key and (not effective or key == self.effective_key):
            if not effective and self.effective_key is not None:
                for mask in self.masks:  # a training read after an evaluation: drop the copy
                    mask.effective_buffer = None
                self.effective_key = None
            return
        with torch.inference_mode(False), torch.no_grad():
            if key != self.key:
                self._select(key, effective)
                return
            for _, weight, mask in self.tensors():  # masks are current; only the effective buffers are missing
                if not is_shard(weight):  # (a layer FSDP holds sharded gets its buffer when gathered)
                    mask.hold_effective(weight, True)
            self.fill_effective()
            self.effective_key = key

    def _select(self, key: tuple, effective: bool) -> None:
        if len(self.members) > 1 and self.holds_shards():
            sharded.refresh(self, effective)  # scope="global" under FSDP2: histograms summed across processes
            _mark_selected([(self, key)], effective)
            return
        backend = backend_for(self.members[0].tensors()[0].device)
        if backend == "device":  # every peer on the device, stale or not (an optimizer step changes them all)
            batch = [(self, key)] + [(p, p.current_key()) for p in self.peers if p is not self and p._device_peer(self)]
            device.refresh([selector for selector, _ in batch], effective)
            _mark_selected(batch, effective)
            return
        if backend == "cpu" and cpu.native_fits(self):  # every stale peer that fits, in one kernel call
            batch = [(self, key)]
            for peer in self.peers:
                if peer is not self:
                    peer_key = peer.current_key()
                    if peer_key != peer.key and cpu.native_fits(peer, as_peer=True):
                        batch.append((peer, peer_key))
            cpu.refresh_native([selector for selector, _ in batch], effective)
            _mark_selected(batch, effective)
            return
        if backend == "reference":
            reference.refresh(self, effective)
        else:
            cpu.refresh_torch(self, effective)
        _mark_selected([(self, key)], effective)

    def _device_peer(self, lead: TopKSelector) -> bool:
        """Whether this peer is selected in ``lead``'s batch: scores on the same device, no fixed mask."""
        if any(member.frozen() for member in self.members):
            return False
        if self.holds_shards():
            return False  # FSDP2 holds this layer sharded now: selected when gathered for its own forward
        return self.members[0].tensors()[0].device == lead.members[0].tensors()[0].device

    def holds_shards(self) -> bool:
        """Whether FSDP2 holds some member's scores or weight as a shard (a ``DTensor``) now."""
        return any(is_shard(t) for member in self.members for t in member.tensors())

    def segments(self) -> list[tuple[int, int]]:
        """``(size, kept)`` of each group this selector ranks: its members together, or each block alone."""
        total = sum(scores.numel() for scores, _ in (member.tensors() for member in self.members))
        if self.blocks > 1:
            return [(total // self.blocks, self.kept)] * self.blocks
        return [(total, self.kept)]

    def tensors(self):
        """Per member: (scores, weight, mask), the tensors detached."""
        for member, mask in zip(self.members, self.masks):
            scores, weight = member.tensors()
            yield scores.detach(), weight.detach(), mask

    def hold(self, effective: bool, bits: bool = False) -> None:
        """Allocate the masks (bool, or bits for the compiled pass) and, with ``effective``, the ``w * mask``
        buffers; without it, release those."""
        for _, weight, mask in self.tensors():
            if bits:
                mask.hold_bits(weight, effective)
            else:
                mask.hold_bool(weight, effective)

    def fill_effective(self) -> None:
        """``w * mask`` into every member's effective buffer (allocated; not for members FSDP holds sharded)."""
        for _, weight, mask in self.tensors():
            if not is_shard(weight):
                mask.apply(weight, mask.effective_buffer)


def _mark_selected(batch: list[tuple[TopKSelector, tuple]], effective: bool) -> None:
    """After a selection: each selector's cache key (and its effective buffers' key) and its count."""
    for selector, key in batch:
        selector.key = key
        selector.effective_key = key if effective else None
        selector.selections += 1
