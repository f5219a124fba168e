"""``RankedLayer``: a gated layer as a ``TopKSelector`` sees it."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["RankedLayer"]


class RankedLayer(NamedTuple):
    """A gated layer as its ``selection.TopKSelector`` sees it: the tensors it ranks, and whether a fixed mask
    replaces the selected one (then it is not selected ahead of its own read). ``gate`` is the layer's
    ``core.gate.Gate`` (its ``scores``, ``param`` and ``mask_buffer`` names)."""

    module: nn.Module
    gate: object

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(scores, weight): the current Parameters."""
        parameters = self.module._parameters
        return parameters[self.gate.scores], parameters[self.gate.param]

    def frozen(self) -> bool:
        return self.module._buffers.get(self.gate.mask_buffer) is not None
