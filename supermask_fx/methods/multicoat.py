"""Multicoated supermasks (Okoshi et al., "Multicoated Supermasks Enhance Hidden Networks", ICML 2022): ``C`` nested
top-k masks ("coats") per layer, summed, so a weight kept by more coats counts more.

With ``s`` the layer's scores and ``w`` its frozen weight (shape ``S``), ``alpha_c`` the scale of coat ``c``
(``scales``, default all 1) and ``r_c`` the ratio of coat ``c`` (``ratios``, default ``1 / c**2``):

    m_1 = the layer's edge-popup mask: the exact top-k of |s| (selection.topk's rule; per layer, or the layer's
          slice of the global ranking with scope="global"), K_1 = its kept count in the layer (per expert matrix of
          a stack ranked per matrix)
    m_c = the top K_c of the layer's own |s|, same rule (ties by lowest flat index, NaN below every number),
          K_c = max(1, int(r_c * K_1)) (0 when K_1 = 0), c = 2..C
    L   = sum_c alpha_c * m_c                                      (S, float)
    w_eff = w * L                                                  forward
    dL/ds = sign(s) * w * dL/dw_eff * sum_c alpha_c                backward, straight through every coat

The coats are nested by construction: ``m_1`` keeps the ``K_1`` entries of the layer that come first in the
rule's order (a slice of the global order is the layer's own order: same values, same relative flat indices), and
``K_C <= ... <= K_2 < K_1``, so ``m_C <= ... <= m_2 <= m_1``; hence ``L = v[l]`` with ``l`` the *level* of a weight
(the number of coats holding it, 0..C) and ``v[l] = alpha_1 + ... + alpha_l`` (the partial sums, in float64,
rounded to the weight's dtype). With the defaults a kept weight counts ``1 +`` the number of inner coats holding it.
With ``scope="global"`` the inner coats are still ranked per layer, from the layer's share ``K_1`` of the global
count. ``coats=1`` (with scale 1) is edge-popup, bit for bit (every hook is edge-popup's).

This is the authors' ``MultiLevelHN`` (github.com/yasu0001/multicoated-supermasks, ``src/custom_conv.py``:
``mask = sum_c GetSubnet(|s|, kth_c, bw_scale)`` with ``bw_scale = 1``, so the gradient of ``|s|`` is ``C * w *
dL/dw_eff``); their ImageNet config keeps 0.3, 0.0788 and 0.0315 of each layer, which the default ratios give as
0.3, 0.075, 0.033 at ``k = 0.3``. Their thresholds are percentiles (``|s| >= kth``: ties may keep more); the counts
here are exact. They scale the weights by ``1 / sqrt(k)`` (``popupify(..., scaled=True)``).

Caches and cost. The levels are a uint8 tensor shaped like the weight, recomputed when the layer's mask is selected
again (the cache key is the selection's: the version counters of the ranked scores and weights, and the kept
count), one exact top-k per inner coat by the selection's own functions: the band select with a hint per coat on
the CPU (``selection.topk.select_topk``), the sort of ``selection.topk.topk_mask_reference`` under the
``reference`` back-end, the sync-free radix select of ``selection.device.segmented_topk`` on accelerators (``K_1``
and ``K_c`` computed on the device: no host read per step, whatever the scope; on MPS, which has no float64, the
global scope reads ``K_1`` to the host). Training builds ``w * L`` per forward and keeps no copy (gated
``nn.Linear``/``nn.Conv*`` rebuild it in the backward, ``core.recompute``); evaluation keeps one
(``gate.effective_buffer``). Scales other than all 1 cost an int64 index of the levels per forward. On the CPU
(one thread) a training step of the paper's FC net (784-300-100-10, batch 128) takes about twice edge-popup's.

Fixed masks (``fix_masks``, ``load_subnetwork``) keep the levels: ``Method.fix`` registers a uint8 buffer
``coat_levels`` (``in_proj_coat_levels`` for ``in_proj_weight``), which the ``state_dict`` carries and ``materialize``
drops, and ``Method.fixed_weight`` computes ``w * v[level]`` under the fixed mask. A subnetwork file stores, beside
the mask (``m_1``), one bit plane per inner coat: ``extra/<layer>.<param>/coat<c>`` (``core.heads.pack``) holds
``m_c`` over the positions ``m_{c-1}`` keeps, in row-major order, so a file costs the mask plus ``K_1 + K_2 + ...
+ K_{C-1}`` bits per layer: ``k + k * r_2 + ...`` bits per weight beside the mask (about ``H(k)`` bits Rice-coded,
1 as a bitmap); the FC net at ``k = 0.3`` takes 1.26 bits per weight with 2 coats, 1.34 with 3. Named masks
(``add_mask``) hold the outer coat only as bits: a head made active again re-ranks its inner coats from its scores
(equal to the mask, so by lowest flat index).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.gate import Gate, scores_name
from ..core.heads import pack, unpack
from ..core.method import register_method
from ..selection.backend import backend_for
from ..selection.device import Segments, order_keys, segmented_topk
from ..selection.kernels import buffer_like, straight_through_grad
from ..selection.topk import select_topk, topk_mask_reference
from .edge_popup import EdgePopup

__all__ = ["Multicoat", "MulticoatOptions", "levels_name", "inner_levels", "inner_kept"]

_CACHE = "_multicoat"  # gate.__dict__: the layer's current levels (valid while gate.key is their key), band hints
_MAX_COATS = 255  # levels are uint8


@dataclasses.dataclass(frozen=True)
class MulticoatOptions:
    """Options of ``method="multicoat"`` (see the module docstring).

    Attributes:
        coats: the number ``C >= 1`` of nested masks (1: edge-popup).
        ratios: the kept count of coats 2..C as a fraction of the outer coat's (``C - 1`` values, strictly
            decreasing in (0, 1)); empty: ``1 / c**2`` (at ``k = 0.3``: 0.3, 0.075, 0.033 of the layer).
        scales: ``alpha_c`` of each coat (``C`` positive values); empty: all 1 (the authors' setting).
    """

    coats: int = 2
    ratios: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:  # lists (JSON) as tuples: the options stay hashable
        for name in ("ratios", "scales"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))


def levels_name(param: str) -> str:
    """The buffer of a fixed layer's levels: ``weight`` -> ``coat_levels``; ``in_proj_weight`` ->
    ``in_proj_coat_levels``."""
    return scores_name(param)[: -len("scores")] + "coat_levels"


def inner_kept(ratio: float, kept: int) -> int:
    """``K_c`` for a layer whose outer coat keeps ``kept``: ``max(1, int(ratio * kept))``, 0 when ``kept`` is 0."""
    return max(1, int(ratio * kept)) if kept > 0 else 0


@register_method
class Multicoat(EdgePopup):
    name = "multicoat"
    Options = MulticoatOptions

    @classmethod
    def check_options(cls, options: MulticoatOptions) -> None:
        coats = options.coats
        if isinstance(coats, bool) or not isinstance(coats, int) or not 1 <= coats <= _MAX_COATS:
            raise ValueError(
                f"coats={coats!r} must be an integer from 1 to {_MAX_COATS}: the number of nested masks (1 is "
                "edge-popup; the authors use 3)"
            )
        ratios = _numbers("ratios", options.ratios)
        if ratios and len(ratios) != coats - 1:
            raise ValueError(
                f"ratios={options.ratios!r} has {len(ratios)} values and coats={coats} needs {coats - 1} (one per "
                "inner coat, as a fraction of the outer coat's kept count), or none for the default 1/c**2"
            )
        if any(not 0.0 < r < 1.0 for r in ratios) or any(b >= a for a, b in zip(ratios, ratios[1:])):
            raise ValueError(
                f"ratios={options.ratios!r} must be strictly decreasing fractions in (0, 1): coat c keeps "
                "ratios[c - 2] of what the outer coat keeps, inside the coat before it (e.g. (0.25, 0.11))"
            )
        scales = _numbers("scales", options.scales)
        if scales and len(scales) != coats:
            raise ValueError(
                f"scales={options.scales!r} has {len(scales)} values and coats={coats} needs {coats} (alpha_c of "
                "each coat), or none for all 1"
            )
        if any(a <= 0.0 for a in scales):
            raise ValueError(f"scales={options.scales!r} must be positive: alpha_c multiplies coat c's mask")

    def __init__(self, options: MulticoatOptions | None = None) -> None:
        super().__init__(options)
        self.check_options(self.options)
        coats = self.options.coats
        self.ratios = tuple(float(r) for r in self.options.ratios) or tuple(1.0 / c**2 for c in range(2, coats + 1))
        scales = tuple(float(a) for a in self.options.scales) or (1.0,) * coats
        self.values = tuple(math.fsum(scales[:level]) for level in range(coats + 1))  # v[0] = 0, v[l] partial sums
        self.total = self.values[-1]  # the straight-through gradient's factor, sum_c alpha_c
        self.plain = coats == 1 and scales == (1.0,)  # edge-popup itself
        self.unit = scales == (1.0,) * coats  # v[l] = l: the scale is the level itself
        self.tables: dict = {}  # (device, dtype) -> v, made once (no copy to the device per step)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tables": {}}  # copies and pickles make their own

    def table(self, weight: Tensor) -> Tensor:
        """``v`` (level 0..C) in the weight's dtype, on its device."""
        held = self.tables.get((weight.device, weight.dtype))
        if held is None:
            values = torch.tensor(self.values, dtype=torch.float64)
            held = self.tables[(weight.device, weight.dtype)] = values.to(weight.dtype).to(weight.device)
        return held

    # ------------------------------------------------------------------------------------------ a layer's life

    def effective_weight(self, gate: Gate, module: nn.Module, weight: Tensor) -> Tensor:
        if self.plain:
            return super().effective_weight(gate, module, weight)
        scores = module._parameters[gate.scores]
        cache = self.current(gate, module)
        if torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad):
            gate.effective_buffer, cache.effective = None, False  # training holds no copy between steps
            effective = CoatedStraightThrough.apply(scores, weight, cache.levels, self.total)
            context = module.__dict__.get("_supermask_recompute")
            if context is not None:  # the backward rebuilds w * L instead of keeping it (core.recompute)
                context.register(effective, weight, cache.levels, gate.name)
            return effective
        if not cache.effective or gate.effective_buffer is None:
            with torch.inference_mode(False), torch.no_grad():
                gate.effective_buffer = buffer_like(gate.effective_buffer, weight)
                gate.effective_buffer.copy_(cache.levels.apply(weight.detach()))
            cache.effective = True
        return gate.effective_buffer

    def bake(self, gate: Gate, module: nn.Module) -> Tensor:
        """``w * L`` with the current levels (a new tensor)."""
        if self.plain:
            return super().bake(gate, module)
        return self.current(gate, module).levels.apply(module._parameters[gate.param].detach())

    def is_baked(self, stored: Tensor, weight: Tensor) -> bool:
        """Every entry is 0 or ``w * v[l]`` for a level ``l`` in 1..C (computed as ``bake`` computes it)."""
        if self.plain:
            return super().is_baked(stored, weight)
        table = self.table(weight)
        ok = stored == 0
        for level in range(1, len(self.values)):
            ok |= stored == weight * table[level]
        return bool(ok.all())

    # ------------------------------------------------------------------------------------------ the levels

    def levels(self, gate: Gate, module: nn.Module) -> Tensor:
        """The level of each weight of the layer (uint8, ``S``: the number of coats holding it): under a fixed mask
        the held ones (``fix``), else the current selection's."""
        fixed = module._buffers.get(gate.mask_buffer)
        if fixed is not None:
            return _agreeing(module._buffers.get(levels_name(gate.param)), fixed)
        if self.plain:
            return self.eval_mask(gate, module).to(torch.uint8)
        return self.current(gate, module).levels.levels

    def current(self, gate: Gate, module: nn.Module) -> _Cache:
        """The layer's cache, its levels current: selected again (``inner_levels``) when the layer's mask was, or the
        kept count changed, or the gate's caches were cleared."""
        mask = gate.layer_mask.current()
        key = ("multicoat", mask.key, gate.selector.kept, self.values, self.ratios)
        cache = gate.__dict__.get(_CACHE)
        if cache is None:
            cache = gate.__dict__[_CACHE] = _Cache()
        if cache.levels is None or cache.key != key or gate.key != key:
            with torch.inference_mode(False), torch.no_grad():
                levels = self.select_levels(gate, module, mask.tensor(cache=False), cache)
            cache.levels, cache.key, cache.effective = _Levels(levels, self), key, False
            gate.key = key
        return cache

    def select_levels(self, gate: Gate, module: nn.Module, outer: Tensor, cache: _Cache) -> Tensor:
        """The level of each weight (uint8, like the weight, in its memory format) given the outer coat ``outer``
        (bool, ``S``): ``outer`` plus the inner coats of ``inner_levels``."""
        scores = module._parameters[gate.scores].detach()
        weight = module._parameters[gate.param]
        selector = gate.selector
        blocks = selector.blocks if len(selector.members) == 1 else 1
        outer = outer.to(scores.device).reshape(blocks, -1)
        if len(selector.members) == 1:  # the selector's count per block: no read of the mask
            kept = torch.full((blocks,), selector.kept, dtype=torch.int64, device=scores.device)
        else:  # scope="global": the layer's share of the global count
            kept = outer.sum(1)
        inner = inner_levels(scores.abs().reshape(blocks, -1), kept, self.ratios, backend_for(scores.device), cache)
        levels = torch.empty_like(weight, dtype=torch.uint8)
        return levels.copy_((inner + outer).view(weight.shape))

    # ------------------------------------------------------------------------------------------ fixed masks

    def attach(self, gate: Gate, module: nn.Module) -> None:
        """Refuse a module with an attribute of the name the fixed form's buffer will take."""
        name = levels_name(gate.param)
        if not self.plain and name not in module._buffers and hasattr(module, name):
            raise ValueError(f"{gate.layer or 'the model'} already has an attribute {name!r}; cannot add multicoat's")

    def buffer_names(self, gate: Gate) -> tuple[str, ...]:
        return () if self.plain else (levels_name(gate.param),)

    def fix(self, gate: Gate, module: nn.Module, mask: Tensor) -> None:
        """Register the levels the fixed form uses: those already held if they agree with ``mask`` (a file's,
        ``load_file_tensors``; a layer fixed before), else the current ones if their outer coat is ``mask``
        (``fix_masks``), else level 1 wherever ``mask`` keeps (a mask from elsewhere: no inner coat)."""
        if self.plain:
            return
        held = module._buffers.get(levels_name(gate.param))
        if held is not None and torch.equal(held != 0, mask.to(held.device, torch.bool)):
            return
        levels = self.current(gate, module).levels.levels
        if not torch.equal(levels != 0, mask.to(levels.device, torch.bool)):
            levels = mask.to(torch.uint8)
        _set_levels(module, gate, levels)

    def fixed_weight(self, gate: Gate, module: nn.Module, weight: Tensor, mask: Tensor) -> Tensor:
        """``w * v[level]`` where ``mask`` keeps, 0 elsewhere, with the ``coat_levels`` buffer (level 1 where it
        holds 0 but the mask keeps: a mask written into the buffer later, ``set_mask``)."""
        if self.plain:
            return super().fixed_weight(gate, module, weight, mask)
        return _Levels(_agreeing(module._buffers.get(levels_name(gate.param)), mask), self).apply(weight)

    # ------------------------------------------------------------------------------------------ files

    def file_tensors(self, gate: Gate, module: nn.Module, mask: Tensor) -> dict[str, Tensor]:
        """``{"coat<c>": bits}`` for c = 2..C: coat ``c`` over the positions coat ``c - 1`` keeps (row-major), one
        bit each (``heads.pack``: ``ceil(K_{c-1} / 8)`` bytes)."""
        if self.plain:
            return {}
        levels = _agreeing(self.levels(gate, module), mask).reshape(-1).cpu()
        return {f"coat{c}": pack((levels >= c)[levels >= c - 1]) for c in range(2, self.options.coats + 1)}

    def load_file_tensors(self, gate: Gate, module: nn.Module, tensors: dict[str, Tensor], mask: Tensor) -> None:
        """Rebuild the levels from the file's bit planes and hold them for the fixed form (``fix``)."""
        if self.plain:
            return
        coats = self.options.coats
        wanted = [f"coat{c}" for c in range(2, coats + 1)]
        if sorted(tensors) != sorted(wanted):
            raise ValueError(
                f"{gate.name}: a multicoat layer of {coats} coats needs the tensors "
                f"{', '.join(f'extra/{gate.name}/{key}' for key in wanted) or 'none'} (one bit plane per inner "
                f"coat), the file has {sorted(tensors) or 'none'}"
            )
        flat = mask.detach().to("cpu", torch.bool).reshape(-1)
        levels = flat.to(torch.uint8)
        holding = flat.nonzero().squeeze(1)  # the positions coat c - 1 keeps
        for c, key in zip(range(2, coats + 1), wanted):
            bits = tensors[key]
            if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (holding.numel() + 7) // 8:
                raise ValueError(
                    f"{gate.name}: extra/{gate.name}/{key} is {bits.dtype} of shape {tuple(bits.shape)}; coat {c - 1} "
                    f"keeps {holding.numel()} weights, one bit each (uint8, {(holding.numel() + 7) // 8} bytes)"
                )
            holding = holding[unpack(bits, torch.Size([holding.numel()]))]
            levels[holding] = c
        _set_levels(module, gate, levels.view(mask.shape))
        gate.clear_cache()


