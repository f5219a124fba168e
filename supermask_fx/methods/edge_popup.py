"""edge-popup (Ramanujan et al. 2020): keep the top-k |scores| of each layer, straight-through gradient.

Forward: ``w_eff = w * h(|s|)`` with ``h`` the exact top-k indicator of ``supermask_fx.topk``.
Backward: straight through ``h``, so ``dL/ds = sign(s) * w * dL/dw_eff`` (``abs``'s derivative times the
gradient a dense weight would get times the weight), which is Algorithm 1 of the paper (Appendix B.2).
``dL/dw = h(|s|) * dL/dw_eff`` when the weights are trainable too. The score gradient is computed in the
backward from the scores and weights themselves (one compiled pass on the CPU), so nothing the size of the
weights is cached for it.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..gate import version_key
from ..kernels import BitMask, masked_weight, straight_through_grad
from ..selection import backend_for
from ..selection.device import Segments, order_keys, segmented_topk
from ..topk import BandHint, NativeGroup, select_topk, select_topk_native_many, topk_mask_reference
from .base import Method


class EdgePopup(Method):
    name = "edge_popup"
    uses_topk = True

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        scores = module._parameters[gate.scores]
        if torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad):
            # Training: a fresh w * mask per forward, freed with the graph; no cached copy held across steps.
            gate.selector.refresh(effective=False)
            effective = StraightThrough.apply(scores, weight, gate.forward_mask())
            context = module.__dict__.get("_supermask_recompute")
            if context is not None:  # the backward rebuilds it instead of keeping it (supermask_fx.recompute)
                context.register(effective, weight, gate)
            return effective
        gate.selector.refresh(effective=True)
        return gate.effective_buffer

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        gate.selector.refresh(effective=False)
        return gate.mask


class RandomSubnetwork(EdgePopup):
    """A fixed random subnetwork: the top-k of random, frozen scores. Nothing is trained, nothing else changes."""

    name = "random"
    trains_scores = False


class StraightThrough(torch.autograd.Function):
    """Returns ``w * mask`` (a new tensor in the weight's memory format; ``mask`` bool or a ``BitMask``); sends
    ``grad * w * sign(s)`` to the scores and ``grad * mask`` to w.

    The scores and weight are saved as they are (parameters: no copy); an optimizer step between a forward and
    its backward is then caught by autograd's version check instead of giving a gradient for other scores."""

    @staticmethod
    def forward(ctx, scores, weight, mask):
        keep = None
        if weight.requires_grad:
            keep = mask.to_bool().to(weight.device) if isinstance(mask, BitMask) else mask
        ctx.save_for_backward(scores, weight, keep)
        return masked_weight(weight, mask)

    @staticmethod
    def backward(ctx, grad):
        scores, weight, mask = ctx.saved_tensors
        grad_scores = straight_through_grad(grad, scores, weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad * mask if ctx.needs_input_grad[1] else None
        return grad_scores, grad_weight, None


class TopKSelector:
    """Computes the masks of the layers ranked together: one layer (``scope="layer"``) or all (``"global"``).

    ``refresh(effective)`` is called on every read of a member's weight; it recomputes only when some member's
    scores or weight changed. It fills every member's mask (on the compiled CPU path as ``gate.bits``, one bit per
    weight, unpacked only when ``gate.mask`` is read) and, with ``effective=True`` (reads without
    autograd: evaluation, inference), the cached ``effective_buffer = w * mask``. A training read
    (``effective=False``) releases that buffer: training builds ``w * mask`` per forward and holds no copy of the
    weights between steps. ``peers`` are the selectors of the same ``popupify`` call: on the compiled CPU path,
    the first stale selector refreshes every stale peer in the same kernel call (an optimizer step changes all
    scores at once), so a step's masks cost one pass over all the scores.

    ``blocks > 1`` (one member, a stack of expert matrices): the member's scores are ``blocks`` equal consecutive
    chunks (one per matrix), each ranked on its own and keeping ``kept``.
    """

    def __init__(self, kept: int, strategy: str = "auto", blocks: int = 1) -> None:
        self.kept = kept
        self.strategy = strategy
        self.blocks = blocks
        self.selections = 0  # how many times this selector's masks were computed (diagnostics, tests)
        self.members: list[tuple[nn.Module, object]] = []
        self.peers: list[TopKSelector] = [self]
        self.key = None  # what the masks were computed from
        self.effective_key = None  # what the effective buffers were computed from (None: not filled)
        self.hint: BandHint | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "key": None, "effective_key": None, "hint": None}

    def invalidate(self) -> None:
        self.key = self.effective_key = None

    def current_key(self) -> tuple:
        """What the cache was computed from: the version keys of every member's scores and weight."""
        return tuple(
            (version_key(s), s.requires_grad, version_key(m._parameters[g.param]))
            for m, g in self.members
            for s in (m._parameters[g.scores],)
        )

    def refresh(self, effective: bool = True) -> None:
        key = self.current_key()
        if key == self.key and (not effective or key == self.effective_key):
            if not effective and self.effective_key is not None:
                for _, gate in self.members:  # a training read after an evaluation: drop the copy
                    gate.effective_buffer = None
                self.effective_key = None
            return
        with torch.inference_mode(False), torch.no_grad():
            if key != self.key:
                self._select(key, effective)
                return
            for module, gate in self.members:  # masks are current; only the effective buffers are missing
                gate.ensure_effective(module._parameters[gate.param])
            self._fill_effective()
            self.effective_key = key

    def _select(self, key: tuple, effective: bool) -> None:
        backend = backend_for(self.members[0][0]._parameters[self.members[0][1].scores].device)
        if backend == "device":  # every peer on the device, stale or not (an optimizer step changes them all)
            batch = [(self, key)] + [(p, p.current_key()) for p in self.peers if p is not self and p._device_peer(self)]
            _refresh_device([selector for selector, _ in batch], effective)
            _mark_selected(batch, effective)
            return
        if backend == "cpu" and self._native_ok():  # every stale peer that fits, in one kernel call
            batch = [(self, key)]
            for peer in self.peers:
                if peer is not self:
                    peer_key = peer.current_key()
                    if peer_key != peer.key and peer._native_ok(as_peer=True):
                        batch.append((peer, peer_key))
            for selector, _ in batch:
                selector._ensure_buffers(effective, bits=True)
            _refresh_native([selector for selector, _ in batch], effective)
            _mark_selected(batch, effective)
            return
        self._ensure_buffers(effective)
        if backend == "reference":
            self._refresh_reference(effective)
        else:
            self._refresh_torch(effective)
        _mark_selected([(self, key)], effective)

    def _device_peer(self, lead: TopKSelector) -> bool:
        """Whether this peer is selected in ``lead``'s batch: scores on the same device, no fixed mask."""
        module, gate = self.members[0]
        if any(m._buffers.get(g.mask_buffer) is not None for m, g in self.members):
            return False
        lead_module, lead_gate = lead.members[0]
        return module._parameters[gate.scores].device == lead_module._parameters[lead_gate.scores].device

    def _segments(self) -> list[tuple[int, int]]:
        """``(size, kept)`` of each group this selector ranks: its members together, or each block alone."""
        total = sum(m._parameters[g.scores].numel() for m, g in self.members)
        if self.blocks > 1:
            return [(total // self.blocks, self.kept)] * self.blocks
        return [(total, self.kept)]

    def _refresh_reference(self, effective: bool) -> None:
        """The ``reference`` back-end: a stable sort of each group's magnitudes."""
        magnitudes = torch.cat([m._parameters[g.scores].detach().abs().reshape(-1) for m, g in self.members])
        masks = torch.cat(
            [
                topk_mask_reference(chunk, kept)
                for chunk, (_, kept) in zip(magnitudes.split([size for size, _ in self._segments()]), self._segments())
            ]
        )
        for (_, gate), part in zip(
            self.members, masks.split([m._parameters[g.scores].numel() for m, g in self.members])
        ):
            gate.mask.copy_(part.view(gate.mask.shape))
        if effective:
            self._fill_effective()

    def _ensure_buffers(self, effective: bool, bits: bool = False) -> None:
        """Allocate the masks (bool, or ``BitMask`` for the compiled path) and, with ``effective``, the
        ``w * mask`` buffers; without it, release those."""
        for module, gate in self.members:
            weight = module._parameters[gate.param]
            if bits:
                gate.ensure_bits(weight, effective)
            else:
                gate.ensure_buffers(weight, effective)
            if not effective:
                gate.effective_buffer = None

    def _fill_effective(self) -> None:
        for module, gate in self.members:
            masked_weight(module._parameters[gate.param].detach(), gate.forward_mask(), gate.effective_buffer)

    def _tensors(self):
        """Per member: (scores, weight, gate), the tensors detached."""
        for module, gate in self.members:
            yield module._parameters[gate.scores].detach(), module._parameters[gate.param].detach(), gate

    def _native_ok(self, as_peer: bool = False) -> bool:
        """Whether the compiled CPU pass applies: strategy ``auto`` or ``native``, float32 contiguous CPU tensors.
        ``as_peer``: refreshed ahead of its own read: never raise (its own read will, for ``strategy="native"``)."""
        if self.strategy not in ("auto", "native") or self.blocks > 1:
            return False
        if as_peer and any(m._buffers.get(g.mask_buffer) is not None for m, g in self.members):
            return False  # a fixed mask: its gate reads the buffer (and may alias it as ``gate.mask``)
        fits = all(
            t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32
            for scores, weight, gate in self._tensors()
            for t in (scores, weight)
        )
        from .. import native

        if fits and native.kernel() is not None:
            return True
        if self.strategy == "native" and not as_peer:
            why = native.unavailable_reason() or "it needs contiguous float32 scores and weights on the CPU"
            raise RuntimeError(f"strategy='native' cannot be used: {why}; use strategy='auto'")
        return False

    def _native_group(self, effective: bool) -> NativeGroup:
        scores, weights, gates = zip(*self._tensors())
        return NativeGroup(
            [s.view(-1) for s in scores],
            [w.view(-1) for w in weights],
            [g.bits.words for g in gates],
            [g.effective_buffer.view(-1) for g in gates] if effective else None,
            self.kept,
            self.hint,
        )

    def _refresh_torch(self, effective: bool) -> None:
        parts, masks = [], []
        for module, gate in self.members:
            scores = module._parameters[gate.scores].detach()
            buffer = gate.effective_buffer if effective else None
            if (
                buffer is not None
                and scores.dtype == buffer.dtype
                and scores.is_contiguous()
                and buffer.is_contiguous()
            ):
                magnitudes = torch.abs(scores, out=buffer)  # the effective-weight buffer as scratch for |s|
            else:  # no buffer, channels-last or mixed dtypes: rank in row-major order all the same
                magnitudes = scores.abs().contiguous()
            parts.append(magnitudes.view(-1))
            masks.append(gate.mask.view(-1))
        if self.blocks > 1:  # one member: each of its matrices is ranked on its own
            hints = self.hint if isinstance(self.hint, list) else [None] * self.blocks
            chunks = zip(parts[0].view(self.blocks, -1), masks[0].view(self.blocks, -1), hints)
            self.hint = [select_topk([a], self.kept, [m], h, self.strategy) for a, m, h in chunks]
        else:
            self.hint = select_topk(parts, self.kept, masks, self.hint, self.strategy)
        if effective:
            self._fill_effective()


def _mark_selected(batch: list[tuple[TopKSelector, tuple]], effective: bool) -> None:
    """After a selection: each selector's cache key (and its effective buffers' key) and its count."""
    for selector, key in batch:
        selector.key = key
        selector.effective_key = key if effective else None
        selector.selections += 1


_DEVICE_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refresh_device(selectors: list[TopKSelector], effective: bool) -> None:
    """The ``device`` back-end: every selector of the batch in one segmented radix select (``selection.device``).

    The plan (segments, the one bool buffer holding every mask) is built once per batch layout and kept; each gate's
    ``mask`` is a view of that buffer, so a refresh writes all masks in one operation and allocates nothing new."""
    members = [(module, gate) for selector in selectors for module, gate in selector.members]
    scores = [module._parameters[gate.scores].detach() for module, gate in members]
    signature = tuple((id(selector), len(selector.members)) for selector in selectors) + tuple(
        (tuple(s.shape), s.device) for s in scores
    )
    plan = _DEVICE_PLANS.get(selectors[0])
    if plan is None or plan[0] != signature:
        segments = [segment for selector in selectors for segment in selector._segments()]
        layout = Segments.build([size for size, _ in segments], [kept for _, kept in segments], scores[0].device)
        buffer = torch.empty(layout.total, dtype=torch.bool, device=scores[0].device)
        views, offset = [], 0
        for s in scores:
            views.append(buffer[offset : offset + s.numel()].view(s.shape))
            offset += s.numel()
        plan = (signature, layout, buffer, views)
        _DEVICE_PLANS[selectors[0]] = plan
    _, layout, buffer, views = plan
    keys = order_keys(torch.cat([s.reshape(-1) for s in scores]).abs_())
    segmented_topk(keys, layout, out=buffer)
    for (module, gate), view in zip(members, views):
        gate.mask = view
        if effective:
            gate.ensure_effective(module._parameters[gate.param])
        else:
            gate.effective_buffer = None
    if effective:
        for selector in selectors:
            selector._fill_effective()


def _refresh_native(selectors: list[TopKSelector], effective: bool) -> None:
    """Refresh ``selectors`` (fitting the compiled path, caches allocated) in one call of the CPU kernel."""
    hints = select_topk_native_many([selector._native_group(effective) for selector in selectors])
    for selector, hint in zip(selectors, hints):
        selector.hint = hint
