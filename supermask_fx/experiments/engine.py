"""The one place the experiments touch a training loop: ``fit(model, ...) -> test accuracy``.

``fit`` uses the project's training engine (``supermask_fx.training.train``, on accelerate) when it can be
imported: no checkpoints, no run folder, no progress output, one evaluation after the last epoch. Where the
engine is absent (it was still being written when this suite started) it falls back to the minimal loop below
(the same recipe: SGD/Adam over in-memory tensors, per-step cosine or constant learning rate). Every CSV row
records which loop made it (column ``engine``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .specs import Recipe

__all__ = ["fit", "evaluate", "engine_name"]

FALLBACK = "experiments.engine fallback loop"
TRAINING = "supermask_fx.training"


def _training():
    try:
        from ..training import TrainConfig, train
    except ImportError:
        return None
    return TrainConfig, train


def engine_name() -> str:
    """Which loop ``fit`` uses now (recorded in each CSV row)."""
    return TRAINING if _training() is not None else FALLBACK


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
    ``params`` are what the optimizer gets (``supermask_parameters(model)``); the engine takes the parameters
    that require grad, which is the same set.
    """
    found = _training()
    if found is not None:
        TrainConfig, train = found
        config = TrainConfig(
            epochs=epochs,
            batch_size=recipe.batch_size,
            optimizer=recipe.optimizer,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            schedule=recipe.schedule,
            seed=seed,
            eval_every=max(1, epochs),
            topk=(1,),
            out_dir=None,
            checkpoint=False,
            progress="none",
        )
        result = train(model, train_set, test_set, config)
        return 100.0 * float(result["final"]["test_top1"])
    return _fallback_fit(model, params, train_set, test_set, recipe, epochs, seed)


def _fallback_fit(model: nn.Module, params, train_set, test_set, recipe: Recipe, epochs: int, seed: int) -> float:
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
