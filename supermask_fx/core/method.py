"""The method protocol: what a method is, and the registry ``popupify`` finds methods in.

A method turns one gated layer's frozen weight ``w`` (shape ``S``) and its tensors (``scores``, shape ``S``, for
methods with scores) into the weight the forward pass uses, and owns that layer's whole life:

===========================  ==================================================================================
``Options``                  a frozen dataclass of the method's settings (defaults on every field); stored in
                             ``PopupConfig.method_options`` and so in files and checkpoints
capabilities                 ``has_scores``, ``trains_scores``, ``trains_weights``, ``uses_topk`` (the layers are
                             ranked by a ``selection.TopKSelector``, per layer or globally), ``has_mask`` (a
                             0/1 mask a file can store and ``fix_masks`` can freeze), ``redraws_weights``
                             (rewrites frozen weights from their distribution: ``init="keep"`` is refused)
``initial_scores(drawn)``    the scores a layer starts with, given the seeded Kaiming-uniform draw
``effective_weight``         ``w_eff`` (``S``), what the forward reads, with the method's gradient
``eval_mask``                the bool mask (``S``) of evaluation, files and ``fix_masks``
``masked(w, mask)``          the weight under a given mask (fixed masks: loaded files, ``fix_masks``): ``w * mask``
``fix(gate, module, mask)``  called by ``install_fixed_masks`` (``fix_masks``, ``load_subnetwork``) for every layer,
                             before any ``mask`` buffer is registered, with the mask (bool, ``S``, on the weight's
                             device) about to be fixed: keep what the fixed form needs beyond the mask (a buffer
                             listed in ``buffer_names``; multicoat: the level of each weight); default nothing
``fixed_weight``             ``fixed_weight(gate, module, w, mask)``: the weight under the layer's fixed ``mask``
                             buffer, what ``Gate.effective`` (differentiable in ``w`` when it requires grad:
                             retraining) and ``Gate.bake`` compute; default ``masked(w, mask)``
``bake``                     what ``materialize`` and the ``state_dict`` store under the weight's name: by default
                             ``masked(w, eval_mask)``, so that baking gives what evaluation computes
``is_baked(stored, w)``      whether a stored tensor is a bake of ``w`` (``load_state_dict``'s check)
``after_step``               what runs after each optimizer step that updated the layer's scores (methods with
                             ``wants_steps``; IteRand's redraws): called once per gate by a global optimizer
                             step post-hook
``attach(gate, module)``     called once per gated layer as ``popupify`` finishes: register the buffers the
                             method keeps on the module (IteRand's ``generation``), so that every
                             ``state_dict`` carries them from the start; refuse a config it cannot run with
``buffer_names(gate)``       the names of those buffers: ``load_state_dict`` brings them in before it checks the
                             weight, ``materialize`` drops them, a subnetwork file stores them only through
                             ``file_tensors``
``weight_of``                ``weight_of(gate, module, drawn)``: the frozen weight ``w`` (``S``, float32, CPU)
                             the layer must hold given the seeded draw ``drawn``; ``drawn`` itself unless the
                             method rewrites frozen weights (IteRand: a function of the seed, the layer's name
                             and its ``generation`` buffer). ``core.popup.expected_weight``, the files'
                             regeneration check and the ``load_state_dict`` check compare with it
``file_tensors``             ``file_tensors(gate, module, mask) -> {key: tensor}``: what a subnetwork file stores
                             for the layer beside its ``mask`` (bool, ``S``), under ``extra/<gate name>/<key>``:
                             what ``weight_of`` needs that the seed does not give (IteRand: the generations of
                             the kept weights); default none
``load_file_tensors``        ``load_file_tensors(gate, module, tensors, mask)``: takes them back at
                             ``load_subnetwork`` (``tensors`` empty for a file without extras) before the
                             weights are checked, and makes the module hold ``weight_of``'s weight
===========================  ==================================================================================

Methods register themselves with ``register_method`` (public: a user's own method is one class and one call);
``popupify`` looks them up by name. The core imports no method: the built-in ones live in ``supermask_fx.methods``
and register when ``supermask_fx`` is imported. A method sees the layer's ``Gate`` (names, ``k``, its
``selection.LayerMask`` for top-k methods, cache slots) and the module holding the tensors.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..selection.kernels import masked_weight

__all__ = ["Method", "NoOptions", "register_method", "method_class", "registered_methods", "options_of"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


class Method:
    """One way of finding (or not finding) a subnetwork; see the module docstring for the protocol.

    Attributes:
        name: the ``PopupConfig.method`` string, unique in the registry.
        Options: the dataclass of its options; ``self.options`` is an instance.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    has_scores: ClassVar[bool] = True
    trains_scores: ClassVar[bool] = True
    trains_weights: ClassVar[bool] = False
    uses_topk: ClassVar[bool] = False
    has_mask: ClassVar[bool] = True
    wants_steps: ClassVar[bool] = False
    redraws_weights: ClassVar[bool] = False  # rewrites frozen weights from their distribution: needs a seeded draw

    def __init__(self, options=None) -> None:
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    # ------------------------------------------------------------------------------------------ options

    @classmethod
    def parse_options(cls, values: dict):
        """``Options`` from ``{name: value}`` (``PopupConfig.method_options``), checked: unknown names and bad
        values raise ``ValueError`` naming them."""
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - fields)
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise ValueError(
                f"method {cls.name!r} has no option {', '.join(map(repr, unknown))} (its options: {known})"
            )
        try:
            options = cls.Options(**values)
        except TypeError as error:
            raise ValueError(f"method {cls.name!r}: {error}") from None
        cls.check_options(options)
        return options

    @classmethod
    def check_options(cls, options) -> None:
        """Raise ``ValueError`` for option values the method cannot run with."""

    # ------------------------------------------------------------------------------------------ a layer's life

    def initial_scores(self, drawn: Tensor) -> Tensor:
        """The scores a layer starts with; ``drawn`` is the seeded Kaiming-uniform draw (float32, CPU)."""
        return drawn

    def effective_weight(self, gate, module: nn.Module, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def eval_mask(self, gate, module: nn.Module) -> Tensor:
        """The bool mask used in evaluation (and stored in a subnetwork file)."""
        raise NotImplementedError

    def masked(self, weight: Tensor, mask: Tensor) -> Tensor:
        """The weight the method computes from ``weight`` under a given bool ``mask`` (a fixed mask: a loaded file,
        ``fix_masks``): ``w * mask`` (differentiable in ``weight`` when it requires grad: retraining)."""
        if weight.requires_grad and torch.is_grad_enabled():
            return weight * mask
        return masked_weight(weight, mask)

    def fix(self, gate, module: nn.Module, mask: Tensor) -> None:
        """Called by ``install_fixed_masks`` for each layer before any layer's ``mask`` buffer is registered (the
        scores still select), with ``mask`` (bool, shaped like the weight, on its device) the mask about to be fixed:
        keep what ``fixed_weight`` needs beyond it (a buffer named in ``buffer_names``). Default: nothing."""

    def fixed_weight(self, gate, module: nn.Module, weight: Tensor, mask: Tensor) -> Tensor:
        """The weight under the layer's fixed ``mask`` buffer (a loaded file, ``fix_masks``), as ``Gate.effective``
        and ``Gate.bake`` compute it (differentiable in ``weight`` when it requires grad: retraining). Default:
        ``masked(weight, mask)``."""
        return self.masked(weight, mask)

    def bake(self, gate, module: nn.Module) -> Tensor:
        """The weight ``materialize`` and the ``state_dict`` store: ``masked(w, eval_mask)`` unless the method
        computes something else in evaluation. Returns a new tensor."""
        weight = module._parameters[gate.param].detach()
        return self.masked(weight, self.eval_mask(gate, module).to(weight.device))

    def after_step(self, gate, module: nn.Module) -> None:
        """Called after each optimizer step that updated this layer's scores (only with ``wants_steps``)."""

    def attach(self, gate, module: nn.Module) -> None:
        """Called once per gated layer as ``popupify`` finishes (its ``state_dict`` hooks are attached): register the
        method's own buffers (``buffer_names``) on ``module``; raise ``ValueError`` for a config it cannot run with."""

    def buffer_names(self, gate) -> tuple[str, ...]:
        """The buffers ``attach`` registered for ``gate`` (names on the module holding the weight)."""
        return ()

    def weight_of(self, gate, module: nn.Module, drawn: Tensor) -> Tensor:
        """The frozen weight the layer must hold (float32, CPU, shaped like the weight), given the seeded draw
        ``drawn`` (``core.popup.expected_weight``): ``drawn`` unless the method rewrites frozen weights."""
        return drawn

    def file_tensors(self, gate, module: nn.Module, mask: Tensor) -> dict[str, Tensor]:
        """Extra tensors a subnetwork file stores for this layer, whose stored ``mask`` (bool, shaped like the
        weight) is given: what ``weight_of`` needs beyond the seed. Default: none."""
        return {}

    def load_file_tensors(self, gate, module: nn.Module, tensors: dict[str, Tensor], mask: Tensor) -> None:
        """Take back what ``file_tensors`` stored (``tensors``: empty for a file without extras) before
        ``load_subnetwork`` checks the weights, and make ``module`` hold ``weight_of``'s weight. Raise
        ``ValueError`` for tensors that do not fit (the loader names the file)."""

    def is_baked(self, stored: Tensor, weight: Tensor) -> bool:
        """Whether ``stored`` can be a ``bake`` of the frozen ``weight`` (checked when a ``state_dict`` loads: a
        checkpoint of other weights is refused). Default: ``weight`` times a 0/1 mask."""
        return torch.equal(stored, torch.where(stored != 0, weight, torch.zeros_like(weight)))


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make ``cls`` available as ``popupify(model, k, method=cls.name)``; usable as a class decorator. The name
    must be new, or name ``cls`` again (re-registering the same class is a no-op)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a subclass of supermask_fx.methods.Method, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a class attribute name = '<method name>'")
    if not (dataclasses.is_dataclass(cls.Options) and isinstance(cls.Options, type)):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass type")
    held = _REGISTRY.get(name)
    if held is not None and held is not cls and held.__qualname__ != cls.__qualname__:
        raise ValueError(f"a method named {name!r} is registered already ({held.__module__}.{held.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)} (or register_method yours)")
    return cls


def registered_methods() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def options_of(options) -> tuple[str, dict]:
    """``(method name, {option: value})`` of an ``Options`` instance of a registered method (the typed spelling
    ``popupify(model, k, method=SampledOptions(eval_rule="sample"))``); only the fields that differ from their
    defaults, so a file states what was chosen."""
    for name, cls in _REGISTRY.items():
        if type(options) is cls.Options and cls.Options is not NoOptions:
            defaults = cls.Options()
            chosen = {
                f.name: getattr(options, f.name)
                for f in dataclasses.fields(options)
                if getattr(options, f.name) != getattr(defaults, f.name)
            }
            return name, chosen
    raise ValueError(f"{options!r} is not the Options of a registered method with options")
