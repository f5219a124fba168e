"""Bookkeeping over a popupified model: which layers are gated, what they keep, fixing masks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..graph.rule import NORM_ROLES
from .gate import Gate, adapter_modules, aliases_of, gates_of
from .packed import unpack_parameters

__all__ = [
    "gated_layers",
    "supermask_parameters",
    "mask_stats",
    "fix_masks",
    "refresh_masks",
    "MaskStats",
    "coverage",
    "Coverage",
    "mask_statistics",
    "check_no_adapters",
]


def gated_layers(model: nn.Module) -> Iterator[tuple[nn.Module, Gate]]:
    """Every (module, gate) of a popupified model, in module order. Works through DDP/accelerate wrappers."""
    for module in model.modules():
        for gate in gates_of(module).values():
            yield module, gate


def supermask_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters the method trains: the scores (edge_popup, sampled), the weights (dense, or retraining
    after ``fix_masks(train_weights=True)``); nothing for ``random``. Give them to your optimizer.

    Raises:
        ValueError: PEFT adapters were added to the popupified model (``get_peft_model``): PEFT froze the scores,
            so no mask would train.
    """
    check_no_adapters(model)
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p


def check_no_adapters(model: nn.Module) -> None:
    """Refuse a popupified model wrapped with PEFT adapters (``get_peft_model(popupify(m, k), ...)``): PEFT marks
    only its adapters trainable, so the scores stop training and the masks never change."""
    adapters = adapter_modules(model)
    if adapters and any(True for _ in gated_layers(model)):
        raise ValueError(
            f"PEFT adapters were added to a popupified model ({adapters[0]}): PEFT froze the scores, so no mask "
            "would train, and its saves hold only the adapters. supermask_fx does not combine masks with PEFT "
            "adapters: train the popupified model without get_peft_model (its scores are the trainable part, "
            "about 1 bit per weight in a subnetwork file)"
        )


@dataclass(frozen=True)
class LayerStats:
    name: str  # "<module>.<parameter>" as at popupify time
    numel: int
    kept: int
    k: float  # the target fraction


@dataclass(frozen=True)
class MaskStats:
    layers: tuple[LayerStats, ...]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def fraction(self) -> float:
        return self.kept / self.numel

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}} {'weights':>12} {'kept':>12} {'fraction':>8}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}} {layer.numel:>12,} {layer.kept:>12,} {layer.kept / layer.numel:>8.4f}")
        lines.append(f"{'total':<{width}} {self.numel:>12,} {self.kept:>12,} {self.fraction:>8.4f}")
        return "\n".join(lines)


def mask_stats(model: nn.Module) -> MaskStats:
    """Per gated layer: name, number of weights, number kept by the evaluation mask; and totals."""
    layers = []
    with torch.no_grad():
        for module, gate in gated_layers(model):
            mask = gate.current_mask(module)
            layers.append(LayerStats(gate.name, mask.numel(), int(mask.sum()), gate.k))
    if not layers:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    return MaskStats(tuple(layers))


def mask_statistics(model: nn.Module, previous: list[torch.Tensor] | None = None):
    """``({"supermask/kept_fraction": ..., "supermask/mask_changed": ...}, masks)`` for training logs: the kept
    fraction of the evaluation masks over all gated weights, and (given the ``masks`` of an earlier call) the
    fraction of mask bits that flipped since. Returns ``({}, [])`` for a model with no gated layer."""
    with torch.no_grad():
        masks = [gate.current_mask(module).detach().clone() for module, gate in gated_layers(model)]
    if not masks:
        return {}, []
    total = sum(m.numel() for m in masks)
    stats = {"supermask/kept_fraction": sum(int(m.sum()) for m in masks) / total}
    if previous is not None and [m.shape for m in previous] == [m.shape for m in masks]:
        stats["supermask/mask_changed"] = sum(int((a != b).sum()) for a, b in zip(masks, previous)) / total
    return stats, masks


def fix_masks(model: nn.Module, *, train_weights: bool = False) -> nn.Module:
    """Freeze the current masks into ``mask`` buffers (saved in ``state_dict``); the scores stop training.

    With ``train_weights=True`` the gated weights become trainable under the fixed mask: retraining the weights
    of a found subnetwork (the paper's Table 3; with ``method="random"``, of a random subnetwork).
    """
    pairs = list(gated_layers(model))
    _check_fixable(pairs)
    with torch.no_grad():
        masks = [gate.current_mask(module).clone() for module, gate in pairs]
    install_fixed_masks(model, pairs, masks, train_weights=train_weights)
    return model


def _check_fixable(pairs) -> None:
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    for _, gate in pairs:
        if not gate.method.has_mask:
            raise ValueError(f"method={gate.method.name!r} has no mask to fix: its weights are trained directly")


