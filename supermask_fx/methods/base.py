"""What a method is: the rule that turns a layer's (weight, scores) into the weight the forward uses."""

from __future__ import annotations

from torch import Tensor, nn


class Method:
    """One way of finding (or not finding) a subnetwork.

    Attributes:
        name: the ``PopupConfig.method`` string.
        has_scores: whether ``popupify`` gives gated layers a score Parameter.
        trains_scores: whether the scores require grad.
        trains_weights: whether the weights require grad.
        uses_topk: whether the mask is a top-k of |scores| (so layers are grouped under a ``TopKSelector``).
    """

    name: str
    has_scores = True
    trains_scores = True
    trains_weights = False
    uses_topk = False

    OPTIONS: dict[str, object] = {}  # option name -> default (``PopupConfig.method_options``)

    @classmethod
    def check_options(cls, options: dict) -> None:
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(cls.OPTIONS) or "none"
            raise ValueError(
                f"method {cls.name!r} has no option {', '.join(map(repr, unknown))} (its options: {known})"
            )

    @classmethod
    def from_options(cls, options: dict) -> Method:
        """The method with ``PopupConfig.method_options`` applied (checked)."""
        cls.check_options(options)
        return cls()

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        """The bool mask used in evaluation (and stored in a subnetwork file)."""
        raise NotImplementedError
