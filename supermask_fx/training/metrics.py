"""Top-k accuracy, computed here: ``evaluate.load("accuracy")`` needs the Hugging Face Hub, and the engine needs
per-example hits (``accelerate``'s ``gather_for_metrics`` drops the padding duplicates of the last batch across
processes exactly), which a running torchmetrics state would not give; so no metrics library is declared."""

from __future__ import annotations

import torch
from torch import Tensor


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...]) -> Tensor:
    """``(B, len(ks))`` bool: whether each example's target is among its ``k`` highest logits, for each ``k``.

    ``k`` is clipped to the number of classes. Ties between logits are broken by ``torch.topk``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax), best first
    hits = top.eq(targets.view(-1, 1))  # (B, kmax)
    cumulative = hits.cumsum(1).bool()  # cumulative[:, j]: target within the top j+1
    return torch.stack([cumulative[:, min(k, kmax) - 1] for k in ks], dim=1)


def accuracy(logits: Tensor, targets: Tensor, k: int = 1) -> float:
    """Fraction of examples whose target is among the top ``k`` logits."""
    return topk_correct(logits, targets, (k,)).float().mean().item()
