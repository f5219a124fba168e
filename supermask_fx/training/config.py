"""``TrainConfig``: every setting of a training run, as one value (stored in checkpoints and run folders)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from ..core.dataclass_io import dataclass_from_dict

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")
ON_NONFINITE = ("raise", "skip")

# Fields that change what a run computes. A checkpoint records them; resuming with other values is refused,
# because the resumed run could no longer end where the uninterrupted one would have.
RESULT_FIELDS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "betas",
    "weight_decay",
    "label_smoothing",
    "schedule",
    "warmup_epochs",
    "min_lr",
    "k_warmup_epochs",
    "k_warmup_shape",
    "grad_accum_steps",
    "max_grad_norm",
    "mixed_precision",
    "seed",
    "drop_last",
    "channels_last",
)


@dataclass
class TrainConfig:
    """How ``supermask_fx.training.train`` trains a model.

    Attributes:
        epochs: number of passes over the training set.
        batch_size: examples per micro-batch **per process**; one optimizer step sees
            ``batch_size * num_processes * grad_accum_steps`` examples (the global batch).
        optimizer: ``"sgd"`` (momentum, optional Nesterov), ``"adam"`` or ``"adamw"``.
        lr: peak learning rate (reached after the warm-up).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        betas: Adam betas.
        weight_decay: L2 penalty on every trainable parameter. For a supermask network these are the scores,
            as in the paper (its code decays the scores).
        label_smoothing: label smoothing of the cross-entropy loss (the paper uses 0.1 on ImageNet).
        schedule: ``"cosine"`` (to ``min_lr`` over the run, after the warm-up) or ``"constant"``; the learning
            rate changes at every optimizer step.
        warmup_epochs: linear warm-up length in epochs (may be fractional); the rate climbs from ``lr / W`` to
            ``lr`` over the ``W`` warm-up steps.
        min_lr: final learning rate of the cosine schedule.
        k_warmup_epochs: a k warm-up (``supermask_fx.KWarmup``): the fraction kept goes from 1 to popupify's ``k``
            over this many epochs (may be fractional; updated before every optimizer step), then stays; 0: none.
        k_warmup_shape: ``"linear"`` or ``"cosine"``.
        grad_accum_steps: micro-batches whose gradients are summed into one optimizer step.
        max_grad_norm: clip the gradient norm to this value (``None``: no clipping).
        mixed_precision: ``"no"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 on a CUDA device that supports
            it, else full precision). Only used when ``train`` creates the ``Accelerator`` itself.
        seed: seed of the data order and of the per-process random streams (python, numpy, torch). The
            model's own weights are whatever the model was built with (``popupify`` has its own ``seed``).
        drop_last: drop each epoch's last, incomplete micro-batch.
        eval_batch_size: batch size of evaluation (default: ``2 * batch_size``).
        eval_every: evaluate every this many epochs (and always after the last one); 0 disables evaluation.
        topk: accuracies to report, e.g. ``(1, 5)``: ``test_top1``, ``test_top5`` (``k`` is clipped to the
            number of classes).
        num_workers: DataLoader worker processes.
        channels_last: use the channels-last memory format for the model and 4-D inputs.
        out_dir: run folder for ``checkpoint.pt``, ``metrics.jsonl`` and ``config.json``; ``None`` writes
            nothing (and cannot resume).
        checkpoint: write ``checkpoint.pt`` after every epoch (atomically).
        resume: ``"auto"``: continue from ``out_dir/checkpoint.pt`` if it exists; ``True``: it must exist;
            ``False``: start afresh, and refuse to overwrite an existing checkpoint; or a path to a checkpoint
            file to continue from (later checkpoints still go to ``out_dir``).
        progress: ``"auto"`` (a tqdm bar on a terminal, plain log lines otherwise), ``"bar"``, ``"lines"`` or
            ``"none"``.
        log_every: in ``"lines"`` mode, print a line every this many optimizer steps (0: per epoch only).
        on_nonfinite: what a NaN or infinite training loss does. ``"raise"`` (default): the run stops with a
            ``NonFiniteLossError`` naming the epoch, batch and optimizer step; the last checkpoint (of the epoch
            before) stays as it was. ``"skip"``: the optimizer step that batch belongs to is not taken (its
            gradients are dropped, the schedule goes on), BatchNorm statistics of that batch are undone, and each
            epoch's metrics count ``nonfinite_batches`` and ``skipped_steps``; this costs one device
            synchronisation per optimizer step. Not compared on resume: a run stopped by a NaN can resume with
            ``"skip"``.
    """

    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    k_warmup_epochs: float = 0.0
    k_warmup_shape: str = "linear"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    mixed_precision: str = "no"
    seed: int = 0
    drop_last: bool = False
    eval_batch_size: int | None = None
    eval_every: int = 1
    topk: tuple[int, ...] = (1, 5)
    num_workers: int = 0
    channels_last: bool = False
    out_dir: str | os.PathLike | None = None
    checkpoint: bool = True
    resume: bool | str | os.PathLike = "auto"
    progress: str = "auto"
    log_every: int = 50
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.topk = tuple(self.topk)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum_steps", self.grad_accum_steps)
        if self.eval_batch_size is not None:
            _positive_int("eval_batch_size", self.eval_batch_size)
        _non_negative_int("eval_every", self.eval_every)
        _non_negative_int("num_workers", self.num_workers)
        _non_negative_int("log_every", self.log_every)
        _non_negative_int("seed", self.seed)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("progress", self.progress, PROGRESS_CHOICES)
        _choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        for name in ("lr", "weight_decay", "momentum", "label_smoothing", "warmup_epochs", "min_lr", "k_warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if self.label_smoothing >= 1:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} is longer than the run (epochs={self.epochs})")
        _choice("k_warmup_shape", self.k_warmup_shape, ("linear", "cosine"))
        if self.k_warmup_epochs > self.epochs:
            raise ValueError(f"k_warmup_epochs={self.k_warmup_epochs} is longer than the run (epochs={self.epochs})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be positive or None")
        if not self.topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.topk):
            raise ValueError(f"topk={self.topk!r} must be a non-empty tuple of positive integers, e.g. (1, 5)")
        if not (isinstance(self.resume, (bool, str, os.PathLike))):
            raise ValueError(f"resume={self.resume!r} must be 'auto', True, False or a checkpoint path")

    def to_dict(self) -> dict:
        """JSON-friendly dict of every field."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["topk"] = list(self.topk)
        for key in ("out_dir", "resume"):
            if isinstance(out[key], os.PathLike):
                out[key] = os.fspath(out[key])
        return out

    def result_fields(self) -> dict:
        """The fields that change what the run computes (compared when resuming)."""
        d = self.to_dict()
        return {key: d[key] for key in RESULT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return dataclass_from_dict(cls, data)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


PROGRESS_CHOICES = ("auto", "bar", "lines", "none")


def add_progress_argument(parser) -> None:
    """``--progress`` for a training script's ``argparse`` parser, with the help the examples share."""
    parser.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_CHOICES,
        help="auto (default): a progress bar with elapsed time and ETA when stdout is a terminal, else log lines "
        "with the ETA (every 50 steps and per epoch); bar, lines, or none",
    )


