"""The supermask of Zhou et al. (2019), as the edge-popup paper's baseline.

Training forward: ``p = sigmoid(s)``, ``m ~ Bernoulli(p)`` drawn afresh at every read of the weight,
``w_eff = w * m``. Backward: straight through the sampling, so ``dL/ds = sigmoid'(s) * w * dL/dw_eff``.

Two options make it the method of Zhou et al.'s code (uber-research/deconstructing-lottery-tickets,
``masked_networks.py``, ``train_supermask.py``); both default to the project's earlier behaviour:

* ``eval_rule``: what ``module.eval()`` uses.

  - ``"threshold"`` (default): the deterministic mask ``p >= 0.5``, i.e. ``s >= 0``.
  - ``"sample"``: a fresh Bernoulli sample at every read, as in training. Zhou et al. evaluate this way (their
    ``get_effective_mask``: "during test ... actually, sample them too"; the final test accuracy is the mean
    over 10 evaluations, each with its own sample), and so does the edge-popup authors' ``SampleSubnetConv``
    (allenai/hidden-networks ``utils/conv_type.py``, which samples in every forward, training or not).

* ``rescale``: Zhou et al.'s *dynamic weight rescaling* (``--dynamic_scaling``): each layer's masked weight is
  multiplied by ``numel / kept``, the ratio of the layer's weights to the ones its current mask keeps, at every
  forward. In training ``kept`` is the sum of the straight-through mask (value ``m``, gradient ``sigmoid'(s)``),
  so the gradient also flows through the multiplier, as in their TensorFlow graph. Under ``"threshold"``
  evaluation the multiplier uses the threshold mask. Pair it with their weights,
  ``init="xavier_signed_constant"`` (a Glorot-std signed constant): at p = 0.5 the multiplier (about 2) doubles
  each layer's output variance relative to the unmasked layer, which Glorot-std weights absorb and Kaiming-std
  weights do not (a 5-layer conv net then starts with logits about 5 times too large and its scores saturate).

``mask_stats``, ``fix_masks`` and subnetwork files use the threshold mask (one deterministic mask is what a file
can hold; with ``eval_rule="sample"`` it is the most likely mask, not a sample). ``materialize`` and the
``state_dict`` bake what threshold evaluation computes: the masked weight times the multiplier with ``rescale``.

Choose them at ``popupify(model, k, method=SampledOptions(eval_rule="sample", rescale=True, score_init=0.0))`` or
``popupify(model, k, method="sampled", method_options=ZHOU_ET_AL)`` (stored with the rest of the config in
checkpoints and files), or change them on a popupified model with :func:`configure`.
``k`` has no effect on this method beyond ``scaled`` inits: the kept fraction is learned.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.masks import gated_layers
from ..core.method import Method, register_method
from ..selection import version_key
from ..selection.kernels import masked_weight

__all__ = ["EVAL_RULES", "ZHOU_ET_AL", "Sampled", "SampledOptions", "configure", "options"]

EVAL_RULES = ("threshold", "sample")
#: The settings of Zhou et al.'s code: sampled evaluation, dynamic weight rescaling, initial scores 0 (p = 0.5;
#: their ``--sigmoid_bias`` default). Their weights are ``popupify(..., init="xavier_signed_constant")``.
ZHOU_ET_AL = {"eval_rule": "sample", "rescale": True, "score_init": 0.0}


@dataclasses.dataclass(frozen=True)
class SampledOptions:
    """Options of ``method="sampled"`` (see the module docstring).

    Attributes:
        eval_rule: ``"threshold"`` (``s >= 0`` in evaluation) or ``"sample"`` (a fresh Bernoulli mask, as Zhou et al.).
        rescale: dynamic weight rescaling, ``numel / kept`` per layer.
        score_init: a constant for the initial scores (Zhou et al.: 0), or ``None`` for the Kaiming-uniform draw.
    """

    eval_rule: str = "threshold"
    rescale: bool = False
    score_init: float | None = None


@register_method
class Sampled(Method):
    name = "sampled"
    Options = SampledOptions

    @classmethod
    def check_options(cls, options: SampledOptions) -> None:
        if options.eval_rule not in EVAL_RULES:
            raise ValueError(f"unknown eval_rule {options.eval_rule!r}; choose one of {', '.join(EVAL_RULES)}")
        if not isinstance(options.rescale, bool):
            raise ValueError(f"rescale={options.rescale!r} must be True or False")
        init = options.score_init
        if init is not None and (isinstance(init, bool) or not isinstance(init, (int, float))):
            raise ValueError(f"score_init={init!r} must be a number or None")

    def __init__(self, options: SampledOptions | None = None) -> None:
        super().__init__(options)
        self.check_options(self.options)

    @property
    def eval_rule(self) -> str:
        return self.options.eval_rule

    @property
    def rescale(self) -> bool:
        return self.options.rescale

    def initial_scores(self, drawn: Tensor) -> Tensor:
        if self.options.score_init is None:
            return drawn
        return drawn.fill_(float(self.options.score_init))  # Zhou et al.: every keep probability 0.5 at the start

    def bake(self, gate, module: nn.Module) -> Tensor:
        """What threshold evaluation computes: ``w * (s >= 0)``, times ``numel / kept`` with ``rescale``."""
        self._refresh_eval(gate, module._parameters[gate.scores], module._parameters[gate.param])
        return gate.effective_buffer.clone()

    def masked(self, weight: Tensor, mask: Tensor) -> Tensor:
        """``w * mask``, times ``numel / kept`` with ``rescale`` (a loaded file computes what evaluation did)."""
        out = super().masked(weight, mask)
        return out * (mask.numel() / max(int(mask.sum()), 1)) if self.rescale else out

    def is_baked(self, stored: Tensor, weight: Tensor) -> bool:
        """``weight * mask``, or with ``rescale`` also ``weight * mask * numel / kept`` (state_dicts saved before
        the bake followed the multiplier hold the unscaled form; both load)."""
        if super().is_baked(stored, weight) or not self.rescale:
            return super().is_baked(stored, weight)
        kept = stored != 0
        scale = stored.numel() / max(int(kept.sum()), 1)
        return torch.equal(stored, torch.where(kept, weight * scale, torch.zeros_like(weight)))

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        scores = module._parameters[gate.scores]
        if module.training or self.eval_rule == "sample":
            return self._sampled(scores, weight)
        self._refresh_eval(gate, scores, weight)
        return gate.effective_buffer

    def _sampled(self, scores: Tensor, weight: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (scores.requires_grad or weight.requires_grad)
        if not self.rescale:
            sample = torch.rand_like(scores) < torch.sigmoid(scores.detach())
            return SampledStraightThrough.apply(scores, weight, sample) if grad else weight * sample
        if not grad:
            sample = (torch.rand_like(scores) < torch.sigmoid(scores)).to(weight.dtype)
            return weight * sample * (sample.numel() / sample.sum().clamp_min(1.0))
        # Zhou et al.: mask = sample + p - stop_gradient(p); multiplier = numel / sum(mask); w * mask * multiplier
        p = torch.sigmoid(scores)
        sample = (torch.rand_like(scores) < p.detach()).to(weight.dtype)
        mask = sample + (p - p.detach())
        return weight * mask * (mask.numel() / mask.sum().clamp_min(1.0))

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        self._refresh_eval(gate, module._parameters[gate.scores], module._parameters[gate.param])
        return gate.mask

    def _refresh_eval(self, gate, scores: Tensor, weight: Tensor) -> None:
        key = (version_key(scores), version_key(weight), self.rescale)
        if key == gate.key:
            return
        with torch.inference_mode(False), torch.no_grad():
            gate.ensure_buffers(weight)
            torch.ge(scores.detach(), 0, out=gate.mask)
            masked_weight(weight.detach(), gate.mask, gate.effective_buffer)
            if self.rescale:
                gate.effective_buffer.mul_(gate.mask.numel() / max(int(gate.mask.sum()), 1))
        gate.key = key


def configure(
    model: nn.Module,
    *,
    eval_rule: str | None = None,
    rescale: bool | None = None,
    score_init: float | None = None,
) -> nn.Module:
    """Set the options of every ``method="sampled"`` layer of a popupified ``model``; ``None`` keeps a setting.

    ``score_init``: fill the scores with this constant (Zhou et al. start at 0: every keep probability 0.5; the
    project's default scores are Kaiming-uniform, ``|s| <= 1/sqrt(fan_in)``, so ``p`` within 0.5 +- 0.025 for
    fan-in 100). ``configure(model, **ZHOU_ET_AL)`` gives Zhou et al.'s method. Returns ``model``.
    """
    replaced: dict[int, Sampled] = {}
    configs: dict = {}
    found = False
    for module, gate in gated_layers(model):
        if isinstance(gate.method, Sampled):
            found = True
            old = gate.method
            if id(old) not in replaced:
                chosen = dataclasses.replace(
                    old.options,
                    eval_rule=old.eval_rule if eval_rule is None else eval_rule,
                    rescale=old.rescale if rescale is None else rescale,
                    score_init=old.options.score_init if score_init is None else float(score_init),
                )
                replaced[id(old)] = Sampled(chosen)
            gate.method = replaced[id(old)]
            if gate.config not in configs:  # the record in state_dicts and files says what runs
                chosen = {"eval_rule": gate.method.eval_rule, "rescale": gate.method.rescale}
                previous = dict(gate.config.method_options)
                if score_init is not None or "score_init" in previous:
                    chosen["score_init"] = float(score_init) if score_init is not None else previous["score_init"]
                configs[gate.config] = dataclasses.replace(gate.config, method_options=chosen)
            gate.config = configs[gate.config]
            gate.clear_cache()
            if score_init is not None:
                with torch.no_grad():
                    module._parameters[gate.scores].fill_(float(score_init))
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer popupified with method='sampled'")
    return model


def options(model: nn.Module) -> dict[str, object]:
    """``{"eval_rule": ..., "rescale": ...}`` of the sampled layers of ``model`` (they share one setting)."""
    for _, gate in gated_layers(model):
        if isinstance(gate.method, Sampled):
            return {"eval_rule": gate.method.eval_rule, "rescale": gate.method.rescale}
    raise ValueError(f"{type(model).__name__} has no layer popupified with method='sampled'")


class SampledStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, weight, sample):
        ctx.save_for_backward(scores, weight, sample)
        return weight * sample

    @staticmethod
    def backward(ctx, grad):
        scores, weight, sample = ctx.saved_tensors
        grad_scores = grad_weight = None
        if ctx.needs_input_grad[0]:
            p = torch.sigmoid(scores)
            grad_scores = grad * weight * p * (1 - p)
        if ctx.needs_input_grad[1]:
            grad_weight = grad * sample
        return grad_scores, grad_weight, None
