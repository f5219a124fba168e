"""Independent re-implementations the tests compare the library with (no library code)."""

from __future__ import annotations

import torch


def top_k_mask(values: torch.Tensor, k: float) -> torch.Tensor:
    """Keep the ``numel - int((1 - k) * numel)`` largest ``|values|``, ties by lowest flat index (a stable descending
    sort): the paper's Algorithm 1 with the documented tie rule."""
    flat = values.detach().abs().flatten()
    kept = max(1, flat.numel() - int((1 - k) * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:kept]] = True
    return mask.view_as(values)
