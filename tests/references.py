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


def relu_mlp(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """``x`` through bias-free linear layers of ``weights`` with a ReLU between them (the re-implementations' MLP)."""
    h = x
    for i, w in enumerate(weights):
        h = torch.nn.functional.linear(h, w)
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h