#: The method flags ``add_method_arguments`` adds, for a script's ``RESULT_SETTINGS``.
METHOD_SETTINGS = ("method", "option", "scope", "norms", "k_warmup_epochs")


def add_method_arguments(parser) -> None:
    """``--method`` (every registered method), ``--option NAME=VALUE`` (its options, repeatable), ``--scope``,
    ``--norms``, ``--weight-storage`` and ``--k-warmup-epochs`` for a training script's ``argparse`` parser, with
    the help the examples share (``popup_options(args)`` turns them into ``popupify`` keyword arguments)."""
    from ..core.method import registered_methods

    parser.add_argument("--method", default="edge_popup", choices=registered_methods(), help="default edge_popup")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of the method, repeatable (--method iterand --option rerand_freq=300; --method multicoat "
        "--option coats=3); values are read as JSON, else as text",
    )
    parser.add_argument(
        "--scope", default="layer", choices=("layer", "global"), help="top-k per layer (default) or over all layers"
    )
    parser.add_argument(
        "--norms",
        choices=("identity", "keep", "learn"),
        default=None,
        help="normalization layers: identity (default: scale 1, shift 0, frozen, the paper), keep, or learn",
    )
    parser.add_argument(
        "--weight-storage",
        choices=("dense", "bits"),
        default=None,
        help="frozen weights as one sign bit each (the default for the signed-constant inits) or float tensors",
    )
    parser.add_argument(
        "--k-warmup-epochs",
        type=float,
        default=0.0,
        help="k goes from 1 to --k over this many epochs (biprop's warm-up; default 0: none)",
    )


def popup_options(args) -> dict:
    """``popupify`` keyword arguments of ``add_method_arguments``' flags (``method``, ``method_options``, ``scope``,
    ``norms``, ``weight_storage``). Raises ``ValueError`` for an ``--option`` that is not ``NAME=VALUE``."""
    import json

    options = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option {item!r}: write it as NAME=VALUE, e.g. --option coats=3")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    out = {"method": args.method, "method_options": options, "scope": args.scope}
    for name in ("norms", "weight_storage"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out
