"""Gating one parameter of a module: the mechanism every method shares.

A gated module keeps its frozen random weight in ``module._parameters[name]`` (so ``state_dict`` keys and
``named_parameters`` are unchanged) and gains a score Parameter (``scores`` for ``weight``, ``<stem>_scores``
otherwise). Its class is swapped for a small subclass (``SupermaskConv2d`` for ``nn.Conv2d``: ``isinstance``
still holds) in which reading the attribute returns the **effective** weight ``weight * mask`` that the
method defines. Every way a forward reads the weight sees it: ``nn.Conv2d.forward``, ``F.linear(x, self.w)``,
``nn.MultiheadAttention``'s fused kernels, torchvision's ``shifted_window_attention(..., self.qkv.weight)``.
This is ``torch.nn.utils.parametrize``'s idea with the original names kept. Gated ``nn.Linear`` and
``nn.Conv{1,2,3}d`` also rebuild ``weight * mask`` in the backward instead of saving it (``core.recompute``).
Under ``torch.compile`` the read runs outside the graph (one graph break per gated parameter, no recompilation
from step to step) and the graph receives the effective weight.

A Parameter tied to other modules (a language model's token embedding and output layer) is gated in one module;
the others get a subclass too, whose attribute reads the owner's effective weight (``alias_parameter``): one mask
per weight, wherever it is used.

The gate knows masks, not how they are computed: a top-k method asks its ``selection.LayerMask`` for the mask of
the layer (``gate.layer_mask``; bits, bands, hints and batch plans stay in ``supermask_fx.selection``). Every cache
of a mask or of ``weight * mask`` (the selection's, a fixed mask's, the sampled method's threshold mask) is keyed
by one scheme, the autograd version counters of the scores, the weight and a fixed mask
(``selection.version_key``, bumped by every optimizer step and ``load_state_dict``), so evaluation and gradient
accumulation never recompute masks. Fused optimizers (``torch.optim.AdamW(fused=True)``, the Hugging Face
``Trainer``'s default ``adamw_torch_fused``) and optimizers from other packages write the parameters without
bumping the counters; ``watch_optimizers`` (a global optimizer step post-hook, registered by the first ``popupify``)
bumps them after such a step, so a mask never outlives the scores it was computed from. Writing through
``tensor.data`` bypasses the counters too: call ``supermask_fx.refresh_masks(model)`` after doing that.
"""

from __future__ import annotations

import copyreg
import warnings
import weakref

import torch
from torch import Tensor, nn

from ..graph.discover import WeightRef
from ..selection import version_key
from ..selection.backend import is_shard
from ..selection.kernels import buffer_like
from . import recompute
from .packed import PackedSigns

__all__ = [
    "Gate",
    "gated_class",
    "is_gated",
    "gates_of",
    "aliases_of",
    "scores_name",
    "mask_name",
    "watch_optimizers",
    "watch_fsdp",
    "follow_steps",
]


_step_hook = None


