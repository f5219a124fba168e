"""Hugging Face ``transformers``: reload a saved popupified model, and a ``Trainer`` callback.

``Trainer`` needs no adapter to train (its optimizer takes the parameters with ``requires_grad``: the scores) nor
to save and resume (``state_dict`` carries the masked weights, the scores and the settings: ``core.state``).
This module adds:

* ``from_pretrained(model_class, directory)``: the popupified model back from a ``save_pretrained`` /
  ``Trainer.save_model`` directory (scores, settings, same logits), ready to train further or to evaluate;
* ``SupermaskCallback``: logs the kept fraction and how much of the mask changed since the last log, and writes the
  compact subnetwork file (``save_subnetwork``) into every checkpoint folder and the output folder.

A plain ``model_class.from_pretrained(directory)`` of such a directory gives the subnetwork itself (the masked
weights are stored under the usual names; ``transformers`` reports the scores and the settings record as unused).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, TrainerCallback

from ..core.masks import gated_layers, mask_statistics
from ..core.state import restore
from ..files.subnetwork import save_subnetwork, unwrap

SUBNETWORK_FILE = "subnetwork.safetensors"

__all__ = ["from_pretrained", "SupermaskCallback", "SUBNETWORK_FILE"]


def from_pretrained(model_class, directory: str | os.PathLike, **config_kwargs):
    """Build ``model_class`` (a ``PreTrainedModel`` class or an ``AutoModelFor...`` class) from the directory's
    config and restore the popupified model saved there (``supermask_fx.restore``)."""
    config = AutoConfig.from_pretrained(directory, **config_kwargs)
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config)
    else:
        model = model_class._from_config(config)
    return restore(model, directory)


class SupermaskCallback(TrainerCallback):
    """Mask statistics in the logs, and the subnetwork file in every checkpoint folder.

    Logged (and written to ``trainer_state.json``'s history): ``supermask/kept_fraction`` (evaluation masks) and
    ``supermask/mask_changed`` (fraction of gated weights whose mask bit flipped since the previous log).
    """

    def __init__(self, write_subnetwork: bool = True) -> None:
        self.write_subnetwork = write_subnetwork
        self._previous: list | None = None  # the masks at the previous log

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        stats, self._previous = mask_statistics(unwrap(model), self._previous)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not (self.write_subnetwork and model is not None and state.is_world_process_zero):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and _has_masks(model):
            save_subnetwork(unwrap(model), folder / SUBNETWORK_FILE)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.write_subnetwork and model is not None and state.is_world_process_zero and _has_masks(model):
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            save_subnetwork(unwrap(model), Path(args.output_dir) / SUBNETWORK_FILE)


def _has_masks(model) -> bool:
    pairs = list(gated_layers(unwrap(model)))
    return bool(pairs) and pairs[0][1].method.name != "dense"
