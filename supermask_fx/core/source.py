"""Where a gated layer's frozen weight comes from: a seeded draw, or the weight the model already holds.

A source answers two questions for each gated weight ``w`` (shape ``S``):

* ``weight(name, shape, k, layout, current)``: the tensor ``w`` must hold after ``popupify`` (``None``: leave it as
  it is), used by ``popupify`` and by the files' check that a model holds the weights a file was made on; with
  ``role`` another draw of the same distribution (IteRand's redraws: role ``rerand<r>``);
* ``describe()``: what a mismatch message calls it (``"seed 3"``, ``"the base weights"``).

``SeededDraw`` (every ``init`` of ``core.initializers``): ``w`` is drawn from the distribution with the seed, a
function of (seed, layer name, role) only, so a file stores the seed and regenerates ``w`` (``uniform`` draws
U[0, 1) numbers the same way, for a method's own choices). ``KeptWeights``
(``init="keep"``): ``w`` is the model's own tensor, bit for bit (a pretrained model's weights); a file cannot
regenerate it and stores a SHA-256 fingerprint of each layer's ``w`` instead, which a load compares with the
model it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .initializers import draw_weight, generator_for, weight_std

__all__ = ["SeededDraw", "KeptWeights", "KEEP"]

KEEP = "keep"  # the ``init`` of kept weights


@dataclass(frozen=True)
class SeededDraw:
    """Weights drawn from ``init`` with ``seed`` (see ``core.initializers`` for the distributions and fans)."""

    init: str
    scaled: bool
    seed: int
    mode: str
    nonlinearity: str

    regenerates = True

    def weight(
        self,
        name: str,
        shape: tuple[int, ...],
        k: float,
        layout=None,
        current=None,
        padding_idx=None,
        role: str = "weight",
        out: Tensor | None = None,
    ) -> Tensor:
        """The float32 CPU weight of the gated parameter ``name`` (``"<module>.<param>"``), its fans read from
        ``layout`` (a ``WeightRef`` or ``Gate``: ``fan_in_fan_out``, ``expert_dims``, ``fans``); an embedding's
        ``padding_idx`` row (given, or the layout's) stays zero, as ``nn.Embedding`` keeps it. ``role`` names the
        draw: ``"weight"`` is the one ``popupify`` writes; any other gives an independent draw of the same
        distribution and standard deviation (IteRand's redraws). ``out``: a contiguous float32 CPU tensor to draw
        into in place (the same values; ``popupify`` draws into the model's own weight)."""
        std = weight_std(
            shape,
            self.init,
            mode=self.mode,
            nonlinearity=self.nonlinearity,
            k=k,
            scaled=self.scaled,
            fan_in_fan_out=getattr(layout, "fan_in_fan_out", False),
            expert_dims=getattr(layout, "expert_dims", 0),
            given_fans=getattr(layout, "fans", None),
        )
        weight = draw_weight(shape, self.init, std=std, generator=generator_for(self.seed, name, role), out=out)
        if padding_idx is None:
            padding_idx = getattr(layout, "padding_idx", None)
        if padding_idx is not None:
            weight[padding_idx] = 0.0
        return weight

    def uniform(self, name: str, shape: tuple[int, ...], role: str) -> Tensor:
        """A float32 CPU tensor of U[0, 1) numbers, a function of (seed, ``name``, ``role``) only (a method's own
        random choices, e.g. which pruned weights IteRand redraws)."""
        return torch.rand(shape, generator=generator_for(self.seed, name, role))

    def describe(self) -> str:
        return f"seed {self.seed}"


@dataclass(frozen=True)
class KeptWeights:
    """The model's own weights, kept bit for bit (``init="keep"``)."""

    regenerates = False

    def weight(
        self,
        name: str,
        shape: tuple[int, ...],
        k: float,
        layout=None,
        current=None,
        padding_idx=None,
        role: str = "weight",
    ) -> Tensor | None:
        """``current`` itself: a kept weight is what the model holds (``None`` when not given: nothing to write).
        There is no distribution to draw another ``role`` from: asking for one is a ``ValueError``."""
        if role != "weight":
            raise ValueError(
                f"{name}: kept weights (init='keep') have no distribution to draw {role!r} from; popupify with a "
                "distribution (init='signed_constant', 'kaiming_normal', ...) for a method that redraws weights"
            )
        return current

    def describe(self) -> str:
        return "the base weights"
