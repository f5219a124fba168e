"""Mask selection behind one seam: the top-k masks of edge-popup, computed by one of three back-ends.

The seam: a ``TopKSelector`` gets the layers ranked together (one layer, or every layer of ``scope="global"``),
each as an object with ``tensors() -> (scores, weight)`` and ``frozen() -> bool`` (a fixed mask: not selected
ahead of its own read); for each it hands out a ``LayerMask``, which is all the gate and the methods see: the mask
as a bool tensor, ``w * mask``, and the key it was computed from. Bits, bands, hints, batch plans and caches stay
here (and in ``selection.topk`` / ``selection.native``, the cpu back-end's band select); the cache key is one
scheme, the autograd version counters of the scores and weights (``version_key``).

Every back-end applies the rule of ``selection.topk`` (the ``K`` largest ``|s|`` of each ranked group, ties by
lowest flat index, NaN below every number) and gives bit-identical masks; they differ only in how:

``reference`` (``selection.reference``)
    a stable sort per group (``topk.topk_mask_reference``): slow and obviously right;
``cpu`` (``selection.cpu``)
    the band strategy: last step's threshold as a hint, the compiled C pass over all layers of a model at once
    where it applies (``selection.native``, masks written as bits: ``selection.bits``), PyTorch otherwise;
``device`` (``selection.device``)
    all layers of a model in one batched, sync-free radix select: a fixed number of tensor operations whatever the
    number of layers, no host synchronisation; built for accelerators, exact on the CPU.

The default follows the scores' device: ``cpu`` on the CPU, ``device`` elsewhere. ``SUPERMASK_FX_SELECT=reference |
cpu | device`` in the environment, or ``set_backend(name)``, forces one everywhere (``selection.backend``).
"""

from __future__ import annotations

from .backend import BACKENDS, ENVIRONMENT, backend_for, set_backend, version_key
from .layer_mask import LayerMask
from .ranked import RankedLayer
from .selector import TopKSelector

__all__ = [
    "BACKENDS",
    "ENVIRONMENT",
    "backend_for",
    "set_backend",
    "version_key",
    "LayerMask",
    "RankedLayer",
    "TopKSelector",
]
