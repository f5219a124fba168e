"""The ``reference`` back-end: a stable sort of each ranked group's magnitudes (``topk.topk_mask_reference``).

Slow and obviously right: the definition the other back-ends are tested against, bit for bit.
"""

from __future__ import annotations

import torch

from .topk import topk_mask_reference


def refresh(selector, effective: bool) -> None:
    """Write the masks of ``selector`` (a ``TopKSelector``) and, with ``effective``, its ``w * mask`` buffers."""
    selector.hold(effective)
    members = list(selector.tensors())
    magnitudes = torch.cat([scores.abs().reshape(-1) for scores, _, _ in members])
    segments = selector.segments()
    masks = torch.cat(
        [
            topk_mask_reference(chunk, kept)
            for chunk, (_, kept) in zip(magnitudes.split([size for size, _ in segments]), segments)
        ]
    )
    for (_, _, mask), part in zip(members, masks.split([scores.numel() for scores, _, _ in members])):
        mask.bool_mask.copy_(part.view(mask.bool_mask.shape))
    if effective:
        selector.fill_effective()
