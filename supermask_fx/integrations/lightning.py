"""PyTorch Lightning: a callback that logs mask statistics and writes the subnetwork file beside the checkpoints.

Lightning needs no adapter to train a popupified network (popupify it in ``__init__``, return an optimizer over
``supermask_parameters(self)`` from ``configure_optimizers``) nor to resume (``ckpt_path=``: the module's
``state_dict`` carries masked weights, scores and settings, checked on load: ``supermask_fx.core.state``). Import it as
``from supermask_fx.integrations.lightning import SupermaskCallback``; it works with ``lightning`` and
``pytorch_lightning``.
"""

from __future__ import annotations

import math
from pathlib import Path

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    from pytorch_lightning.callbacks import Callback

from ..core.masks import check_no_adapters, gated_layers, mask_statistics
from ..core.schedule import KWarmup
from ..files.subnetwork import save_subnetwork

SUBNETWORK_FILE = "subnetwork.safetensors"

__all__ = ["SupermaskCallback", "SUBNETWORK_FILE"]


class SupermaskCallback(Callback):
    """Logs ``supermask/kept_fraction`` and ``supermask/mask_changed`` (fraction of gated weights whose mask bit
    flipped since the previous epoch) at the end of every training epoch, and writes ``subnetwork.safetensors``
    (``save_subnetwork``) into the checkpoint folder whenever Lightning saves a checkpoint (rank 0 only).

    ``k_warmup``: a ``supermask_fx.KWarmup``, applied before training starts (or resumes) and after every optimizer
    step, at the fractional epoch ``global_step / steps per epoch``: a resumed fit computes the same ``k``."""

    def __init__(self, write_subnetwork: bool = True, k_warmup: KWarmup | None = None) -> None:
        self.write_subnetwork = write_subnetwork
        self.k_warmup = k_warmup
        self._previous: list | None = None  # the masks at the previous log

    def on_fit_start(self, trainer, pl_module) -> None:
        check_no_adapters(pl_module)  # PEFT adapters froze the scores: no mask would train

    def on_train_start(self, trainer, pl_module) -> None:
        self._apply_k(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._apply_k(trainer, pl_module)

    def _apply_k(self, trainer, pl_module) -> None:
        if self.k_warmup is None:
            return
        per_epoch = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
        self.k_warmup.apply(pl_module, trainer.global_step / max(1, per_epoch))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stats, self._previous = mask_statistics(pl_module, self._previous)
        if stats:
            pl_module.log_dict(stats, on_epoch=True, rank_zero_only=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        callback = trainer.checkpoint_callback
        if not (self.write_subnetwork and trainer.is_global_zero and callback is not None and callback.dirpath):
            return
        pairs = list(gated_layers(pl_module))
        if pairs and pairs[0][1].method.has_mask:
            root = next(m for m in pl_module.modules() if "_supermask_discovery" in m.__dict__)
            Path(callback.dirpath).mkdir(parents=True, exist_ok=True)
            save_subnetwork(root, Path(callback.dirpath) / SUBNETWORK_FILE)