class _Levels:
    """The levels of one layer (uint8, ``S``) and the weight they make: ``apply(w) = w * v[level]``, 0 where the
    level is 0 (even for a NaN weight). A ``core.recompute`` recipe too (``apply``, ``key``): each selection makes a
    new one, so a backward rebuilds exactly its forward's weight."""

    def __init__(self, levels: Tensor, method: Multicoat) -> None:
        self.levels = levels
        self.method = method
        self.key = None  # constant: a new object per selection

    def apply(self, weight: Tensor) -> Tensor:
        return torch.where(self.levels != 0, weight * self.scale(weight), 0.0)

    def scale(self, weight: Tensor) -> Tensor:
        """``v[level]`` (``S``, the weight's dtype): the level itself with unit scales, else a table look-up."""
        if self.method.unit:
            return self.levels.to(weight.dtype)
        return self.method.table(weight)[self.levels.to(torch.int64)]


class _Cache:
    """Per gate: the current ``_Levels`` and their key, whether ``gate.effective_buffer`` holds their ``w * L``, and
    the band hints of the CPU path. Copies and pickles of a gate start empty (selected again at the first read)."""

    def __init__(self) -> None:
        self.levels: _Levels | None = None
        self.key = None
        self.effective = False
        self.hints: dict = {}
        self.layout = None  # the device path's Segments, per shape

    def __reduce__(self):
        return (_Cache, ())