def watch_optimizers() -> None:
    """Register, once per process, the global optimizer step post-hook that bumps the autograd version counter of
    every parameter an optimizer step may have written without bumping it: all parameters of a fused param group
    (``fused=True``) and of optimizers outside ``torch.optim`` (bitsandbytes, apex, ...). Parameters of other
    ``torch.optim`` steps are left alone (their in-place ops bump the counters already), so the usual step costs
    nothing more. The counter only says that the tensor changed, which it did."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_bump_after_step)


_fsdp_hook = None


def watch_fsdp() -> None:
    """Register, once per process, a global module forward pre-hook that forgets the cached masks of the gated layers
    inside an FSDP2 unit (``fully_shard``) before its forward. FSDP gathers the updated shards into the same
    unsharded storage without bumping the autograd version counters (``_unsafe_preserve_version_counter``), so the
    cache key alone would keep last step's masks; the masks are selected again from the gathered scores. The hook
    returns at once for any other module (one class-name test)."""
    global _fsdp_hook
    if _fsdp_hook is None:
        from torch.nn.modules.module import register_module_forward_pre_hook

        _fsdp_hook = register_module_forward_pre_hook(_forget_under_fsdp)


def _forget_under_fsdp(module: nn.Module, args) -> None:
    if not type(module).__name__.startswith("FSDP"):
        return
    for inner in module.modules():
        for gate in gates_of(inner).values():
            if gate.method.wants_steps:  # its after_step follows the Parameters popupify made, which FSDP replaced
                raise ValueError(
                    f"method={gate.method.name!r} changes {gate.name} after every optimizer step, and FSDP holds that "
                    "layer sharded in Parameters of its own, which the method cannot follow (IteRand would silently "
                    "train as edge-popup). Train it with DDP (each process holds whole layers) or in one process"
                )
            if gate.config is not None and gate.config.weight_storage == "bits":
                _warn_bits_under_fsdp()
            gate.clear_cache()


_warned_bits = False


def _warn_bits_under_fsdp() -> None:
    global _warned_bits
    if not _warned_bits:
        _warned_bits = True
        warnings.warn(
            "FSDP holds the frozen weights as shards of float tensors, not as the sign bits of weight_storage='bits' "
            "(the default for the signed-constant inits): the values and masks are the same, and the memory is "
            "FSDP's, 32 bits per weight divided among the ranks. DDP or one process holds one bit per weight; "
            "weight_storage='dense' silences this",
            stacklevel=3,
        )


# id(scores Parameter) -> (the Parameter, module, gated parameter's name), the first two weakly (the module holds
# its gate, and the gate the selection that holds the module: a strong reference here kept every such model alive),
# for the layers whose method runs after optimizer steps (``Method.after_step``); keyed by id (tensors compare by
# value), checked by identity
_STEPPED: dict[int, tuple] = {}


def follow_steps(module: nn.Module, gate: Gate) -> None:
    """Call ``gate.method.after_step(gate, module)`` after every optimizer step that updates the layer's scores."""
    scores = module._parameters[gate.scores]
    for key in [k for k, (p, m, _) in _STEPPED.items() if p() is None or m() is None]:  # layers gone
        del _STEPPED[key]
    _STEPPED[id(scores)] = (weakref.ref(scores), weakref.ref(module), gate.param)


def _bump_after_step(optimizer, args, kwargs) -> None:
    in_torch = type(optimizer).__module__.startswith("torch.optim")
    for group in optimizer.param_groups:
        if in_torch and not group.get("fused"):
            continue
        params = [p for p in group["params"] if isinstance(p, Tensor)]
        if params:
            torch.autograd.graph.increment_version(params)
    if _STEPPED:
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = _STEPPED.get(id(p)) if p.grad is not None else None
                module = entry[1]() if entry is not None and entry[0]() is p else None
                gate = gates_of(module).get(entry[2]) if module is not None else None
                if gate is not None:
                    gate.method.after_step(gate, module)


def scores_name(param: str) -> str:
    """``weight`` -> ``scores``; ``in_proj_weight`` -> ``in_proj_scores``; ``w`` -> ``w_scores``."""
    if param == "weight":
        return "scores"
    return (param[: -len("_weight")] if param.endswith("_weight") else param) + "_scores"


def mask_name(param: str) -> str:
    """Name of the buffer that holds a fixed mask: ``weight`` -> ``mask``; ``in_proj_weight`` -> ``in_proj_mask``."""
    return scores_name(param)[: -len("scores")] + "mask"


