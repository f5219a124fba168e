"""The training engine: ``train(model, train_dataset, test_dataset, config)`` on Hugging Face accelerate.

Works for any ``nn.Module`` that maps a batch of inputs to logits (or to an object with ``.logits``), and for
every ``popupify`` method: the optimizer gets the parameters that require grad (the scores; the weights for
``"dense"`` or after ``fix_masks(model, train_weights=True)``); with none (``"random"``) there is no optimizer
step, but the forward passes still run in training mode so BatchNorm statistics are computed.

Processes: one per device (``accelerate launch`` or ``torchrun``); ``Accelerator`` picks them up. The model is
wrapped in DistributedDataParallel when it has something to train; after every epoch the buffers (BatchNorm
statistics) of process 0 are copied to the others, so every process holds the same state. Only process 0
prints and writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import DataLoader

from ..core.masks import gated_layers
from ..core.schedule import KWarmup
from ..core.wrappers import unwrap
from ..files.atomic import atomic_file, remove_stale_temporaries
from .checkpoint import (
    CHECKPOINT_NAME,
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save,
    check_compatible,
    load_checkpoint,
    model_fingerprint,
    rng_state,
    set_rng_state,
    write_failure_reason,
)
from .config import TrainConfig
from .data import EpochBatchSampler, batched, collate, dataset_fingerprint
from .lock import RunLock, RunLockedError
from .metrics import topk_correct
from .runlog import METRICS_NAME, RunLog
from .schedule import warmup_cosine

__all__ = [
    "train",
    "evaluate",
    "make_accelerator",
    "build_optimizer",
    "resolve_mixed_precision",
    "Run",
    "NonFiniteLossError",
]


def resolve_mixed_precision(mode: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a CUDA device that supports it, else ``"no"``; other values unchanged."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def make_accelerator(config: TrainConfig | None = None, **kwargs):
    """An ``accelerate.Accelerator`` for ``config`` (its mixed precision); ``kwargs`` go to ``Accelerator``."""
    from accelerate import Accelerator

    config = config or TrainConfig()
    kwargs.setdefault("mixed_precision", resolve_mixed_precision(config.mixed_precision))
    if not _has_accelerator_device():
        # Without cpu=True, accelerate (1.x) ignores torchrun's ranks on a machine without a GPU: every process
        # would train alone. With it, the processes form a gloo group (DistributedType.MULTI_CPU).
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def _has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (weight decay on all of them, as the paper's code)."""
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def _logits(output):
    return output.logits if hasattr(output, "logits") else output


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, topk: tuple[int, ...] = (1, 5), prefix: str = "test_") -> dict:
    """Loss and top-k accuracies of ``model`` over ``loader``, every example counted exactly once.

    ``loader`` must come from ``accelerator.prepare`` (each process sees its shard; the last batch is padded
    with repeated examples, which ``accelerator.gather_for_metrics`` drops). Returns ``{prefix + "loss",
    prefix + "top1", ..., prefix + "examples"}`` on every process.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    correct = torch.zeros(len(topk), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for inputs, targets in loader:
        with accelerator.autocast():
            logits = _logits(model(inputs))
        logits = logits.float()
        hits = topk_correct(logits, targets, topk).to(torch.uint8)
        losses = F.cross_entropy(logits, targets, reduction="none")
        hits, losses = accelerator.gather_for_metrics((hits, losses))
        correct += hits.sum(0, dtype=torch.float64)
        loss_sum += losses.sum(dtype=torch.float64)
        count += losses.numel()
    model.train(was_training)
    out = {f"{prefix}loss": (loss_sum / max(count, 1)).item()}
    for k, c in zip(topk, correct.tolist()):
        out[f"{prefix}top{k}"] = c / max(count, 1)
    out[f"{prefix}examples"] = count
    return out


def train(
    model: nn.Module,
    train_dataset,
    test_dataset=None,
    config: TrainConfig | None = None,
    accelerator=None,
    *,
    loss_fn=None,
    callbacks=(),
    **overrides,
) -> dict:
    """Train ``model`` in place on ``train_dataset``, evaluating on ``test_dataset`` after every epoch.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to logits; for supermask search, a popupified one.
        train_dataset: a map-style dataset of ``(input, target)`` pairs; datasets with ``get_batch(indices)``
            (``supermask_fx.data.ImageTensorDataset``) are fetched a whole batch at a time.
        test_dataset: the same for evaluation, or ``None``.
        config: a ``TrainConfig``; ``overrides`` replace some of its fields (``train(..., epochs=3)``).
        accelerator: an ``accelerate.Accelerator``; by default one is made for ``config.mixed_precision``.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default cross-entropy with ``config.label_smoothing``.
        callbacks: called as ``callback(metrics)`` on every process after each epoch (after its checkpoint).

    Returns:
        ``{"history": [per-epoch metrics], "final": last epoch's metrics, "out_dir", "checkpoint",
        "resumed_from_epoch", "train_time_s"}``. Per-epoch metrics: ``epoch``, ``step``, ``lr``, ``train_loss``,
        ``train_top1``, ``test_loss``, ``test_top1``, ``test_top5``, ``test_examples``, ``epoch_time_s``, and with
        ``on_nonfinite="skip"`` ``nonfinite_batches`` and ``skipped_steps``.

    Raises:
        ValueError: bad settings (batch larger than the data set, empty data set, a model converted to float16
            or bfloat16: keep it in float32 and set ``mixed_precision``, ...).
        FileExistsError: ``resume=False`` and ``out_dir`` already holds a checkpoint.
        CheckpointMismatchError: the checkpoint to resume was made by another model, other settings or other
            data (``dataset_fingerprint``: the length and a hash of a fixed sample of items).
        RunLockedError: another run holds ``out_dir`` (the message names it: pid, host, start time).
        CheckpointError: a checkpoint, ``config.json``, the lock or the folder could not be read or written (a
            previous checkpoint stays intact); the message names the file and the cause.
        NonFiniteLossError: a training loss was NaN or infinite (``on_nonfinite="raise"``); the message names the
            epoch, batch and optimizer step, and the last checkpoint is the previous epoch's, intact.
    """
    config = config or TrainConfig()
    if overrides:
        config = replace(config, **overrides)
    with Run(model, train_dataset, test_dataset, config, accelerator, loss_fn=loss_fn, callbacks=callbacks) as run:
        return run.fit()


class Run:
    """One training run; ``train`` is ``with Run(...) as run: run.fit()``. Its parts are usable on their own:
    ``train_epoch(epoch)``, ``evaluate()``, ``save_checkpoint()``. A run with an ``out_dir`` holds that folder
    (``lock.RunLock``) from its construction to ``close()``."""

    def __init__(self, model, train_dataset, test_dataset, config, accelerator=None, *, loss_fn=None, callbacks=()):
        self.config = config
        _refuse_half_models(unwrap(model))
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.callbacks = list(callbacks)
        self.loss_fn = loss_fn or _CrossEntropy(config.label_smoothing)
        self._check_data(train_dataset, test_dataset)
        self.out_dir = Path(config.out_dir) if config.out_dir is not None else None
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None
        self._lock = None
        self._made_out_dir = False
        try:
            if self.out_dir is not None:  # one run per folder, from here to close()
                self._on_main_process(self._hold_out_dir)
            self._setup(model, train_dataset, test_dataset)
        except BaseException:
            self.close()
            raise

    def _setup(self, model, train_dataset, test_dataset) -> None:
        config, acc = self.config, self.accelerator
        resume_from = self._resume_source()
        self.log = RunLog(acc.is_main_process, config.progress, self.out_dir, config.log_every)
        self.data_fingerprint = None
        if resume_from is not None or self.checkpoint_path is not None:
            self.data_fingerprint = {
                "train": dataset_fingerprint(train_dataset),
                "test": dataset_fingerprint(test_dataset) if test_dataset is not None else None,
            }

        # the model and what it trains
        self.base = unwrap(model)
        self.base.to(acc.device)
        if config.channels_last:
            self.base.to(memory_format=torch.channels_last)
        self.trainable = [p for p in self.base.parameters() if p.requires_grad]
        self.fingerprint = model_fingerprint(self.base)

        # data
        self.sampler = EpochBatchSampler(
            len(train_dataset),
            config.batch_size,
            rank=self.rank,
            world_size=self.world,
            seed=config.seed,
            drop_last=config.drop_last,
        )
        self.train_loader = DataLoader(
            batched(train_dataset),
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=config.num_workers,
            pin_memory=acc.device.type == "cuda",
            # not persistent: workers are re-seeded from the main random stream every epoch, which a resumed
            # run restores, so random augmentations in workers repeat exactly after a resume
            persistent_workers=False,
        )
        self.micro_steps = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.micro_steps / config.grad_accum_steps)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.test_loader = None
        if test_dataset is not None and config.eval_every > 0:
            eval_bs = min(config.eval_batch_size or 2 * config.batch_size, len(test_dataset))
            loader = DataLoader(
                batched(test_dataset),
                batch_size=eval_bs,
                shuffle=False,
                collate_fn=collate,
                num_workers=config.num_workers,
                pin_memory=acc.device.type == "cuda",
            )
            self.test_loader = acc.prepare_data_loader(loader)

        # optimizer and schedule
        self.optimizer = self.scheduler = None
        if self.trainable:
            self.optimizer = build_optimizer(self.trainable, config)
            self.scheduler = warmup_cosine(
                self.optimizer,
                self.total_steps,
                round(config.warmup_epochs * self.steps_per_epoch),
                config.min_lr,
                cosine=config.schedule == "cosine",
            )

        self.k_warmup = None
        if config.k_warmup_epochs > 0:
            if not any(True for _ in gated_layers(self.base)):
                raise ValueError("k_warmup_epochs needs a popupified model (a top-k method): call popupify first")
            self.k_warmup = KWarmup(config.k_warmup_epochs, config.k_warmup_shape)

        # state: fresh or resumed
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.resumed_from_epoch = None
        restored_rng = None
        if resume_from is not None:
            restored_rng = self._load(resume_from)
        else:
            from accelerate.utils import set_seed

            set_seed(config.seed + self.rank)

        # wrap for distributed training (DDP refuses a model with nothing to train)
        self.model = acc.prepare_model(self.base) if self.trainable else self.base
        if self.optimizer is not None:
            self.optimizer = acc.prepare_optimizer(self.optimizer)
        if self.out_dir is not None:
            self._on_main_process(self._prepare_out_dir)
        if restored_rng is not None:  # last: nothing after this may draw random numbers before the next epoch
            set_rng_state(restored_rng)

    # ------------------------------------------------------------------------------------------ the run folder

    def _on_main_process(self, work) -> None:
        """``work()`` on process 0; a ``CheckpointError`` it raises is raised on every process (collective)."""
        error = [None]
        if self.accelerator.is_main_process:
            try:
                work()
            except CheckpointError as e:
                if self.world == 1:
                    raise
                error = [(type(e).__name__, str(e))]
                raised = e
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(error, from_process=0)
            if error[0] is not None:
                if self.accelerator.is_main_process:
                    raise raised
                raise (RunLockedError if error[0][0] == "RunLockedError" else CheckpointError)(error[0][1])

    def _hold_out_dir(self) -> None:
        self._made_out_dir = not self.out_dir.exists()
        self._lock = RunLock(self.out_dir).acquire()

    def _prepare_out_dir(self) -> None:
        """Process 0: clean up after killed writes, write ``config.json``, start or rewrite ``metrics.jsonl``;
        a failure (a full disk, permissions) is a ``CheckpointError`` naming the file and the cause."""
        out = self.out_dir
        target = out
        try:
            out.mkdir(parents=True, exist_ok=True)
            stale = [p.name for name in (CHECKPOINT_NAME, METRICS_NAME) for p in remove_stale_temporaries(out / name)]
            if stale:  # a run killed while writing: its temporary files are useless, the files they replace intact
                self.log.print(f"removed {len(stale)} temporary file(s) of an interrupted write: {', '.join(stale)}")
            target = out / "config.json"
            with atomic_file(target) as f:  # a crash mid-write keeps the previous file
                f.write((json.dumps(self.config.to_dict(), indent=2) + "\n").encode())
            target = out / METRICS_NAME
            if self.resumed_from_epoch is not None:
                self.log.rewrite(self.history)
            elif target.exists():
                target.unlink()
        except OSError as error:
            kept = "; the files of the run so far are intact" if self.resumed_from_epoch is not None else ""
            raise CheckpointError(
                f"cannot write {target}: {write_failure_reason(error, target.parent)}{kept}"
            ) from error

    def close(self) -> None:
        """Release the run folder (``train`` calls this when the run ends, however it ends); a ``Run`` that is
        not closed holds its folder until it is garbage-collected or its process ends."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()
        if getattr(self, "_made_out_dir", False):  # a run refused before it wrote anything leaves no empty folder
            self._made_out_dir = False
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ checks

    def _check_data(self, train_dataset, test_dataset) -> None:
        c = self.config
        n = len(train_dataset)
        if n == 0:
            raise ValueError("the training set is empty")
        per_process = math.ceil(n / self.world)
        if c.batch_size > per_process:
            where = f" ({per_process} per process with {self.world} processes)" if self.world > 1 else ""
            raise ValueError(
                f"batch_size={c.batch_size} is larger than the training set: {n} examples{where}. "
                f"Use a batch size of at most {per_process}, or more data."
            )
        if c.drop_last and per_process // c.batch_size == 0:
            raise ValueError(f"drop_last=True with batch_size={c.batch_size} leaves no batch of {per_process} examples")
        if test_dataset is not None and len(test_dataset) == 0:
            raise ValueError("the test set is empty (pass test_dataset=None to skip evaluation)")

    def _resume_source(self) -> Path | None:
        c = self.config
        resume = c.resume
        if isinstance(resume, (str, os.PathLike)) and resume not in ("auto",):
            path = Path(resume)
            if path.is_dir():
                path = path / CHECKPOINT_NAME
            if not path.is_file():
                raise CheckpointError(f"resume={os.fspath(resume)!r}: no checkpoint file at {path}")
            return path
        existing = self.checkpoint_path is not None and self.checkpoint_path.is_file()
        if resume is True and not existing:
            where = self.checkpoint_path if self.checkpoint_path is not None else "out_dir=None"
            raise CheckpointError(f"resume=True but there is no checkpoint to resume ({where})")
        if resume is False and existing and c.checkpoint:
            raise FileExistsError(
                f"{self.checkpoint_path} already exists: pass resume=True (or --resume) to continue that run, or use "
                "another out_dir; delete it to start over"
            )
        return self.checkpoint_path if existing and c.checkpoint else None

    # ------------------------------------------------------------------------------------------ checkpoints

    def _load(self, path: Path) -> dict | None:
        state = load_checkpoint(path)
        check_compatible(path, state, self.fingerprint, self.config.result_fields(), self.data_fingerprint)
        self.base.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.resumed_from_epoch = self.epoch
        rngs = state["rng"]
        if len(rngs) != self.world:
            warnings.warn(
                f"{path} was written by {len(rngs)} processes, this run has {self.world}: it continues, but the data "
                "order and random streams differ from the uninterrupted run",
                stacklevel=3,
            )
            from accelerate.utils import set_seed

            set_seed(self.config.seed + self.rank + 1000 * self.epoch)
            return None
        return rngs[self.rank]

    def save_checkpoint(self) -> None:
        """Write ``out_dir/checkpoint.pt`` (process 0; collective: call on every process)."""
        from accelerate.utils import broadcast_object_list, gather_object

        acc = self.accelerator
        rngs = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        error = [None]
        if acc.is_main_process:
            state = {
                "format": FORMAT,
                "version": VERSION,
                "epoch": self.epoch,
                "step": self.step,
                "model": self.base.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": rngs,
                "history": self.history,
                "config": self.config.to_dict(),
                "fingerprint": self.fingerprint,
                "data": self.data_fingerprint,
                "world_size": self.world,
            }
            try:
                atomic_save(state, self.checkpoint_path)
            except CheckpointError as e:
                error = [str(e)]
        if self.world > 1:
            broadcast_object_list(error, from_process=0)
        if error[0] is not None:
            raise CheckpointError(error[0])

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        c = self.config
        t_start = time.perf_counter()
        if self.resumed_from_epoch is not None:
            self.log.print(f"resuming {self.checkpoint_path or ''} after epoch {self.epoch}/{c.epochs}")
        self.log.start_run(c.epochs, self.steps_per_epoch, self.epoch)  # the bar, the elapsed time and the ETA
        try:
            while self.epoch < c.epochs:
                t0 = time.perf_counter()
                metrics = {"epoch": self.epoch + 1}
                metrics.update(self.train_epoch(self.epoch))
                self._sync_buffers()
                last = self.epoch + 1 == c.epochs
                if self.test_loader is not None and ((self.epoch + 1) % c.eval_every == 0 or last):
                    self.log.evaluating()
                    metrics.update(self.evaluate())
                metrics["step"] = self.step
                metrics["epoch_time_s"] = round(time.perf_counter() - t0, 3)
                self.epoch += 1
                self.history.append(metrics)
                self.log.epoch(metrics)
                if self.checkpoint_path is not None and c.checkpoint:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(metrics)
        except KeyboardInterrupt:
            if self.checkpoint_path is not None and self.history:
                self.log.print(
                    f"interrupted; {self.checkpoint_path} holds epoch {len(self.history)}: "
                    "run again with resume to go on"
                )
            raise
        finally:
            self.log.end_run()
        self.accelerator.wait_for_everyone()
        return {
            "history": self.history,
            "final": self.history[-1] if self.history else {},
            "out_dir": str(self.out_dir) if self.out_dir is not None else None,
            "checkpoint": str(self.checkpoint_path) if self.checkpoint_path is not None and c.checkpoint else None,
            "resumed_from_epoch": self.resumed_from_epoch,
            "train_time_s": round(time.perf_counter() - t_start, 3),
        }

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training set; returns ``train_loss``, ``train_top1`` and ``lr`` (and, with
        ``on_nonfinite="skip"``, ``nonfinite_batches`` and ``skipped_steps``).

        Raises:
            NonFiniteLossError: a batch's loss was NaN or infinite (``on_nonfinite="raise"``).
        """
        c, acc = self.config, self.accelerator
        self.sampler.set_epoch(epoch)
        self.model.train()
        device = acc.device
        accum = c.grad_accum_steps
        full_groups_end = self.micro_steps - self.micro_steps % accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        lr = self._lr()
        self.log.start_epoch(epoch, c.epochs, self.steps_per_epoch)
        step_in_epoch = 0
        grad_ctx = contextlib.nullcontext if self.optimizer is not None else torch.no_grad
        # Non-finite losses. A loss on the CPU is on the host already: it is checked at once, before its backward
        # pass changes anything. On an accelerator, reading it would stall the device at every step: each loss is
        # copied into a tensor on the device (one small copy, no synchronisation), read where the loop reads
        # anyway: at the progress points that print the loss, and at the end of the epoch (the epoch's loss sum is
        # not finite exactly when one of its losses was not). "skip" has to decide before each optimizer step: one
        # read per step.
        skip = c.on_nonfinite == "skip"
        check_each = not skip and self.world == 1 and _loss_on_host(device)
        losses = None
        if not skip and not check_each:
            losses = torch.zeros(self.micro_steps, dtype=torch.float32, device=device)
        if skip:
            seen = torch.zeros((), dtype=torch.float64, device=device)  # examples of batches with a finite loss
            bad = torch.zeros((), dtype=torch.float64, device=device)  # batches with a non-finite loss
            group_bad = torch.zeros((), dtype=torch.bool, device=device)
            stats = [b for m in self.base.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
        skipped = 0
        step0 = self.step
        for i, (inputs, targets) in enumerate(self.train_loader):
            if self.k_warmup is not None and i % accum == 0:  # the k of this optimizer step (core.schedule)
                self.k_warmup.apply(self.base, self.step / self.steps_per_epoch)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if c.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            boundary = (i + 1) % accum == 0 or i + 1 == self.micro_steps
            group = accum if i < full_groups_end else self.micro_steps - full_groups_end
            sync = contextlib.nullcontext() if boundary or self.optimizer is None else acc.no_sync(self.model)
            if skip:
                saved_stats = [b.detach().clone() for b in stats]
            with sync, grad_ctx():
                with acc.autocast():
                    logits = _logits(self.model(inputs))
                loss = self.loss_fn(logits.float(), targets)
                if check_each:
                    value = loss.detach().item()
                    if not math.isfinite(value):
                        self._stop_nonfinite(epoch, i, value, step0)
                if self.optimizer is not None:
                    acc.backward(loss / group)
            with torch.no_grad():
                n = targets.shape[0]
                if skip:
                    finite = torch.isfinite(loss.detach())
                    for buffer, before in zip(stats, saved_stats):  # a skipped batch leaves BatchNorm statistics
                        buffer.copy_(torch.where(finite, buffer, before))
                    ok = finite.to(torch.float64)
                    loss_sum += torch.where(finite, loss.detach().to(torch.float64), 0.0) * n
                    correct += (logits.detach().argmax(1) == targets).sum() * ok
                    seen += n * ok
                    bad += 1 - ok
                    group_bad |= ~finite
                else:
                    loss_sum += loss.detach().to(torch.float64) * n
                    correct += (logits.detach().argmax(1) == targets).sum()
                    seen += n
                    if losses is not None:
                        losses[i] = loss.detach()
            if boundary:
                skip_step = False
                if skip:
                    flag = group_bad.to(torch.float32)
                    if self.world > 1:  # every process skips the same steps
                        flag = acc.reduce(flag, reduction="sum")
                    skip_step = flag.item() > 0
                    group_bad.zero_()
                if self.optimizer is not None:
                    if skip_step:  # no update: the gradients are dropped, the schedule goes on with the data
                        self.optimizer.zero_grad(set_to_none=True)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
                            self.scheduler.step()
                    else:
                        if c.max_grad_norm is not None:
                            acc.clip_grad_norm_(self.trainable, c.max_grad_norm)
                        self.optimizer.step()
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                skipped += skip_step
                self.step += 1
                step_in_epoch += 1
                if self.log.wants_step_stats(step_in_epoch):
                    if losses is not None and self.world == 1:  # the losses so far, read with the one printed
                        read = torch.stack([loss.detach().double(), _first_nonfinite(losses[: i + 1])]).tolist()
                        loss_value, first = read[0], int(read[1])
                        if first <= i:
                            self._stop_nonfinite(epoch, first, losses[first].item(), step0)
                    else:
                        loss_value = loss.item()
                    self.log.step(step_in_epoch, loss_value, self._lr())
                else:
                    self.log.step(step_in_epoch)
        self.log.end_epoch()
        if not skip:
            seen = torch.tensor(float(seen), dtype=torch.float64, device=device)
            bad = torch.zeros((), dtype=torch.float64, device=device)
        totals = torch.stack([loss_sum, correct, seen, bad])
        if self.world > 1:
            totals = acc.reduce(totals, reduction="sum")
        loss_total, correct_total, seen_total, bad_total = totals.tolist()
        if losses is not None and not math.isfinite(loss_total):  # some process had a non-finite loss
            first = _first_nonfinite(losses)
            mine = torch.stack([first, losses[first.clamp(max=self.micro_steps - 1).long()].double()]).view(1, 2)
            firsts = (acc.gather(mine) if self.world > 1 else mine).tolist()
            rank = min(range(len(firsts)), key=lambda r: (firsts[r][0], r))  # the first batch of the first process
            self._stop_nonfinite(epoch, int(firsts[rank][0]), firsts[rank][1], step0, rank)
        metrics = {
            "lr": lr,
            "train_loss": loss_total / seen_total if seen_total else math.nan,
            "train_top1": correct_total / seen_total if seen_total else math.nan,
        }
        if skip:
            metrics["nonfinite_batches"] = int(bad_total)
            metrics["skipped_steps"] = skipped
            if skipped:
                self.log.print(
                    f"epoch {epoch + 1}: skipped {skipped} optimizer step(s): {int(bad_total)} batch(es) with a "
                    "non-finite loss (NaN or inf in the inputs?)"
                )
        return metrics

    def _stop_nonfinite(self, epoch: int, index: int, value: float, step0: int, rank: int = 0):
        """Raise ``NonFiniteLossError`` for micro-batch ``index`` of ``epoch`` (0-based both; ``step0``: optimizer
        steps done before the epoch)."""
        c = self.config
        step = step0 + index // c.grad_accum_steps + 1
        where = f" on process {rank}" if self.world > 1 else ""
        if self.checkpoint_path is not None and c.checkpoint and self.epoch > 0:
            kept = f"{self.checkpoint_path} (epoch {self.epoch}) is unchanged: resume from it once the data is fixed"
        elif self.checkpoint_path is not None and c.checkpoint:
            kept = "no checkpoint was written yet"
        else:
            kept = "checkpoints are off, nothing was saved"
        raise NonFiniteLossError(
            f"the training loss is {value} at epoch {epoch + 1}, batch {index + 1} of {self.micro_steps}{where} "
            f"(optimizer step {step}): NaN or inf in that batch's inputs, or a model that diverged. The run stops "
            f"here; {kept}. To skip such batches instead (no optimizer step, counted in the metrics), set "
            "TrainConfig(on_nonfinite='skip').",
            epoch=epoch + 1,
            batch=index + 1,
            step=step,
        )

    def evaluate(self) -> dict:
        """Test-set metrics (every process gets them), with the k of the steps made so far."""
        if self.k_warmup is not None:
            self.k_warmup.apply(self.base, self.step / self.steps_per_epoch)
        return evaluate(self.base, self.test_loader, self.accelerator, self.config.topk)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Copy process 0's floating-point buffers (BatchNorm statistics) to every process."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for buffer in self.base.buffers():
            if buffer.dtype != torch.bool:
                dist.broadcast(buffer, src=0)


def _first_nonfinite(losses: torch.Tensor) -> torch.Tensor:
    """The index of the first non-finite entry of ``losses`` (a device scalar, float64), ``len(losses)`` if none."""
    bad = ~torch.isfinite(losses)
    positions = torch.arange(len(losses), device=losses.device, dtype=torch.float64)
    return torch.where(bad, positions, float(len(losses))).min()


def _loss_on_host(device: torch.device) -> bool:
    """Whether reading a loss computed on ``device`` costs no synchronisation (the CPU computes eagerly)."""
    return device.type == "cpu"


def _refuse_half_models(model: nn.Module) -> None:
    """A model converted with ``.half()`` / ``.bfloat16()`` would meet float32 inputs ("expected m1 and m2 to have
    the same dtype"), and would keep its scores and optimizer state in 16 bits: say what to do instead. Scores kept in
    16 bits on purpose (``popupify(..., score_dtype="bfloat16")``) are not such a conversion: the forward reads the
    float32 weights."""
    chosen = {
        id(module._parameters[gate.scores])
        for module, gate in gated_layers(model)
        if gate.scores is not None and gate.config.score_dtype is not None
    }
    half = sorted(
        {str(p.dtype) for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in chosen}
    )
    if half:
        raise ValueError(
            f"the model's parameters are {', '.join(half)} (converted with .half() or .bfloat16()?): the engine "
            "trains float32 models. Keep the model in float32 and set TrainConfig(mixed_precision='bf16') (or "
            "'fp16', or 'auto'): the forward and backward passes then run in 16 bits under autocast while the "
            "scores, weights, masks and optimizer state stay float32"
        )


class NonFiniteLossError(FloatingPointError):
    """A training batch's loss was NaN or infinite (``TrainConfig(on_nonfinite="raise")``). ``epoch`` and ``batch``
    (1-based, ``batch`` a micro-batch of the epoch) and ``step`` (the optimizer step, 1-based) name it."""

    def __init__(self, message: str, *, epoch: int | None = None, batch: int | None = None, step: int | None = None):
        super().__init__(message)
        self.epoch, self.batch, self.step = epoch, batch, step


class _CrossEntropy:
    def __init__(self, label_smoothing: float) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
