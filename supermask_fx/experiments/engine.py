"""The one place the experiments touch a training loop: ``fit(model, ...) -> test accuracy``.

The project's training engine (``supermask_fx.training``, issue 5, on accelerate) is meant to run every
experiment. It had not landed when this suite was written, so ``fit`` falls back to the minimal loop below
(plain SGD/Adam over in-memory tensors, cosine or constant learning rate, evaluation on the test split). It is
kept deliberately thin: swapping it for the engine changes this file only. Tracked in docs/reproducing.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .specs import Recipe

__all__ = ["fit", "evaluate", "ENGINE"]

#: Which loop ``fit`` uses (recorded in the report).
ENGINE = "experiments.engine fallback loop (supermask_fx.training not available)"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose sgd or adam")


def fit(model: nn.Module, params, train_set, test_set, recipe: Recipe, epochs: int, seed: int) -> float:
    """Train ``params`` of ``model`` on ``train_set`` for ``epochs``; return top-1 test accuracy in percent.

    ``train_set`` / ``test_set`` are ``supermask_fx.data.ImageTensorDataset`` (batches via ``get_batch``).
    """
    device = _device()
    model.to(device)
    params = [p for p in params if p.requires_grad]
    if params and epochs > 0:
        optimizer = _optimizer(params, recipe)
        n = len(train_set)
        steps_per_epoch = math.ceil(n / recipe.batch_size)
        total = steps_per_epoch * epochs
        step = 0
        generator = torch.Generator().manual_seed(10_000 + seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, recipe.batch_size):
                if recipe.schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = 0.5 * recipe.lr * (1.0 + math.cos(math.pi * step / total))
                images, targets = train_set.get_batch(order[start : start + recipe.batch_size], device)
                loss = nn.functional.cross_entropy(model(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return evaluate(model, test_set)


@torch.no_grad()
def evaluate(model: nn.Module, test_set, batch_size: int = 1000) -> float:
    """Top-1 accuracy (percent) of ``model`` in eval mode on ``test_set``."""
    model.eval()
    correct = 0
    for start in range(0, len(test_set), batch_size):
        images, targets = test_set.get_batch(slice(start, start + batch_size), _device())
        correct += int((model(images).argmax(1) == targets).sum())
    return 100.0 * correct / len(test_set)