class Gate:
    """The state of one gated parameter: its names, its method and its caches.

    Three kinds of attribute: *names* (``layer``, ``param``, ``scores``, ``mask_buffer``: strings that locate tensors
    on the module, which holds them); *settings* (``config``: the one ``PopupConfig`` object of the ``popupify``
    call, shared by every gate of the model and kept shared by ``deepcopy``, pickling and ``restore``; ``method``,
    ``k``, the layout); *caches* (``key``, ``mask``, ``effective_buffer``: tensors derived from the module's, never
    saved). ``layer`` and ``param`` are ``WeightRef.module`` and ``WeightRef.param`` of the weight's ``ref()``.

    Attributes:
        layer: qualified name of the module at ``popupify`` time (``"layer1.0.conv1"``).
        param: name of the gated parameter on that module (``"weight"``).
        scores: name of the score parameter, ``None`` for methods without scores.
        k: fraction kept in this layer (for stats; the selector owns the exact count).
        method: the ``Method`` that turns (weight, scores) into the effective weight.
        selector: the ``selection.TopKSelector`` of the layers ranked together, for top-k methods.
        layer_mask: this layer's ``selection.LayerMask`` in that selector (the mask a top-k method reads).
        config: the ``PopupConfig`` of the ``popupify`` call.
        fan_in_fan_out: the weight is stored ``(..., in, out)`` (GPT-2's ``Conv1D``); its initialization depends
            on it.
        expert_dims: leading dimensions that index separate matrices (mixture-of-experts tensors): each matrix is
            drawn with its own fans and ranked as a layer of its own (``scope="layer"``).
        fans: ``(fan_in, fan_out)`` read off the graph where the weight's shape does not tell them (an einsum's
            contracted dimensions, a weight joined by ``cat``), else ``None``.
        padding_idx: the row an embedding keeps at zero (``nn.Embedding(padding_idx=...)``), or ``None``.
        key, mask, effective_buffer: the cache of a fixed mask's ``weight * mask``, and of methods that keep their
            own mask (``sampled``): what it was computed from, the bool mask, ``weight * mask``.
    """

    def __init__(
        self, layer: str, param: str, method, k: float, selector=None, config=None, layout=None, padding_idx=None
    ) -> None:
        self.config = config  # the PopupConfig that made this gate
        self.padding_idx = padding_idx  # an embedding's zero row, kept zero when the weight is drawn
        self.layer = layer
        self.param = param
        self.fan_in_fan_out = bool(getattr(layout, "fan_in_fan_out", False))
        self.expert_dims = int(getattr(layout, "expert_dims", 0))
        fans = getattr(layout, "fans", None)
        self.fans = (int(fans[0]), int(fans[1])) if fans is not None else None
        self.scores = scores_name(param) if method.has_scores else None
        self.mask_buffer = mask_name(param)
        self.method = method
        self.k = k  # under the active mask head (core.heads)
        self.k_popupify = k
        self.heads: dict[str, float | None] = {"default": None}  # mask head -> its k (None: popupify's)
        self.active = "default"
        self.fresh: set[str] = set()  # heads never active yet
        self.selector = selector
        self.layer_mask = None
        self.clear_cache()

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.param}" if self.layer else self.param

    def ref(self, module_name: str | None = None) -> WeightRef:
        """The gated weight and its layout as a ``WeightRef`` (under ``module_name``, default the name at
        ``popupify`` time): what records and files store of it."""
        layer = self.layer if module_name is None else module_name
        return WeightRef(layer, self.param, self.fan_in_fan_out, self.expert_dims, getattr(self, "fans", None))

    def clear_cache(self) -> None:
        """Forget every cached mask and ``weight * mask`` of this gate (the selection's too)."""
        self.key = None  # what the cached tensors were computed from
        self.effective_buffer: Tensor | None = None  # weight * mask
        self.mask: Tensor | None = None
        if self.layer_mask is not None:
            self.layer_mask.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "key": None, "effective_buffer": None, "mask": None, "_handed": None}

    def __setstate__(self, state: dict) -> None:  # gates pickled before mask heads existed
        state.setdefault("k_popupify", state.get("k"))
        state.setdefault("heads", {"default": None})
        state.setdefault("active", "default")
        state.setdefault("fresh", set())
        self.__dict__.update(state)

    def effective(self, module: nn.Module) -> Tensor:
        """The weight the forward pass uses."""
        weight = module._parameters[self.param]
        if isinstance(weight, PackedSigns) and torch.is_grad_enabled() and not weight.requires_grad:
            # An alias (same bits, same version counter) for the graph to save: autograd would otherwise hold the
            # Parameter itself, and ``model.to(...)``, which swaps a tensor subclass in place, refuses a Parameter
            # that a live graph holds (no graph, no alias: an alias made under inference_mode is refused)
            weight = weight.detach()
        fixed = module._buffers.get(self.mask_buffer)
        if fixed is None:
            return self.method.effective_weight(self, module, weight)
        if torch.is_grad_enabled() and weight.requires_grad:
            return self.method.fixed_weight(self, module, weight, fixed)
        key = (version_key(weight), version_key(fixed))
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad():
                self.effective_buffer = buffer_like(self.effective_buffer, weight)
                self.effective_buffer.copy_(self.method.fixed_weight(self, module, weight.detach(), fixed))
                self.mask = fixed
            self.key = key
        return self.effective_buffer

    def bake(self, module: nn.Module) -> Tensor:
        """The weight ``materialize`` and the ``state_dict`` store (a new tensor): with a fixed mask the method's
        weight for that mask (``Method.fixed_weight``), else what the method bakes (``Method.bake``)."""
        fixed = module._buffers.get(self.mask_buffer)
        weight = module._parameters[self.param].detach()
        if fixed is not None:
            return self.method.fixed_weight(self, module, weight, fixed.to(weight.device))
        return self.method.bake(self, module)

    def is_baked(self, module: nn.Module, stored: Tensor) -> bool:
        """Whether ``stored`` can be this layer's bake of its frozen weight (``Method.is_baked``; under a fixed
        mask, the weight times a 0/1 mask)."""
        weight = module._parameters[self.param].detach()
        return self.method.is_baked(stored, weight)

    def current_mask(self, module: nn.Module) -> Tensor:
        """The bool mask evaluation uses, shaped like the weight."""
        fixed = module._buffers.get(self.mask_buffer)
        if fixed is not None:
            return fixed
        return self.method.eval_mask(self, module)

    def ensure_buffers(self, weight: Tensor) -> None:
        """Allocate this gate's own cache tensors once (again after a device, dtype or layout change): the bool
        ``mask`` and the ``w * mask`` buffer (in the weight's memory format)."""
        mask = self.mask
        if mask is None or mask.shape != weight.shape or mask.device != weight.device:
            self.mask = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        self.effective_buffer = buffer_like(self.effective_buffer, weight)


