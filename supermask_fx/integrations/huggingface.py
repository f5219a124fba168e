"""Hugging Face ``transformers``: reload a saved popupified model, and a ``Trainer`` callback.

``Trainer`` needs no adapter to train (its optimizer takes the parameters with ``requires_grad``: the scores) nor
to save and resume (``state_dict`` carries the masked weights, the scores and the settings: ``core.state``).
This module adds:

* ``from_pretrained(model_class, directory)``: the popupified model back from a ``save_pretrained`` /
  ``Trainer.save_model`` directory (scores, settings, same logits), ready to train further or to evaluate;
* ``SupermaskCallback``: logs the kept fraction and how much of the mask changed since the last log, warns once when
  the first logging interval changed no mask bit (the learning rate is far too small for scores), refuses a model
  wrapped with PEFT adapters, and writes the compact subnetwork file (``save_subnetwork``) into every checkpoint
  folder and the output folder.

A plain ``model_class.from_pretrained(directory)`` of such a directory gives the subnetwork itself (the masked
weights are stored under the usual names; ``transformers`` reports the scores and the settings record as unused).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from transformers import AutoConfig, TrainerCallback

from ..core.masks import check_no_adapters, gated_layers, mask_statistics
from ..core.popup import CONFIG_KEY
from ..core.schedule import KWarmup
from ..core.wrappers import unwrap
from ..files.folder import MASKS_CONFIG, load_masks
from ..files.restore import restore
from ..files.subnetwork import save_subnetwork

SUBNETWORK_FILE = "subnetwork.safetensors"

__all__ = ["from_pretrained", "masks_from_pretrained", "SupermaskCallback", "SUBNETWORK_FILE"]


def from_pretrained(model_class, directory: str | os.PathLike, base: str | os.PathLike | None = None, **kwargs):
    """The popupified model saved in ``directory`` (by ``save_pretrained`` / ``Trainer.save_model``), trainable,
    with the same logits (``supermask_fx.restore``). ``model_class`` is a ``PreTrainedModel`` class or an
    ``AutoModelFor...`` class.

    Random weights (the default ``init``) are drawn again from the saved seed, so the model is built from the
    directory's config. Masks over pretrained weights (``init="keep"``) need those weights: ``base`` names the
    checkpoint they came from (what ``model_class.from_pretrained`` takes), and the saved masked weights are checked
    against it. ``kwargs`` go to ``AutoConfig.from_pretrained`` (or to ``from_pretrained`` of the base).
    """
    if base is not None:
        return restore(model_class.from_pretrained(base, **kwargs), directory)
    config = AutoConfig.from_pretrained(directory, **kwargs)
    saved = getattr(config, CONFIG_KEY, None)
    if isinstance(saved, dict) and saved.get("popupify", {}).get("init") == "keep":
        raise ValueError(
            f"{directory} holds masks over pretrained weights (init='keep'): pass base= the checkpoint they were "
            "found on, e.g. from_pretrained(cls, directory, base='bert-base-uncased')"
        )
    if hasattr(model_class, "from_config"):
        model = model_class.from_config(config)
    else:
        model = model_class._from_config(config)
    return restore(model, directory)


def masks_from_pretrained(model_class, directory: str | os.PathLike, base: str | os.PathLike | None = None, **kwargs):
    """The base model with the masks of a ``save_masks`` folder on it (masks fixed; the PEFT-style reload):
    ``model_class.from_pretrained(base)`` (default: the folder's ``base_model_name_or_path``), then ``load_masks``,
    which checks the base weights against the folder's fingerprints."""
    if base is None:
        info = json.loads((Path(directory) / MASKS_CONFIG).read_text())
        base = info.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{directory}: the masks config names no base model: pass base=")
    return load_masks(model_class.from_pretrained(base, **kwargs), directory)


class SupermaskCallback(TrainerCallback):
    """Mask statistics in the logs, and the subnetwork file in every checkpoint folder.

    Logged (and written to ``trainer_state.json``'s history): ``supermask/kept_fraction`` (evaluation masks) and
    ``supermask/mask_changed`` (fraction of gated weights whose mask bit flipped since the previous training log,
    the first one counted from the start of training). In the logs of ``trainer.evaluate()`` the kept fraction is
    ``eval_supermask/kept_fraction``, like the other evaluation metrics.

    Warns once (``UserWarning``) when no mask bit changed over the first logging interval: the optimizer moves the
    scores too little to cross the threshold. Edge-popup needs learning rates far above fine-tuning's (the paper:
    SGD lr 0.1, momentum 0.9); ``Trainer``'s default AdamW at 5e-5 flips almost nothing.

    ``k_warmup``: a ``supermask_fx.KWarmup``, applied when training begins (or resumes) and after every optimizer
    step, at the fractional epoch ``global_step * num_train_epochs / max_steps``: a resumed run computes the same
    ``k``.
    """

    def __init__(self, write_subnetwork: bool = True, k_warmup: KWarmup | None = None) -> None:
        self.write_subnetwork = write_subnetwork
        self.k_warmup = k_warmup
        self._previous: list | None = None  # the masks at the previous training log
        self._warned = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        check_no_adapters(unwrap(model))
        self._apply_k(state, model)
        _, self._previous = mask_statistics(unwrap(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._apply_k(state, model)

    def _apply_k(self, state, model) -> None:
        """The k warm-up at the fractional epoch ``global_step / steps per epoch`` (the k of the next step)."""
        if self.k_warmup is None or model is None or not state.max_steps:
            return
        per_epoch = state.max_steps / max(1e-12, float(state.num_train_epochs or 1))
        self.k_warmup.apply(unwrap(model), state.global_step / per_epoch)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        if any(key.startswith("eval_") for key in logs):  # trainer.evaluate(): its metrics carry the prefix
            stats, _ = mask_statistics(unwrap(model))
            stats = {"eval_" + key: value for key, value in stats.items() if key.endswith("kept_fraction")}
        else:
            first = not self._warned
            stats, self._previous = mask_statistics(unwrap(model), self._previous)
            if first and stats.get("supermask/mask_changed", 1.0) == 0.0 and state.global_step > 0:
                self._warned = True
                _warn_no_change(args, state, logs)
            self._warned = True
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


def _warn_no_change(args, state, logs) -> None:
    lr = logs.get("learning_rate", args.learning_rate)
    warnings.warn(
        f"supermask_fx: no mask bit changed in the first {state.global_step} steps (optimizer {args.optim}, "
        f"learning rate {lr:g}): the scores move too little to change the subnetwork. Edge-popup trains scores with "
        "far larger steps than fine-tuning: the paper's recipe is TrainingArguments(optim='sgd', learning_rate=0.1, "
        "weight_decay=1e-4, lr_scheduler_type='cosine') (see docs/plugging-in.md)",
        stacklevel=2,
    )


def _has_masks(model) -> bool:
    pairs = list(gated_layers(unwrap(model)))
    return bool(pairs) and pairs[0][1].method.has_mask
