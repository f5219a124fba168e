"""The one place the experiments touch training: ``fit(model, ...) -> test accuracy``, on the project's engine.

``supermask_fx.training.train`` (accelerate) runs every experiment: no checkpoints, no run folder, no progress
output, an evaluation after every epoch (the test-accuracy curve shows whether a schedule was long enough to
plateau). Each CSV row records the loop that made it (column ``engine``).
"""

from __future__ import annotations

from torch import nn

from ..training import TrainConfig, train
from .specs import Recipe

__all__ = ["fit", "engine_name", "train_config"]

TRAINING = "supermask_fx.training"


def engine_name() -> str:
    """The training loop recorded in each CSV row."""
    return TRAINING


def train_config(recipe: Recipe, epochs: int, seed: int, **options) -> TrainConfig:
    """The engine's ``TrainConfig`` for ``recipe`` (optimizer, learning rate, momentum, weight decay, batch size,
    schedule), ``epochs`` and ``seed``; ``options``: other ``TrainConfig`` fields."""
    return TrainConfig(
        epochs=epochs,
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        seed=seed,
        **options,
    )


def fit(
    model: nn.Module, params, train_set, test_set, recipe: Recipe, epochs: int, seed: int, **options
) -> tuple[float, list[float]]:
    """Train the parameters of ``model`` that require grad for ``epochs``; return the top-1 test accuracy in percent
    after the last epoch and after each epoch (the curve).

    ``params`` (``supermask_parameters(model)``) is the same set the engine trains: the parameters that require grad.
    ``options``: other ``TrainConfig`` fields (``k_warmup_epochs``).
    """
    config = train_config(
        recipe,
        epochs,
        seed,
        eval_every=1,
        topk=(1,),
        out_dir=None,
        checkpoint=False,
        progress="none",
        **options,
    )
    result = train(model, train_set, test_set, config)
    curve = [100.0 * float(m["test_top1"]) for m in result["history"] if m.get("test_top1") is not None]
    return 100.0 * float(result["final"]["test_top1"]), curve
