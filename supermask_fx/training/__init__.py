"""Training runs on Hugging Face accelerate: ``train(model, train_dataset, test_dataset, TrainConfig(...))``.

    from supermask_fx import popupify
    from supermask_fx.training import TrainConfig, train

    popupify(model, k=0.5)
    result = train(model, train_set, test_set, TrainConfig(epochs=10, lr=0.1, out_dir="runs/demo"))
    print(result["final"]["test_top1"])

Cosine schedule with linear warm-up (per step), SGD/Adam, label smoothing, weight decay (on the scores of a
supermask network), bf16, gradient accumulation, top-1/top-5 gathered over processes, per-epoch atomic
checkpoints with exact resume (refused with another model, other settings or other data), one run per run folder
(a lock), a stop at the first NaN or infinite loss. Needs the ``train`` extra (accelerate, tqdm); importing this
package does not: accelerate is imported when a run starts. See docs/training.md.
"""

from .checkpoint import CheckpointError, CheckpointMismatchError, atomic_save, load_checkpoint
from .config import METHOD_SETTINGS, TrainConfig, add_method_arguments, add_progress_argument, popup_options
from .data import EpochBatchSampler, RandomCropFlip, batched, dataset_fingerprint
from .engine import (
    NonFiniteLossError,
    Run,
    build_optimizer,
    evaluate,
    make_accelerator,
    resolve_mixed_precision,
    train,
)
from .lock import RunLockedError
from .metrics import accuracy, topk_correct
from .runlog import read_metrics
from .schedule import WarmupCosine, warmup_cosine

__all__ = [
    "add_progress_argument",
    "add_method_arguments",
    "popup_options",
    "METHOD_SETTINGS",
    "train",
    "TrainConfig",
    "Run",
    "evaluate",
    "make_accelerator",
    "build_optimizer",
    "resolve_mixed_precision",
    "CheckpointError",
    "CheckpointMismatchError",
    "RunLockedError",
    "NonFiniteLossError",
    "dataset_fingerprint",
    "atomic_save",
    "load_checkpoint",
    "read_metrics",
    "EpochBatchSampler",
    "RandomCropFlip",
    "batched",
    "topk_correct",
    "accuracy",
    "WarmupCosine",
    "warmup_cosine",
]
