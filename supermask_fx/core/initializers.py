"""The paper's weight distributions and the initial scores, drawn reproducibly from a seed.

Every tensor is drawn on the CPU in float32 from its own ``torch.Generator``, seeded from
``sha256("supermask_fx/<seed>/<layer>.<parameter>/<role>")``, then copied to the parameter's device and dtype.
The same seed therefore gives the same tensors on any machine and device, whatever order layers are visited in.

Standard deviations (``fan`` from ``torch.nn.init``'s rule: for a weight of shape (out, in, *kernel),
fan_in = in * prod(kernel), fan_out = out * prod(kernel); a weight stored (in, out, *kernel), such as GPT-2's
``Conv1D``, has its fans swapped accordingly; a stack of expert matrices ``(experts, out, in)`` has the fans of one
matrix):

* Kaiming: ``std = gain / sqrt(fan)``, ``gain`` from ``nonlinearity`` (sqrt 2 for ReLU), ``fan`` from ``mode``.
* Xavier: ``std = sqrt(2 / (fan_in + fan_out))`` (gain 1, as ``torch.nn.init.xavier_normal_``).
* ``scaled``: ``std * sqrt(1 / k)`` (the paper's Section 4.5).

Distributions: ``normal`` N(0, std^2); ``uniform`` U(-sqrt(3) std, sqrt(3) std); ``signed_constant`` +-std with
equal probability; ``unsigned_constant`` +std everywhere.

Scores start Kaiming-uniform with ``a = sqrt(5)`` (``nn.Linear``'s default): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

# name -> (distribution, standard-deviation rule)
INITIALIZERS: dict[str, tuple[str, str]] = {
    "signed_constant": ("signed_constant", "kaiming"),
    "unsigned_constant": ("unsigned_constant", "kaiming"),
    "kaiming_normal": ("normal", "kaiming"),
    "kaiming_uniform": ("uniform", "kaiming"),
    "xavier_normal": ("normal", "xavier"),
    "xavier_uniform": ("uniform", "xavier"),
    "xavier_signed_constant": ("signed_constant", "xavier"),
}
NONLINEARITIES = ("relu", "linear", "leaky_relu", "tanh", "sigmoid", "selu")


def generator_for(seed: int, name: str, role: str) -> torch.Generator:
    """A CPU generator whose stream depends only on ``(seed, name, role)``."""
    digest = hashlib.sha256(f"supermask_fx/{seed}/{name}/{role}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def fans(
    shape: tuple[int, ...], fan_in_fan_out: bool = False, expert_dims: int = 0, given: tuple[int, int] | None = None
) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight stored ``(out, in, *kernel)``, or ``(in, out, *kernel)`` with
    ``fan_in_fan_out`` (GPT-2's ``Conv1D``, ``x @ W``). With ``expert_dims``, the leading dimensions index separate
    matrices (mixture-of-experts tensors ``(experts, out, in)``) and the fans are those of one matrix. ``given``:
    the fans the model's graph reads (an einsum's contracted dimensions, a weight joined by ``cat``), used as
    they are."""
    if given is not None:
        return int(given[0]), int(given[1])
    shape = tuple(shape)[expert_dims:]
    if len(shape) < 2:
        raise ValueError(f"a gated weight needs at least 2 dimensions, got shape {tuple(shape)}")
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    return (fan_out, fan_in) if fan_in_fan_out else (fan_in, fan_out)


def weight_std(
    shape: tuple[int, ...],
    init: str,
    *,
    mode: str,
    nonlinearity: str,
    k: float,
    scaled: bool,
    fan_in_fan_out: bool = False,
    expert_dims: int = 0,
    given_fans: tuple[int, int] | None = None,
) -> float:
    fan_in, fan_out = fans(shape, fan_in_fan_out, expert_dims, given_fans)
    if INITIALIZERS[init][1] == "xavier":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    else:
        std = torch.nn.init.calculate_gain(nonlinearity) / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    return std * math.sqrt(1.0 / k) if scaled else std


def draw_weight(
    shape: tuple[int, ...], init: str, *, std: float, generator: torch.Generator, out: Tensor | None = None
) -> Tensor:
    """A float32 CPU tensor of ``shape`` from distribution ``INITIALIZERS[init]`` with standard deviation ``std``.

    ``out``: a contiguous float32 CPU tensor of ``shape`` to draw into, in place, with the same values bit for bit
    (``randn`` and ``rand`` are ``normal_`` and ``uniform_`` of a new tensor; the arithmetic is the same ops in the
    same order): no temporary the size of the weight but a bool mask for the signed constants."""
    distribution = INITIALIZERS[init][0]
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    if distribution == "normal":
        return out.normal_(generator=generator).mul_(std)
    if distribution == "uniform":
        bound = math.sqrt(3.0) * std
        return out.uniform_(generator=generator).mul_(2.0).sub_(1.0).mul_(bound)
    if distribution == "signed_constant":
        negative = out.uniform_(generator=generator) < 0.5
        return out.fill_(std).masked_fill_(negative, -std)
    return out.fill_(std)  # unsigned_constant


def can_draw_into(t: Tensor) -> bool:
    """Whether ``draw_weight`` / ``draw_scores`` can draw into ``t`` in place (a contiguous float32 CPU tensor)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def draw_scores(
    shape: tuple[int, ...],
    generator: torch.Generator,
    fan_in_fan_out: bool = False,
    expert_dims: int = 0,
    given_fans: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Kaiming-uniform with ``a = sqrt(5)``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), on the CPU (drawn in place into one
    new tensor: the values of ``(rand * 2 - 1) * bound`` without its temporaries). With a narrower ``dtype`` the
    float32 values are drawn a chunk at a time and rounded into the result: the same values as drawing all of them
    in float32 and converting (the generator is consumed in order), without a float32 copy of the layer."""
    bound = 1.0 / math.sqrt(fans(shape, fan_in_fan_out, expert_dims, given_fans)[0])
    if dtype == torch.float32:
        return torch.empty(shape, dtype=torch.float32).uniform_(generator=generator).mul_(2.0).sub_(1.0).mul_(bound)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        part.copy_(torch.empty(part.numel()).uniform_(generator=generator).mul_(2.0).sub_(1.0).mul_(bound))
    return out


_CHUNK = 1 << 20  # entries drawn at a time into a narrower dtype
