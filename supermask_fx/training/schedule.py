"""Learning-rate schedule: linear warm-up, then cosine (or constant), changed at every optimizer step."""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based), for ``LambdaLR``.

    * warm-up (``step < warmup_steps``): ``(step + 1) / warmup_steps``, as the paper's ImageNet code;
    * then cosine from 1 to ``min_ratio`` over the remaining ``total_steps - warmup_steps`` steps
      (``cosine=False``: stays at 1).

    A class rather than a closure so that ``LambdaLR.state_dict`` stores (and a checkpoint restores) it.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, cosine: bool = True):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)
        self.cosine = bool(cosine)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def capped_warmup(epochs: float, warmup_epochs: float = 5.0, fraction: float = 0.2) -> float:
    """A default warm-up length: ``warmup_epochs``, but at most ``fraction`` of a run of ``epochs``, so that a short
    run is not all warm-up (the paper's 5 of 100 ImageNet epochs stay 5; 5 epochs get 1, 1 epoch gets 0.2, which
    rounds to no warm-up step when an epoch has fewer than 3 steps)."""
    if epochs < 0 or warmup_epochs < 0 or not 0 <= fraction <= 1:
        raise ValueError(
            f"epochs={epochs} and warmup_epochs={warmup_epochs} must be >= 0, fraction={fraction} in [0, 1]"
        )
    return min(float(warmup_epochs), fraction * epochs)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    cosine: bool = True,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` over ``optimizer`` (peak rate = each group's ``lr``; call ``.step()`` after
    every optimizer step). ``min_lr`` is relative to the first group's peak rate."""
    peak = optimizer.param_groups[0]["lr"]
    ratio = min_lr / peak if peak > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, ratio, cosine))