# ---------------------------------------------------------------------------------------------------------
# The gated subclasses


_GATED_CLASSES: dict[tuple[type, tuple[str, ...], tuple[str, ...]], type] = {}


def gated_class(base: type, names: tuple[str, ...], aliases: tuple[str, ...] = ()) -> type:
    """``Supermask<Base>``: ``base`` with ``names`` read through their own gates and ``aliases`` (parameters tied
    to a weight another module owns) through the owner's gate. Cached per (base, names, aliases)."""
    key = (base, names, aliases)
    cls = _GATED_CLASSES.get(key)
    if cls is None:
        namespace = {name: _gated_property(name) for name in names}
        namespace.update({name: _alias_property(name) for name in aliases})
        namespace.update(
            _supermask_base=base,
            _supermask_names=names,
            _supermask_alias_names=aliases,
            reset_parameters=_refuse_reset,
            _save_to_state_dict=_save_effective,
            _load_from_state_dict=_load_effective,
            __reduce_ex__=_reduce_ex,
            __module__=__name__,
            __doc__=f"{base.__name__} whose {', '.join(names + aliases)} read as weight * mask "
            "(see supermask_fx.core.gate).",
        )
        if names and recompute.supports(base):
            namespace["forward"] = recompute.gated_forward(base)
        cls = type(f"Supermask{base.__name__}", (base,), namespace)
        _GATED_CLASSES[key] = cls
    return cls