def inner_levels(
    magnitudes: Tensor, kept: Tensor, ratios: tuple[float, ...], backend: str, cache: _Cache | None = None
) -> Tensor:
    """The number of inner coats holding each entry (uint8, ``(B, n)``) of ``B`` independently ranked rows of
    magnitudes ``|s|`` (``(B, n)``), row ``b``'s outer coat keeping ``kept[b]`` (int64, ``(B,)``): coat ``c`` is
    the top ``inner_kept(ratios[c - 2], kept[b])`` of the row by the selection rule.

    ``backend`` is the selection's (``selection.backend_for``): ``"device"`` computes the counts on the tensors'
    device with no host read (``selection.device.segmented_topk``, one call per coat for all rows); ``"cpu"`` reads
    ``kept`` and ranks each row by ``selection.topk.select_topk`` (band hints kept in ``cache``); ``"reference"`` by
    a stable sort (``topk_mask_reference``). All give the same counts."""
    rows, n = magnitudes.shape
    counts = torch.zeros((rows, n), dtype=torch.uint8, device=magnitudes.device)
    if backend == "device":
        layout = _layout(cache, rows, n, magnitudes.device)
        keys = order_keys(magnitudes.reshape(-1))
        for ratio in ratios:
            kc = _inner_kept_tensor(ratio, kept)
            coat = segmented_topk(keys, dataclasses.replace(layout, kept=kc.clamp_min(1))).view(rows, n)
            counts += coat & (kc > 0).unsqueeze(1)
        return counts
    hints = cache.hints if cache is not None else {}
    coat = torch.empty(n, dtype=torch.bool, device=magnitudes.device)
    for row, (values, outer) in enumerate(zip(magnitudes, kept.tolist())):
        for c, ratio in enumerate(ratios, start=2):
            kc = inner_kept(ratio, outer)
            if kc == 0:
                break
            if backend == "reference":
                counts[row] += topk_mask_reference(values, kc)
            else:
                hints[(row, c)] = select_topk([values], kc, [coat], hints.get((row, c)))
                counts[row] += coat
    return counts


