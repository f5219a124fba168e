"""IteRand (Chijiwa et al., "Pruning Randomly Initialized Neural Networks with Iterative Randomization", NeurIPS
2021): edge-popup whose pruned weights are redrawn from time to time, so the scores search more than one draw.

Forward and backward are edge-popup's (``w_eff = w * h(|s|)``, ``dL/ds = sign(s) * w * dL/dw_eff``). After every
``rerand_freq``-th optimizer step that updated a layer's scores (its steps ``r * rerand_freq``, ``r = 1, 2, ...``),
with ``m`` the layer's current top-k mask (shape ``S``, per layer or from the global ranking):

    b   = U[0, 1)^S < rerand_lambda        drawn from (seed, layer name, role ``rerand<r>/which``)
    w'  ~ the layer's init, same std        drawn from (seed, layer name, role ``rerand<r>``): a whole new draw
    w   <- where(~m & b, w', w)             the pruned weights chosen by b are redrawn, the kept ones stay
    gen <- where(~m & b, r, gen)            the layer's ``generation`` buffer (``S``, int16; 0 = popupify's draw)

This is the authors' main variant (``rerand_mode: "bernoulli"`` with ``rerand_rate: 1.0`` in their
``config.yaml``; ``rerandomize_`` in ``models/networks/sparse_modules.py``: ``w*m + w*(1-m)*(1-b) + rnd*(1-m)*b``
with ``b ~ Bernoulli(lambda)`` and ``rnd`` a fresh full draw of the layer's init; github.com/dchiji-ntt/iterand),
with their defaults: ``rerand_lambda = 0.1`` and ``rerand_freq = 300`` steps (CIFAR-10; 1000 on ImageNet). Their
partial mixing (``"manual"``: ``lambda * w + mu * rnd``) is not implemented. Differences, all of bookkeeping: they
rerandomize before step ``i`` when ``(i + 1) % rerand_freq == 0`` (the same period, one step earlier); they rank
the raw scores (edge-popup here ranks ``|s|``); their draws come from the global RNG, these from the seed.

Every redraw is a function of (seed, layer name, ``r``) only, so the weight is one of
(seed, name, ``generation``): ``rebuilt_weight`` computes it, and ``weight_of`` is that function. Hence:

* a ``state_dict`` carries ``generation`` and the step count ``rerand_steps`` (int64, 0-d); a load rebuilds the
  weight from the incoming ``generation`` before it checks the effective weight (``core.state``), so a checkpoint
  resumes bit for bit;
* a subnetwork file stores, beside the seed and the masks, the generations of the weights the mask keeps
  (``extra/<layer>.<param>/generation``, in the smallest unsigned type holding the largest): a few bits per kept
  weight; the pruned weights load at generation 0, which the fixed mask never reads.

The step count is mirrored on the host, so a step costs no device read; a re-randomization draws two tensors the
size of the layer on the CPU. Rebuilding a weight draws once per distinct generation it holds (a load, a file).
``init="keep"`` has no distribution to redraw from and is refused. With several named masks (``add_mask``) the
redraws follow the active one; a subnetwork file is then refused (``save_subnetwork``): save the ``state_dict``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.gate import Gate, scores_name
from ..core.heads import pack, unpack
from ..core.method import register_method
from ..core.popup import expected_weight
from .edge_popup import EdgePopup

__all__ = ["IteRand", "IteRandOptions", "rebuilt_weight", "rerandomize", "generation_name", "steps_name"]

_STEPS_HELD = "_iterand_steps"  # gate.__dict__: (step buffer, its version, its value): no device read per step
_GENERATION_DTYPES = (torch.int16, torch.int32, torch.int64)  # the buffer widens when a count outgrows it
_FILE_DTYPES = (torch.uint8, torch.uint16, torch.uint32)


@dataclasses.dataclass(frozen=True)
class IteRandOptions:
    """Options of ``method="iterand"`` (see the module docstring).

    Attributes:
        rerand_freq: optimizer steps of a layer between two re-randomizations (the authors: 300 on CIFAR-10,
            1000 on ImageNet).
        rerand_lambda: probability that a pruned weight is redrawn at a re-randomization (the authors: 0.1; 0 is
            edge-popup).
    """

    rerand_freq: int = 300
    rerand_lambda: float = 0.1


def generation_name(param: str) -> str:
    """The buffer of the generations: ``weight`` -> ``generation``; ``in_proj_weight`` -> ``in_proj_generation``."""
    return scores_name(param)[: -len("scores")] + "generation"


def steps_name(param: str) -> str:
    """The buffer of the step count: ``weight`` -> ``rerand_steps``; ``in_proj_weight`` -> ``in_proj_rerand_steps``."""
    return scores_name(param)[: -len("scores")] + "rerand_steps"


@register_method
class IteRand(EdgePopup):
    name = "iterand"
    redraws_weights = True
    Options = IteRandOptions
    wants_steps = True

    @classmethod
    def check_options(cls, options: IteRandOptions) -> None:
        freq, fraction = options.rerand_freq, options.rerand_lambda
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(
                f"rerand_freq={freq!r} must be a positive integer: the optimizer steps between two "
                "re-randomizations of a layer (the authors use 300 on CIFAR-10, 1000 on ImageNet)"
            )
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
            raise ValueError(f"rerand_lambda={fraction!r} must be a number in [0, 1]")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(
                f"rerand_lambda={fraction!r} is not in [0, 1]: it is the probability that a pruned weight is "
                "redrawn at a re-randomization (the authors use 0.1)"
            )

    # ------------------------------------------------------------------------------------------ buffers

    def attach(self, gate: Gate, module: nn.Module) -> None:
        """Register ``generation`` (int16, zeros, shaped like the weight) and ``rerand_steps`` (int64, 0-d)."""
        if not gate.config.source.regenerates:
            raise ValueError(
                f"method='iterand' redraws pruned weights from the weights' distribution, and init='keep' has none "
                f"({gate.name}): build the model again and popupify it with a distribution (init='signed_constant', "
                "'kaiming_normal', ...), or use method='edge_popup' on kept weights"
            )
        weight = module._parameters[gate.param]
        for name, value in (
            (generation_name(gate.param), torch.zeros(weight.shape, dtype=torch.int16, device=weight.device)),
            (steps_name(gate.param), torch.zeros((), dtype=torch.int64, device=weight.device)),
        ):
            if name in module._buffers:
                continue
            if hasattr(module, name):
                raise ValueError(f"{gate.layer or 'the model'} already has an attribute {name!r}; cannot add IteRand's")
            module.register_buffer(name, value)

    def buffer_names(self, gate: Gate) -> tuple[str, ...]:
        return generation_name(gate.param), steps_name(gate.param)

    # ------------------------------------------------------------------------------------------ steps

    def after_step(self, gate: Gate, module: nn.Module) -> None:
        """Count the step; at every ``rerand_freq``-th, redraw (``rerandomize``). Nothing under a fixed mask or with
        trainable weights (``fix_masks``): the scores no longer choose what is pruned."""
        if module._buffers.get(gate.mask_buffer) is not None or module._parameters[gate.param].requires_grad:
            return
        count = _steps(gate, module) + 1
        buffer = module._buffers[steps_name(gate.param)]
        with torch.no_grad():
            buffer.add_(1)
        gate.__dict__[_STEPS_HELD] = (buffer, buffer._version, count)
        if count % self.options.rerand_freq == 0:
            rerandomize(gate, module, count // self.options.rerand_freq, self.options.rerand_lambda)

    # ------------------------------------------------------------------------------------------ weights and files

    def weight_of(self, gate: Gate, module: nn.Module, drawn: Tensor) -> Tensor:
        """The weight of (seed, name, ``generation``): ``rebuilt_weight``."""
        generation = module._buffers.get(generation_name(gate.param))
        return drawn if generation is None else rebuilt_weight(gate, drawn, generation)

    def file_tensors(self, gate: Gate, module: nn.Module, mask: Tensor) -> dict[str, Tensor]:
        """``{"redrawn": bits, "generation": g}``: over the kept weights in row-major order (``K`` of them), one bit
        each saying whether it was redrawn (``heads.pack``: ``ceil(K / 8)`` bytes), and the generations of the redrawn
        ones only, as the smallest unsigned type holding the largest. Pruned weights are not stored: the mask never
        reads them, and a load gives them popupify's draw."""
        if len(gate.heads) > 1:
            raise ValueError(
                f"{gate.name}: an IteRand subnetwork file holds the generations of the active mask's kept weights "
                f"only, and this model has several masks ({', '.join(gate.heads)}): save the model's state_dict "
                "instead (it holds every generation)"
            )
        generation = module._buffers[generation_name(gate.param)]
        kept = generation[mask.to(generation.device, torch.bool)].cpu()
        redrawn = kept != 0
        values = kept[redrawn]
        top = int(values.max()) if values.numel() else 0
        return {"redrawn": pack(redrawn), "generation": values.to(_smallest(_FILE_DTYPES, top))}

    def load_file_tensors(self, gate: Gate, module: nn.Module, tensors: dict[str, Tensor], mask: Tensor) -> None:
        """Set ``generation`` to the file's at the kept positions, 0 elsewhere, and rebuild the weight."""
        bits, values = tensors.get("redrawn"), tensors.get("generation")
        if bits is None or values is None or set(tensors) != {"redrawn", "generation"}:
            raise ValueError(
                f"{gate.name}: an IteRand layer needs the tensors extra/{gate.name}/redrawn and .../generation, "
                f"the file has {sorted(tensors) or 'none'}"
            )
        count = int(torch.count_nonzero(mask))
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (count + 7) // 8:
            raise ValueError(
                f"{gate.name}: extra/{gate.name}/redrawn is {bits.dtype} of shape {tuple(bits.shape)}; the mask keeps "
                f"{count} weights, one bit each"
            )
        redrawn = unpack(bits, torch.Size([count]))
        if values.dtype not in _FILE_DTYPES or values.dim() != 1 or values.numel() != int(redrawn.sum()):
            raise ValueError(
                f"{gate.name}: extra/{gate.name}/generation is {values.dtype} of shape {tuple(values.shape)}; "
                f"{int(redrawn.sum())} kept weights were redrawn, one unsigned generation each"
            )
        kept = torch.zeros(count, dtype=torch.int64)
        kept[redrawn] = values.to(torch.int64)
        kept = kept.to(torch.int64)
        generation = torch.zeros(mask.shape, dtype=torch.int64)
        generation[mask.to("cpu", torch.bool)] = kept
        top = int(kept.max()) if kept.numel() else 0
        _set_generation(module, gate, generation.to(_smallest(_GENERATION_DTYPES, top)))
        weight = module._parameters[gate.param]
        with torch.no_grad():
            weight.copy_(expected_weight(gate, weight.detach().cpu(), module).to(weight.device, weight.dtype))
        gate.clear_cache()


