"""Bookkeeping over a popupified model: which layers are gated, what they keep, fixing masks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .gate import Gate, gates_of

__all__ = ["gated_layers", "supermask_parameters", "mask_stats", "fix_masks", "refresh_masks", "MaskStats"]


def gated_layers(model: nn.Module) -> Iterator[tuple[nn.Module, Gate]]:
    """Every (module, gate) of a popupified model, in module order. Works through DDP/accelerate wrappers."""
    for module in model.modules():
        for gate in gates_of(module).values():
            yield module, gate


def supermask_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters the method trains: the scores (edge_popup, sampled), the weights (dense, or retraining
    after ``fix_masks(train_weights=True)``); nothing for ``random``. Give them to your optimizer."""
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p


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


def fix_masks(model: nn.Module, *, train_weights: bool = False) -> nn.Module:
    """Freeze the current masks into ``mask`` buffers (saved in ``state_dict``); the scores stop training.

    With ``train_weights=True`` the gated weights become trainable under the fixed mask: retraining the weights
    of a found subnetwork (the paper's Table 3; with ``method="random"``, of a random subnetwork).
    """
    pairs = list(gated_layers(model))
    if not pairs:
        raise ValueError("the model has no gated layer: call supermask_fx.popupify(model, k) first")
    with torch.no_grad():
        masks = [gate.current_mask(module).clone() for module, gate in pairs]
    for (module, gate), mask in zip(pairs, masks):
        if gate.method.name == "dense":
            raise ValueError("method='dense' has no mask to fix: its weights are trained directly")
        module.register_buffer(gate.mask_buffer, mask)
        if gate.scores is not None:
            module._parameters[gate.scores].requires_grad_(False)
        module._parameters[gate.param].requires_grad_(train_weights)
    refresh_masks(model)
    return model


def refresh_masks(model: nn.Module) -> None:
    """Forget cached masks; needed only after writing scores or weights through ``tensor.data``."""
    for _, gate in gated_layers(model):
        gate.clear_cache()
        if gate.selector is not None:
            gate.selector.invalidate()
