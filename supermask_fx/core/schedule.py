"""A k warm-up: keep every weight at first, then less, down to the ``k`` of ``popupify`` (biprop's
``--prune_rate_epoch``, Diffenderfer & Kailkhura 2021).

With target ``K`` (popupify's ``k``), warm-up length ``E`` epochs and ``x = min(epoch / E, 1)`` (``epoch`` may be
fractional: ``optimizer steps done / steps per epoch``)::

    k(epoch) = K + (1 - K) * (1 - f(x)),    f(x) = x  ("linear")  or  (1 - cos(pi x)) / 2  ("cosine")

so ``k(0) = 1`` (nothing masked) and ``k(epoch) = K`` from epoch ``E`` on. ``KWarmup.apply(model, epoch)`` calls
``set_k`` when the value changes (the scores are untouched; the next read selects the top-k at the new ``k``);
call it before each optimizer step's forward. It is a pure function of ``epoch``, and ``set_k`` is recorded in the
``state_dict``, so a run resumed at any step computes the same ``k`` as the uninterrupted one. The engine
(``TrainConfig(k_warmup_epochs=...)``), ``SupermaskCallback`` of the Hugging Face and Lightning integrations take it.
Layers matched by ``layer_k`` keep theirs; with ``scope="global"`` the global count follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .heads import set_k
from .masks import gated_layers

__all__ = ["KWarmup", "warmup_k"]

SHAPES = ("linear", "cosine")


def warmup_k(target: float, epoch: float, epochs: float, shape: str = "linear") -> float:
    """``k(epoch)`` of the module docstring."""
    if epochs <= 0 or epoch >= epochs:
        return float(target)
    x = max(0.0, float(epoch) / float(epochs))
    done = x if shape == "linear" else (1.0 - math.cos(math.pi * x)) / 2.0
    return float(target) + (1.0 - float(target)) * (1.0 - done)


@dataclass(frozen=True)
class KWarmup:
    """``k`` from 1 to popupify's ``k`` over the first ``epochs`` epochs (``shape``: ``"linear"`` or
    ``"cosine"``), then constant."""

    epochs: float
    shape: str = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, (int, float)) or isinstance(self.epochs, bool) or not self.epochs >= 0:
            raise ValueError(f"KWarmup(epochs={self.epochs!r}): give a number of epochs >= 0 (0: no warm-up)")
        if self.shape not in SHAPES:
            raise ValueError(f"KWarmup(shape={self.shape!r}): choose one of {', '.join(SHAPES)}")

    def k_at(self, target: float, epoch: float) -> float:
        return warmup_k(target, epoch, self.epochs, self.shape)

    def apply(self, model: nn.Module, epoch: float) -> float:
        """Set the active mask's ``k`` for ``epoch`` (fractional) and return it."""
        gate = next((g for _, g in gated_layers(model)), None)
        if gate is None:
            raise ValueError("KWarmup.apply: the model has no gated layer: call supermask_fx.popupify(model, k) first")
        k = self.k_at(gate.config.k, epoch)
        current = gate.heads.get(gate.active)
        if (gate.config.k if current is None else current) != k:
            set_k(model, k)
        return k