def rebuilt_weight(gate: Gate, drawn: Tensor, generation: Tensor) -> Tensor:
    """The IteRand weight of a layer (float32, CPU, ``S``): ``w[i] = draw_g[i][i]`` with ``g = generation`` (``S``),
    ``draw_0 = drawn`` (popupify's draw) and ``draw_r`` the draw of role ``rerand<r>`` (``_redraw``). One draw per
    distinct nonzero generation."""
    generation = generation.detach().to("cpu")
    out = drawn.clone()
    for r in torch.unique(generation).tolist():
        if r != 0:
            at = generation == r
            out[at] = _redraw(gate, r, tuple(drawn.shape))[at]
    return out


def rerandomize(gate: Gate, module: nn.Module, r: int, fraction: float) -> None:
    """The ``r``-th re-randomization of the layer (module docstring): the pruned weights whose U[0, 1) number of
    role ``rerand<r>/which`` is below ``fraction`` take the value of the draw of role ``rerand<r>`` and generation
    ``r``. The weight is written in place (its version counter moves) and the gate's caches are cleared."""
    weight = module._parameters[gate.param]
    shape = tuple(weight.shape)
    pruned = ~gate.current_mask(module).to(weight.device, torch.bool)
    chosen = gate.config.source.uniform(gate.name, shape, f"rerand{r}/which") < fraction
    redraw = pruned & chosen.to(weight.device)
    fresh = _redraw(gate, r, shape).to(weight.device, weight.dtype)
    generation = _generation_holding(module, gate, r)
    with torch.no_grad():
        weight.copy_(torch.where(redraw, fresh, weight))
        generation.masked_fill_(redraw, r)
    gate.clear_cache()