def _gated_property(name: str) -> property:
    def effective(self):
        gate = self._supermask_gates[name]
        param = self._parameters[gate.param]
        if is_shard(param):  # FSDP2 managing its shards (not a forward): the Parameter itself, not a mask of it
            return param
        if recompute.compiling():
            return _effective_outside_graph(gate, self)
        return _checked(gate, self, gate.effective(self))

    return property(effective, doc=f"The effective (masked) {name}; the frozen random one is _parameters[{name!r}].")


def _checked(gate: Gate, module: nn.Module, value: Tensor) -> Tensor:
    """Refuse a model that wrote into the cached effective weight it was handed (evaluation reads share one buffer):
    RWKV divides its output weights in place at every switch to eval. The write would be lost at the next
    selection, or kept in the cache while the masks move: never what the model meant."""
    if value.requires_grad or value.is_inference():  # a fresh tensor per read, or one without a version counter
        return value
    key = (gate.key, gate.layer_mask.key if gate.layer_mask is not None else None)
    handed = gate.__dict__.get("_handed")
    if handed is not None and handed[0]() is value and handed[2] == key and value._version != handed[1]:
        gate.__dict__["_handed"] = None
        raise RuntimeError(
            f"{gate.name}: the model wrote into the masked weight in place (e.g. RWKV rescales its layers when it "
            "switches between train and eval); supermask_fx computes that weight from the frozen one and its mask, "
            "so the write would be lost or outlive the mask. Turn that behaviour off (RWKV: config.rescale_every=0) "
            "before popupify"
        )
    gate.__dict__["_handed"] = (weakref.ref(value), value._version, key)  # a cached buffer: what was handed out
    return value


def _alias_property(name: str) -> property:
    def effective(self):
        owner, gate = self._supermask_aliases[name]
        if is_shard(owner._parameters[gate.param]):
            return owner._parameters[gate.param]
        if recompute.compiling():
            return _effective_outside_graph(gate, owner)
        return gate.effective(owner)

    return property(effective, doc=f"{name}, tied to a gated weight of another module: read as that weight * mask.")


@torch.compiler.disable
def _effective_outside_graph(gate: Gate, module: nn.Module) -> Tensor:
    """``gate.effective(module)`` run eagerly under ``torch.compile``: the mask cache is Python state (version
    counters, a compiled CPU kernel called through ctypes, thresholds that change every step), which a graph could
    only guard on and recompile for. The compiled graph takes the effective weight as an input; autograd carries
    its gradient back through the same ``StraightThrough`` as in eager mode."""
    return gate.effective(module)


def _reads(module: nn.Module) -> dict[str, tuple[nn.Module, Gate]]:
    """``{attribute: (module holding the Parameter, gate)}`` for every gated or tied attribute of ``module``."""
    reads = {name: (module, gate) for name, gate in gates_of(module).items()}
    reads.update(aliases_of(module))
    return reads


def _save_effective(self, destination, prefix, keep_vars):
    """``state_dict``: gated weights as the method bakes them (``Gate.bake``: ``weight * mask`` with the evaluation
    mask for top-k methods): a plain model loading them is the subnetwork (``state.py``). ``keep_vars=True``
    (finding parameters, not saving) keeps the Parameters."""
    type(self)._supermask_base._save_to_state_dict(self, destination, prefix, keep_vars)
    if keep_vars:
        return
    with torch.no_grad():
        for name, (owner, gate) in _reads(self).items():
            if prefix + name in destination:
                destination[prefix + name] = gate.bake(owner)