def install_fixed_masks(model: nn.Module, pairs, masks, *, train_weights: bool = False) -> None:
    """``fix_masks`` with the masks given: ``masks[i]`` (bool, shaped like the weight of ``pairs[i]``) becomes
    that layer's ``mask`` buffer, on the weight's device and in its memory format. No mask is selected, so
    ``load_subnetwork`` installs the file's masks without first computing the ones they replace. Each layer's
    method first keeps what its fixed form needs (``Method.fix``), every layer before any buffer is registered,
    so that globally ranked layers still select together."""
    _check_fixable(pairs)
    prepared = []
    for (module, gate), mask in zip(pairs, masks, strict=True):
        weight = module._parameters[gate.param]
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{gate.name}: a mask of shape {tuple(mask.shape)} for a weight {tuple(weight.shape)}")
        if mask.device != weight.device or mask.dtype != torch.bool or mask.stride() != weight.stride():
            mask = torch.empty_like(weight, dtype=torch.bool).copy_(mask)
        prepared.append(mask)
    for (module, gate), mask in zip(pairs, prepared):
        gate.method.fix(gate, module, mask)
    for (module, gate), mask in zip(pairs, prepared):
        module.register_buffer(gate.mask_buffer, mask)
        if gate.scores is not None:
            module._parameters[gate.scores].requires_grad_(False)
    if train_weights:  # retrained weights take any value: packed sign bits become plain tensors again
        unpack_parameters(model, [module._parameters[gate.param] for module, gate in pairs])
    for module, gate in pairs:
        module._parameters[gate.param].requires_grad_(train_weights)
    refresh_masks(model)


def refresh_masks(model: nn.Module) -> None:
    """Forget cached masks; needed only after writing scores or weights through ``tensor.data``."""
    for _, gate in gated_layers(model):
        gate.clear_cache()
        if gate.selector is not None:
            gate.selector.invalidate()


@dataclass(frozen=True)
class Coverage:
    """What ``popupify`` did to every parameter of a model: ``coverage(model)``.

    Attributes:
        path: how the weights were found: ``"fx"`` (torch.fx trace), ``"export"`` (torch.export ATen graph),
            ``"modules"`` (no graph: module types only), ``"recorded"`` (the list stored in a file or checkpoint).
        gated: ``(name, shape, layout)`` per gated weight; layout ``"(out, in)"``, ``"(in, out)"`` or with an
            ``experts x`` prefix for stacks of expert matrices.
        frozen: ``(name, shape, why)`` per other parameter: normalization (scale 1, shift 0), bias, position
            table, class token, ...
        ungated: parameters of 2+ dimensions that look like weights but are not gated (see the warning).
        seconds: time spent capturing the graph at ``popupify``.
    """

    path: str
    gated: tuple[tuple[str, tuple[int, ...], str], ...]
    frozen: tuple[tuple[str, tuple[int, ...], str], ...]
    ungated: tuple[str, ...] = ()
    seconds: float = 0.0

    def __str__(self) -> str:
        rows = [(n, s, f"gated {layout}") for n, s, layout in self.gated] + [(n, s, w) for n, s, w in self.frozen]
        width = max([len(n) for n, _, _ in rows] + [9])
        lines = [f"found by: {self.path}" + (f" ({self.seconds:.1f} s)" if self.seconds else "")]
        lines += [f"{n:<{width}} {str(tuple(s)):>18}  {what}" for n, s, what in rows]
        gated = sum(math.prod(s) for _, s, _ in self.gated)
        total = gated + sum(math.prod(s) for _, s, _ in self.frozen)
        lines.append(f"{len(self.gated)} weights gated ({gated:,} of {total:,} parameter values)")
        if self.ungated:
            lines.append("not gated, look like weights: " + ", ".join(self.ungated))
        return "\n".join(lines)


def coverage(model: nn.Module) -> Coverage:
    """Which parameters ``popupify`` gated (with the layout their fans were read in) and why each other one was
    only frozen. ``print(coverage(model))`` shows the whole model at a glance."""
    pairs = list(gated_layers(model))
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    discovery = next(
        (m.__dict__["_supermask_discovery"] for m in model.modules() if "_supermask_discovery" in m.__dict__), None
    )
    gated_ids = {id(module._parameters[gate.param]) for module, gate in pairs}
    score_ids = {id(module._parameters[gate.scores]) for module, gate in pairs if gate.scores}
    gated = []
    for module, gate in pairs:
        shape = tuple(module._parameters[gate.param].shape)
        layout = "(in, out)" if gate.fan_in_fan_out else "(out, in)"
        if getattr(gate, "fans", None) is not None:
            layout = f"fan-in {gate.fans[0]}, fan-out {gate.fans[1]}"
        if gate.expert_dims:
            layout = f"{' x '.join(map(str, shape[: gate.expert_dims]))} experts x {layout}"
        gated.append((gate.name, shape, layout))
    known = dict(discovery.frozen) if discovery else {}
    known.update({n: NORM_ROLES[kind] for n, kind in (discovery.norms.items() if discovery else ())})
    frozen = []
    seen = set(gated_ids) | score_ids
    for module_name, module in model.named_modules():
        tied = aliases_of(module)
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if id(p) in seen or name in tied:
                continue
            seen.add(id(p))
            frozen.append((full, tuple(p.shape), known.get(full, "frozen at its value")))
    return Coverage(
        discovery.path if discovery else "unknown",
        tuple(gated),
        tuple(frozen),
        tuple(discovery.ungated) if discovery else (),
        discovery.seconds if discovery else 0.0,
    )