def _redraw(gate: Gate, r: int, shape: tuple[int, ...]) -> Tensor:
    """The ``r``-th redraw of the layer (float32, CPU, ``shape``): popupify's distribution and standard deviation
    (the ``k`` it drew with), role ``rerand<r>``; an embedding's padding row stays zero."""
    weight_k = getattr(gate, "k_popupify", gate.k)
    return gate.config.source.weight(gate.name, shape, weight_k, gate, role=f"rerand{r}")


def _steps(gate: Gate, module: nn.Module) -> int:
    """The layer's step count: the host's copy while the buffer is the one it was read from and unchanged since,
    else the buffer's value (one read after a ``load_state_dict``, a move or a copy)."""
    buffer = module._buffers[steps_name(gate.param)]
    held = gate.__dict__.get(_STEPS_HELD)
    if held is not None and held[0] is buffer and held[1] == buffer._version:
        return held[2]
    return int(buffer)


def _generation_holding(module: nn.Module, gate: Gate, r: int) -> Tensor:
    """The ``generation`` buffer, widened first if its type cannot hold ``r``."""
    generation = module._buffers[generation_name(gate.param)]
    if r > torch.iinfo(generation.dtype).max:
        _set_generation(module, gate, generation.to(_smallest(_GENERATION_DTYPES, r)))
    return module._buffers[generation_name(gate.param)]


def _set_generation(module: nn.Module, gate: Gate, values: Tensor) -> None:
    """Write ``values`` into the ``generation`` buffer (in place when its type holds them, else a wider buffer)."""
    name = generation_name(gate.param)
    own = module._buffers[name]
    wide = torch.iinfo(values.dtype).max > torch.iinfo(own.dtype).max
    with torch.no_grad():
        if wide:
            module._buffers[name] = values.to(own.device).clone()
        else:
            own.copy_(values)


def _smallest(dtypes: tuple[torch.dtype, ...], top: int) -> torch.dtype:
    """The first of ``dtypes`` whose maximum is at least ``top``."""
    for dtype in dtypes:
        if top <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"a generation of {top} does not fit {dtypes[-1]}")