def _inner_kept_tensor(ratio: float, kept: Tensor) -> Tensor:
    """``inner_kept`` of each entry of ``kept`` (int64), on its device: ``int(ratio * kept)`` is a float64 product
    rounded down, as Python computes it. MPS has no float64: there ``kept`` is read to the host."""
    if kept.device.type == "mps":
        return torch.tensor([inner_kept(ratio, int(n)) for n in kept.tolist()], dtype=torch.int64).to(kept.device)
    return torch.where(kept > 0, torch.floor(kept.to(torch.float64) * ratio).clamp_min(1.0), 0.0).long()


def _layout(cache: _Cache | None, rows: int, n: int, device: torch.device) -> Segments:
    """``rows`` segments of ``n`` entries on ``device`` (their kept counts are set per call), kept in ``cache``."""
    held = None if cache is None else cache.layout
    if held is None or held[0] != (rows, n, device):
        held = ((rows, n, device), Segments.build([n] * rows, [1] * rows, device))
        if cache is not None:
            cache.layout = held
    return held[1]


def _agreeing(levels: Tensor | None, mask: Tensor) -> Tensor:
    """``levels`` where ``mask`` keeps (at least 1), 0 elsewhere; level 1 wherever the mask keeps without levels."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    if levels is None:
        return keep.to(torch.uint8)
    return torch.where(keep, levels.to(keep.device).clamp_min(1), 0).to(torch.uint8)


def _set_levels(module: nn.Module, gate: Gate, levels: Tensor) -> None:
    """Write ``levels`` into the layer's ``coat_levels`` buffer, registering it (like the weight) if absent."""
    name = levels_name(gate.param)
    held = module._buffers.get(name)
    if held is None or held.shape != levels.shape:
        weight = module._parameters[gate.param]
        module.register_buffer(name, torch.empty_like(weight, dtype=torch.uint8, requires_grad=False))
        held = module._buffers[name]
    with torch.no_grad():
        held.copy_(levels)


