"""Wrappers around a user's model (DDP, DataParallel, accelerate's, ``torch.compile``, FSDP): the one place that
knows them. ``unwrap`` finds the model inside; ``wrapper_kind`` names a wrapper ``popupify`` must not see."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap", "wrapper_kind"]

_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _compiled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / accelerate / torch.compile wrappers."""
    while True:
        if _compiled(model):
            model = model._orig_mod
        elif isinstance(model, _PARALLEL):
            model = model.module
        else:
            return model


def wrapper_kind(model: nn.Module) -> str | None:
    """``"torch.compile"``, ``"FSDP"``, the DDP / DataParallel class name, or ``None`` for a plain model."""
    if _compiled(model):
        return "torch.compile"
    if any(
        type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") or "FSDP" in type(m).__name__
        for m in model.modules()
    ):
        return "FSDP"
    if isinstance(model, _PARALLEL):
        return type(model).__name__
    return None