def _load_effective(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict``: an incoming effective weight must be a bake of this model's frozen random weight
    (``Method.is_baked``: the weight times a 0/1 mask for top-k methods), else the state_dict belongs to other
    weights, or is damaged; the frozen weight is kept (a method that rewrites it, IteRand, first rebuilds it from the
    incoming buffers it depends on: ``state.load_method_state``). Trainable weights (``method="dense"``, retraining
    under ``fix_masks``) load as they are."""
    from .state import load_method_state, settings_already_refused

    load_method_state(self, state_dict, prefix)  # buffers a rewritten frozen weight depends on (IteRand), first
    check = not settings_already_refused()
    for name, (owner, gate) in _reads(self).items():
        key = prefix + name
        incoming = state_dict.get(key)
        weight = owner._parameters[gate.param]
        if not isinstance(incoming, Tensor) or incoming.shape != weight.shape or weight.requires_grad:
            continue  # missing keys and shape mismatches: reported by nn.Module as usual
        with torch.no_grad():
            incoming = incoming.to(weight.device, weight.dtype)
            if check and not gate.is_baked(owner, incoming):
                error_msgs.append(
                    f"{key}: not this model's random weight times a 0/1 mask: the state_dict was saved from a model "
                    "with other weights (another seed, init or architecture), or is damaged"
                )
        state_dict[key] = weight.detach()  # keep the frozen random weight
    type(self)._supermask_base._load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )


def _refuse_reset(self, *args, **kwargs):
    raise RuntimeError(
        f"{type(self).__name__} is gated by supermask_fx: its weights are fixed by popupify's seed. "
        "Build a fresh model and popupify it again to change them."
    )


def _reduce_ex(self, protocol):
    # Rebuild through the importable ``_new_gated`` so pickle and deepcopy work with the generated class.
    reduced = copyreg.__reduce_ex__(self, protocol) if protocol < 2 else object.__reduce_ex__(self, protocol)
    cls = type(self)
    return (_new_gated, (cls._supermask_base, cls._supermask_names, cls._supermask_alias_names), *reduced[2:])


def _new_gated(base: type, names: tuple[str, ...], aliases: tuple[str, ...] = ()):
    cls = gated_class(base, names, aliases)
    return cls.__new__(cls)


def is_gated(module: nn.Module) -> bool:
    return "_supermask_gates" in module.__dict__


def gates_of(module: nn.Module) -> dict[str, Gate]:
    return module.__dict__.get("_supermask_gates", {})


def aliases_of(module: nn.Module) -> dict[str, tuple[nn.Module, Gate]]:
    """``{parameter name: (owner module, gate)}`` for the parameters of ``module`` tied to a weight gated in
    another module."""
    return module.__dict__.get("_supermask_aliases", {})


def gate_parameter(module: nn.Module, gate: Gate) -> None:
    """Swap ``module``'s class so that ``gate.param`` reads through ``gate``."""
    gates = dict(gates_of(module))
    gates[gate.param] = gate
    module.__dict__["_supermask_gates"] = gates
    module.__dict__[recompute.KEEPS_EFFECTIVE] = any(
        g.config is not None and not g.config.rebuild_effective for g in gates.values()
    )
    _swap_class(module)


def alias_parameter(module: nn.Module, name: str, owner: nn.Module, gate: Gate) -> None:
    """Swap ``module``'s class so that its parameter ``name``, the very Parameter ``gate`` gates in ``owner``
    (tied weights), reads as the owner's effective weight: one weight, one mask, in every module that uses it."""
    aliases = dict(aliases_of(module))
    aliases[name] = (owner, gate)
    module.__dict__["_supermask_aliases"] = aliases
    _swap_class(module)


def _swap_class(module: nn.Module) -> None:
    base = getattr(type(module), "_supermask_base", type(module))
    module.__class__ = gated_class(base, tuple(gates_of(module)), tuple(aliases_of(module)))


def adapter_modules(model: nn.Module) -> list[str]:
    """Names (with their class) of the PEFT adapter modules in ``model`` (``PeftModel``, LoRA layers, ...): classes
    defined in the ``peft`` package. Masks and adapters do not combine (see ``popupify``)."""
    return [
        f"{name or 'the model'}: {type(m).__name__}"
        for name, m in model.named_modules()
        if type(m).__module__.split(".")[0] == "peft"
    ]


def ungate(module: nn.Module) -> None:
    """Restore the original class (of an owner of gates or of tied aliases); the caller deals with the
    parameters."""
    module.__class__ = type(module)._supermask_base
    module.__dict__.pop("_supermask_gates", None)
    module.__dict__.pop("_supermask_aliases", None)
    module.__dict__.pop(recompute.KEEPS_EFFECTIVE, None)
