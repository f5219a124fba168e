"""Which back-end selects the masks, and the one cache key every cache of a mask is checked against.

``SUPERMASK_FX_SELECT=reference | cpu | device`` in the environment, or ``set_backend(name)``, forces one back-end
everywhere (tests and benchmarks run any back-end on any machine); the default follows the scores' device: ``cpu``
on the CPU, ``device`` elsewhere.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

BACKENDS = ("reference", "cpu", "device")
ENVIRONMENT = "SUPERMASK_FX_SELECT"
_forced: str | None = None

__all__ = ["BACKENDS", "ENVIRONMENT", "backend_for", "set_backend", "version_key"]


def set_backend(name: str | None) -> None:
    """Force a back-end for every selection (``None``: back to the environment variable, then the default)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown selection back-end {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced = name


def backend_for(device: torch.device) -> str:
    """The back-end that selects masks of scores on ``device``."""
    if _forced is not None:
        return _forced
    forced = os.environ.get(ENVIRONMENT, "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENVIRONMENT}={forced!r} is not a back-end; choose one of {', '.join(BACKENDS)}")
        return forced
    return "cpu" if device.type == "cpu" else "device"


def is_shard(t: Tensor) -> bool:
    """A DTensor: FSDP2's shard of a parameter between forwards. Selection ranks whole layers only, so it never
    selects from a shard: a layer is selected when FSDP has gathered it for its forward (plain tensors)."""
    return type(t).__name__ == "DTensor"


def version_key(t: Tensor) -> tuple[int, int]:
    """Changes whenever ``t`` is written in place through autograd-visible ops (every optimizer step,
    ``load_state_dict``) or replaced (``.to()``): its autograd version counter and its storage address. Writes
    through ``tensor.data`` bypass it (``supermask_fx.refresh_masks``)."""
    return (t._version, t.data_ptr())