def _numbers(name: str, values) -> tuple[float, ...]:
    """``values`` as a tuple of finite floats, or a ``ValueError`` naming the option."""
    if isinstance(values, (int, float)) or not isinstance(values, (tuple, list)):
        raise ValueError(f"{name}={values!r} must be a tuple of numbers (or empty for the default)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}={values!r} must hold finite numbers, not {v!r}")
    return tuple(float(v) for v in values)


class CoatedStraightThrough(torch.autograd.Function):
    """Returns ``levels.apply(w)`` (``w * L``); sends ``grad * w * sign(s) * total`` to the scores (straight through
    every coat, ``total = sum_c alpha_c``) and ``grad * L`` to ``w``. The scores and weight are saved as they are
    (autograd's version check catches an optimizer step between a forward and its backward)."""

    @staticmethod
    def forward(ctx, scores, weight, levels, total):
        ctx.save_for_backward(scores, weight)
        ctx.levels, ctx.total = levels, total
        return levels.apply(weight)

    @staticmethod
    def backward(ctx, grad):
        scores, weight = ctx.saved_tensors
        grad_scores = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_scores = straight_through_grad(grad, scores, weight)
            if ctx.total != 1.0:
                grad_scores = grad_scores.mul_(ctx.total)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.where(ctx.levels.levels != 0, grad * ctx.levels.scale(grad), 0.0)
        return grad_scores, grad_weight, None, None
