"""Mask selection behind one seam: which back-end computes the top-k masks.

Every back-end applies the rule of ``supermask_fx.topk`` (the ``K`` largest ``|s|`` of each ranked group, ties by
lowest flat index, NaN below every number) and gives bit-identical masks; they differ only in how:

``reference``
    a stable sort per group (``topk.topk_mask_reference``): slow and obviously right;
``cpu``
    the band strategy: last step's threshold as a hint, the compiled C pass over all layers of a model at once
    where it applies (``supermask_fx.native``), PyTorch otherwise;
``device``
    all layers of a model in one batched, sync-free radix select (``selection.device``): a fixed number of tensor
    operations whatever the number of layers, no host synchronisation; built for accelerators, exact on the CPU.

The default follows the scores' device: ``cpu`` on the CPU, ``device`` elsewhere. ``SUPERMASK_FX_SELECT=reference |
cpu | device`` in the environment, or ``set_backend(name)``, forces one everywhere (tests and benchmarks run any
back-end on any machine).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "cpu", "device")
ENVIRONMENT = "SUPERMASK_FX_SELECT"
_forced: str | None = None

__all__ = ["BACKENDS", "backend_for", "set_backend"]


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
