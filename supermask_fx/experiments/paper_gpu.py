"""Fig. 3 of the paper at its own scale (CIFAR-10, 100 epochs) on one GPU: as many runs as fit in N minutes.

``python -m supermask_fx.experiments.paper_gpu [--small] [--minutes 9] [--csv docs/results/paper/results.csv]
[--workers N]`` trains the runs of ``configs.expand("fig3_depth_k", "paper", seeds)`` (the authors' recipe:
edge-popup SGD lr 0.1, learned dense weights SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 128, cosine,
100 epochs) in priority order, skips runs already in the CSV (resumable), and appends one row per finished run
(``results.append_row``, the columns ``runner.run_one`` writes, ``engine = supermask_fx.experiments.paper_gpu``)
and its per-epoch test accuracy (``curves.jsonl`` beside the CSV). The rows carry the keys of ``expand``, so
``python -m supermask_fx.experiments report --scale paper --csv docs/results/paper/results.csv`` reads them.

Order. Conv4 k = 50 % signed constant and Conv4 dense; Conv2, Conv6, Conv8 at k = 50 % each with its dense
baseline; k = 30 / 70 % (signed constant); Kaiming normal at 50 / 30 / 70 %; then k = 10 / 90 %, FC and the Adam
baselines. The seeds of a configuration are next to each other (0, 1, 2, then the next configuration): the
report's verdicts need a spread (Welch intervals over seeds), so three seeds of a few points are evidence where
one seed of many points is not, and a later run continues with the next configuration.

Speed. CIFAR-10 is decoded once (the parent process, while the workers start) and each worker keeps it on the
GPU as ``uint8``; random crop (pad 4) and flip, and normalisation, run on the GPU per batch (``crop_flip``).
The loop has no DataLoader and no per-step host synchronisation, but the engine's maths
(``supermask_fx.training``): the batch order of ``EpochBatchSampler`` for the run's seed (last batch kept),
cross-entropy, ``build_optimizer`` (SGD over the parameters that require grad) and ``warmup_cosine`` stepped
after every optimizer step, test top-1 after every epoch. Several runs share the GPU: ``--workers`` processes
(spawned) take runs from the parent one at a time; each appends its own rows (one O_APPEND write + fsync).
On CUDA (unless ``--precision fp32``): bf16 autocast for the forward and backward passes (scores, weights,
masks and optimizer state stay float32), TF32 matrix products, cuDNN autotuning and channels-last inputs
and weights. Augmentation draws come from a per-run device generator, so the crops differ from the engine's
(same distribution). GPU memory: each worker holds its CUDA context, the data (about 0.2 GB) and one small
network, 1 to 2 GB, so 8 workers need under 20 GB.

Budget. The deadline is ``--minutes`` after the start. A run is started only if its estimated time fits
before the deadline: the estimate comes from the epochs measured so far (the same kind of run, else another
kind scaled by the work per epoch, ``work_per_epoch``); before any epoch was measured the first runs start.
A running run whose own epochs say it cannot end before the deadline is abandoned (nothing recorded), so
the time is not spent on a row that never comes. A plan is printed at the start (prior guess of the
throughput), again once epochs are measured, and a summary at the end.

Without MPS the worker processes take turns on the GPU (time slices), which still hides each one's Python and
launch overhead behind the others' kernels; ``--mps`` starts NVIDIA's Multi-Process Service first (if
``nvidia-cuda-mps-control`` exists and a probe process gets a context through it, else it carries on without),
so that the small kernels of several runs execute side by side.

On a lent GPU (the device tool): the working tree travels but ``../shared/data`` does not, so put the CIFAR-10
archive (19 MB) into an ignored folder of the checkout once, here, and carry that one file; ``load_dataset``
finds it through ``$SUPERMASK_FX_DATA`` (its normal search; it extracts and decodes it into the library's cache
folder, 20-60 s, while the workers start, never beside the archive). Carry the archive alone::

    mkdir -p .data/cifar10-jpeg .git/info && echo /.data/ >> .git/info/exclude
    cp ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz .data/cifar10-jpeg/

    run(carry=[".data/cifar10-jpeg/cifar10-jpeg.tar.gz"], timeout_s=600, command=
        "export SUPERMASK_FX_DATA=$PWD/.data PYTHONUNBUFFERED=1;"
        " cp docs/results/paper/results.csv docs/results/paper/curves.jsonl $OUT/ 2>/dev/null;"
        " python3 -m supermask_fx.experiments.paper_gpu --minutes 9 --csv $OUT/results.csv"
        " --revision $(cat .data/revision) 2>&1 | tee $OUT/log")

with ``git rev-parse --short=12 HEAD > .data/revision`` here first (the copy there has no git) and
``.data/revision`` in ``carry`` too. The CSV is written under ``$OUT``, so the rows made before a kill come
back too; copy ``results.csv`` and ``curves.jsonl`` from the returned files into ``docs/results/paper/``: the
next run takes them along and continues where this one stopped. ``--small``: the same code on the CPU (or
GPU) at width 1/8, 2 epochs, 512 / 256 examples, seeds 0 and 1, 6 runs, 2 workers (the test).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .specs import DENSE_SGD, EDGE_POPUP, RunSpec

__all__ = [
    "ENGINE",
    "Options",
    "Planner",
    "crop_flip",
    "draw_augmentation",
    "main",
    "paper_runs",
    "priority",
    "small_runs",
    "train_run",
    "would_overrun",
    "work_per_epoch",
]

ENGINE = "supermask_fx.experiments.paper_gpu"
PADDING = 4
#: Prior guess of the throughput of one worker (useful TFLOP/s while 8 share an H100/H200; 0.02 on a CPU core),
#: only for the plan printed before anything was measured; decisions use measured epochs.
PRIOR_TFLOPS = {"cuda": 10.0, "cpu": 0.02}
_MODEL_ORDER = ("conv4", "conv2", "conv6", "conv8", "fc")
_K_ORDER = (0.5, 0.3, 0.7, 0.1, 0.9)


# --------------------------------------------------------------------------------------------- the runs


def priority(spec: RunSpec) -> tuple:
    """Sort key of a run: tier (see the module docstring), model, k, edge-popup before dense, seed last."""
    sc, kn = spec.init == "signed_constant", spec.init == "kaiming_normal"
    conv = spec.model in ("conv2", "conv4", "conv6", "conv8")
    dense_sgd = spec.method == "dense" and spec.optimizer == "sgd"
    popup = spec.method == "edge_popup"
    if conv and ((popup and sc and spec.k == 0.5) or dense_sgd):
        tier = 0 if spec.model == "conv4" else 1
    elif conv and popup and sc and spec.k in (0.3, 0.7):
        tier = 2
    elif conv and popup and kn and spec.k in (0.5, 0.3, 0.7):
        tier = 3
    elif conv and popup and sc:
        tier = 4
    elif conv and popup:
        tier = 5
    else:
        tier = 6
    model = _MODEL_ORDER.index(spec.model) if spec.model in _MODEL_ORDER else len(_MODEL_ORDER)
    k = _K_ORDER.index(spec.k) if spec.k in _K_ORDER else len(_K_ORDER)
    return (tier, model, k, spec.method != "edge_popup", spec.optimizer, spec.init, spec.seed)


def paper_runs(seeds: int = 3) -> list[RunSpec]:
    """Every run of Fig. 3 at paper scale (``expand("fig3_depth_k", "paper", seeds)``), in priority order."""
    from .configs import expand

    specs = sorted(expand("fig3_depth_k", "paper", seeds), key=priority)
    for spec in specs:  # the recipe the brief names; a change in configs.py must not pass unnoticed
        if spec.optimizer == "sgd":
            expected = DENSE_SGD if spec.method == "dense" else EDGE_POPUP
            if spec.recipe != expected:
                raise RuntimeError(f"{spec.model} {spec.method}: recipe {spec.recipe} is not {expected}")
    return specs


@dataclass(frozen=True)
class SmallMode:
    """What ``--small`` changes: a CPU-sized version of the same runs (still well-formed RunSpecs)."""

    width_factor: float = 1 / 8
    epochs: int = 2
    train_limit: int = 512
    test_limit: int = 256
    seeds: int = 2
    runs: int = 6
    workers: int = 2


SMALL = SmallMode()


def small_runs(small: SmallMode = SMALL) -> list[RunSpec]:
    """The first ``small.runs`` runs of ``paper_runs(small.seeds)`` at width/epochs/limits of ``small``."""
    return [
        s.with_(
            width=s.width * small.width_factor,
            epochs=small.epochs,
            train_limit=small.train_limit,
            test_limit=small.test_limit,
        )
        for s in paper_runs(small.seeds)[: small.runs]
    ]


# --------------------------------------------------------------------------------------------- GPU data


def draw_augmentation(n: int, generator: torch.Generator, padding: int = PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets ``(n, 2)`` (row, column of the crop's corner in the padded image, 0..2*padding) and
    flips ``(n,)`` (bool, probability 1/2), drawn on the generator's device."""
    device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=device, generator=generator)
    flips = torch.rand(n, device=device, generator=generator) < 0.5
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """``uint8`` images ``(n, C, H, W)`` zero-padded by ``padding``, cropped back to ``H x W`` at ``offsets``,
    then flipped left-right where ``flips``: torchvision's ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip``
    (and ``training.RandomCropFlip``) for given draws, in one gather on the images' device (channels-last result).
    """
    n, _, h, w = images.shape
    rows = offsets[:, :1] - padding + torch.arange(h, device=images.device)  # source row of each output row
    left = offsets[:, 1:] - padding
    cols_w = torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], left + (w - 1) - cols_w, left + cols_w)  # flip: output j <- crop w-1-j
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (n, H, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = images[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (n, H, W, C)
    out = out * inside[..., None].to(out.dtype)
    return out.permute(0, 3, 1, 2)


@dataclass
class DeviceData:
    """Both splits on one device: ``uint8`` train images, test images normalised once, targets, normalisation."""

    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def from_splits(cls, train, test, device: torch.device) -> DeviceData:
        """``train``/``test``: ``(images uint8, targets, mean, std)`` (what the parent sends)."""
        images, targets, mean, std = train
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        test_images = test[0].to(device)
        return cls(
            train_images=images.to(device),
            train_targets=targets.to(device),
            test_inputs=test_images.to(torch.float32) * scale + shift,
            test_targets=test[1].to(device),
            scale=scale,
            shift=shift,
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(torch.float32) * self.scale + self.shift


# --------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Options:
    """How a worker trains (not part of a run's identity)."""

    device: str = "cpu"
    bf16: bool = False
    channels_last: bool = False
    eval_batch: int = 1000
    deadline: float = math.inf  # time.time() after which no run may still be training


class Abandoned(Exception):
    """The run's own epochs say it cannot end before the deadline."""


def would_overrun(epoch_seconds: list[float], epochs: int, now: float, deadline: float) -> bool:
    """Whether a run that took ``epoch_seconds`` so far would still be training at ``deadline``. The first epoch
    (cuDNN autotuning, warm-up) is left out once later ones exist; the last three measured epochs set the pace."""
    done = len(epoch_seconds)
    if done == 0 or done >= epochs:
        return False
    steady = epoch_seconds[1:] if done > 1 else epoch_seconds
    pace = sum(steady[-3:]) / len(steady[-3:])
    return now + pace * (epochs - done) > deadline


@torch.no_grad()
def _accuracy(model, data: DeviceData, options: Options) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.test_targets.device)
    for start in range(0, data.test_targets.shape[0], options.eval_batch):
        x = data.test_inputs[start : start + options.eval_batch]
        if options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(options):
            logits = model(x)
        correct += (logits.float().argmax(1) == data.test_targets[start : start + options.eval_batch]).sum()
    model.train()
    return 100.0 * correct.item() / data.test_targets.shape[0]


def _autocast(options: Options):
    return torch.autocast(device_type=torch.device(options.device).type, dtype=torch.bfloat16, enabled=options.bf16)


def train_run(spec: RunSpec, data: DeviceData, options: Options, on_epoch=None) -> tuple[dict, list[float]]:
    """Train ``spec`` (built and popupified as ``runner.build``) on ``data``; return the result columns of
    ``runner.run_one`` and the per-epoch test accuracies. ``on_epoch(epoch, seconds)`` after each epoch.
    Raises ``Abandoned`` when the run cannot end before ``options.deadline``."""
    from .. import mask_stats, supermask_parameters
    from ..training import EpochBatchSampler, build_optimizer, warmup_cosine
    from .engine import train_config
    from .runner import build

    if spec.variant or spec.method not in ("edge_popup", "dense"):
        raise ValueError(f"paper_gpu trains plain edge-popup and dense runs, not {spec.method} {spec.variant}")
    start = time.perf_counter()
    device = torch.device(options.device)
    torch.manual_seed(spec.seed)
    model = build(spec).to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in supermask_parameters(model) if p.requires_grad]
    r = spec.recipe
    config = train_config(r, spec.epochs, spec.seed)
    n = data.train_targets.shape[0]
    sampler = EpochBatchSampler(n, r.batch_size, seed=spec.seed)
    optimizer = build_optimizer(params, config)
    scheduler = warmup_cosine(optimizer, math.ceil(n / r.batch_size) * spec.epochs, cosine=r.schedule == "cosine")
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    model.train()
    curve: list[float] = []
    seconds: list[float] = []
    for epoch in range(spec.epochs):
        t0 = time.perf_counter()
        order = sampler.order(epoch).to(device)
        for first in range(0, n, r.batch_size):
            index = order[first : first + r.batch_size]
            offsets, flips = draw_augmentation(index.shape[0], generator)
            x = data.normalize(crop_flip(data.train_images[index], offsets, flips))
            if not options.channels_last:
                x = x.contiguous()
            with _autocast(options):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), data.train_targets[index])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        curve.append(_accuracy(model, data, options))  # .item(): the epoch's work is done when it returns
        seconds.append(time.perf_counter() - t0)
        if on_epoch is not None:
            on_epoch(epoch + 1, seconds[-1])
        if would_overrun(seconds, spec.epochs, time.time(), options.deadline):
            raise Abandoned(f"{len(seconds)} epochs of {spec.epochs} in {sum(seconds):.0f} s")
    stats = mask_stats(model)
    return {
        "test_accuracy": f"{curve[-1]:.2f}",
        "kept_weights": stats.kept,
        "total_weights": stats.numel,
        "found_accuracy": None,
        "wall_time_s": f"{time.perf_counter() - start:.1f}",
        "engine": ENGINE,
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }, curve


# --------------------------------------------------------------------------------------------- budget


def work_per_epoch(spec: RunSpec) -> float:
    """Useful TFLOP of one epoch: 3 x forward multiply-adds x 2 per training example (forward and backward),
    plus one forward per test example; the multiply-adds of each Conv/Linear are counted on one forward pass."""
    return _macs(spec.model, spec.width, spec.dataset) * 2e-12 * (3 * _train_size(spec) + _test_size(spec))


_MACS: dict[tuple, float] = {}


def _macs(model_name: str, width: float, dataset: str) -> float:
    key = (model_name, float(width), dataset)
    if key not in _MACS:
        from torch import nn

        from ..data import dataset_info
        from ..models import build_model

        info = dataset_info(dataset)
        net = build_model(model_name, dataset=dataset, width=width)
        total = [0.0]

        def count(module, _inputs, output):
            if isinstance(module, nn.Conv2d):
                total[0] += module.weight.numel() * output.shape[-1] * output.shape[-2]
            else:
                total[0] += module.weight.numel()

        hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            net(torch.zeros(1, info.channels, info.image_size, info.image_size))
        for h in hooks:
            h.remove()
        _MACS[key] = total[0]
    return _MACS[key]


def _train_size(spec: RunSpec) -> int:
    from ..data import dataset_info

    size = dataset_info(spec.dataset).train_size
    return min(spec.train_limit or size, size)


def _test_size(spec: RunSpec) -> int:
    from ..data import dataset_info

    size = dataset_info(spec.dataset).test_size
    return min(spec.test_limit or size, size)


def _kind(spec: RunSpec) -> tuple:
    """Runs of one kind take the same time per epoch (seed, init and k do not change the work)."""
    return (spec.model, spec.width, spec.method, spec.recipe.batch_size, spec.train_limit, spec.test_limit)


@dataclass
class Planner:
    """Which run to start next: the first pending one (priority order) whose estimate fits before the deadline.

    ``record(spec, epoch, seconds)`` feeds measured epochs; a kind's pace is the mean of its epochs after the
    first (the first epoch of a run is also kept, as the run's start-up). Unmeasured kinds are scaled from the
    measured ones by ``work_per_epoch``; with nothing measured yet, a run is started (nothing to refuse it on).
    """

    pending: list[RunSpec]
    deadline: float
    first_epoch: dict[tuple, list[float]] = field(default_factory=dict)
    steady: dict[tuple, list[float]] = field(default_factory=dict)
    refused: list[RunSpec] = field(default_factory=list)

    def record(self, spec: RunSpec, epoch: int, seconds: float) -> None:
        target = self.first_epoch if epoch == 1 else self.steady
        target.setdefault(_kind(spec), []).append(seconds)

    def seconds_per_epoch(self, spec: RunSpec) -> tuple[float, float] | None:
        """(first epoch, later epochs) in seconds for ``spec``'s kind, measured or scaled; None if nothing is."""
        kind = _kind(spec)
        first = self.first_epoch.get(kind)
        if first:
            later = self.steady.get(kind) or first
            return sum(first) / len(first), sum(later) / len(later)
        rates = []  # (other method?, seconds per TFLOP) of every measured kind
        for other in set(self.first_epoch) | set(self.steady):
            times = self.steady.get(other) or self.first_epoch[other]
            rates.append((other[2] != spec.method, sum(times) / len(times) / _kind_work(other, spec)))
        if not rates:
            return None
        closest = min(d for d, _ in rates)  # the same method's kinds if any were measured
        same = sorted(r for d, r in rates if d == closest)
        per = same[len(same) // 2] * work_per_epoch(spec)
        return per, per

    def estimate(self, spec: RunSpec) -> float | None:
        pace = self.seconds_per_epoch(spec)
        return None if pace is None else pace[0] + pace[1] * (spec.epochs - 1)

    def next_run(self, now: float) -> RunSpec | None:
        """Pop and return the first pending run that fits; runs that do not fit now never will (time only
        passes), so they move to ``refused``. None when nothing is left that fits."""
        while self.pending:
            spec = self.pending.pop(0)
            estimate = self.estimate(spec)
            if now < self.deadline and (estimate is None or now + estimate <= self.deadline):
                return spec
            self.refused.append(spec)
        return None


def _kind_work(kind: tuple, like: RunSpec) -> float:
    model, width, method, batch, train_limit, test_limit = kind
    return work_per_epoch(like.with_(model=model, width=width, train_limit=train_limit, test_limit=test_limit))


# --------------------------------------------------------------------------------------------- processes


def _worker(wid: int, options: Options, csv_path: str, revision: str, threads: int, tasks, events) -> None:
    """One worker process: wait for the data, then train the runs the parent sends until it sends None."""
    from .results import append_curve, append_row, curves_path

    torch.set_num_threads(threads)
    device = torch.device(options.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = options.bf16
        torch.backends.cudnn.allow_tf32 = options.bf16
        torch.backends.cudnn.benchmark = True
        torch.zeros(1, device=device)  # CUDA context while the parent decodes the data
    train, test = tasks.get()
    data = DeviceData.from_splits(train, test, device)
    del train, test
    events.put(("ready", wid, None, None))
    while True:
        spec = tasks.get()
        if spec is None:
            break
        key = spec.key()
        try:
            results, curve = train_run(
                spec, data, options, on_epoch=lambda e, s, key=key: events.put(("epoch", wid, key, (e, s)))
            )
        except Abandoned as exc:
            events.put(("abandoned", wid, key, str(exc)))
            continue
        except Exception:  # reported by the parent; the worker takes the next run
            events.put(("error", wid, key, traceback.format_exc()))
            continue
        results["git_revision"] = revision
        append_curve(curves_path(csv_path), spec, curve)
        append_row(csv_path, spec, results)
        events.put(("done", wid, key, results))


def _load_splits(specs: list[RunSpec]):
    from ..data import load_dataset

    spec = specs[0]
    out = []
    for split, limit in (("train", spec.train_limit), ("test", spec.test_limit)):
        ds = load_dataset(spec.dataset, split, limit=limit)
        out.append((ds.images.share_memory_(), ds.targets.share_memory_(), tuple(ds.info.mean), tuple(ds.info.std)))
    return tuple(out), ds.display_name


def _describe(spec: RunSpec) -> str:
    what = f"k={spec.k:g} {spec.init}" if spec.method == "edge_popup" else f"dense {spec.optimizer}"
    return f"{spec.model} w={spec.width:g} {what} seed={spec.seed}"


def _print_plan(todo: list[RunSpec], done: int, workers: int, budget: float, device: str, log) -> None:
    rate = PRIOR_TFLOPS["cuda" if device.startswith("cuda") else "cpu"]
    estimates = [work_per_epoch(s) * s.epochs / rate for s in todo]
    fit, used = 0, 0.0
    for e in estimates:
        if (used + e) / workers > budget:
            break
        used, fit = used + e, fit + 1
    log(f"plan: {len(todo)} runs to do ({done} already in the CSV), {workers} workers on {device}, {budget:.0f} s")
    log(
        f"  prior guess ({rate:g} TFLOP/s per worker): all {sum(estimates) / workers / 60:.1f} min; "
        f"the first {fit} fit in the budget"
    )
    for spec, e in list(zip(todo, estimates))[: max(fit, 1) + workers]:
        log(f"    {_describe(spec)}: ~{e:.0f} s")


def run_paper_grid(
    specs: list[RunSpec],
    csv_path: str | Path,
    *,
    minutes: float,
    workers: int,
    device: str,
    bf16: bool,
    channels_last: bool,
    revision: str,
    log=print,
) -> dict[str, list]:
    """Train the ``specs`` not yet in ``csv_path`` with ``workers`` processes until ``minutes`` have passed;
    return ``{"done": [(spec, results)], "abandoned": [...], "failed": [...], "refused": [...]}``."""
    import torch.multiprocessing as mp

    from .results import done_keys

    t_start = time.time()
    deadline = t_start + 60.0 * minutes
    finished = done_keys(csv_path)
    todo = [s for s in specs if s.key() not in finished]
    _print_plan(todo, len(specs) - len(todo), workers, deadline - t_start, device, log)
    planner = Planner(list(todo), deadline)
    summary: dict[str, list] = {"done": [], "abandoned": [], "failed": [], "refused": planner.refused}
    if not todo or time.time() >= deadline:
        planner.next_run(time.time())  # refuses everything when the deadline has passed
        _print_summary(summary, t_start, log)
        return summary

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    options = Options(device=device, bf16=bf16, channels_last=channels_last, deadline=deadline)
    threads = 1 if device.startswith("cuda") else max(1, min(2, (os.cpu_count() or 1) // workers))
    workers = min(workers, len(todo))
    queues = [ctx.Queue() for _ in range(workers)]
    procs = [
        ctx.Process(target=_worker, args=(w, options, str(csv_path), revision, threads, queues[w], events), daemon=True)
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    splits, name = _load_splits(todo)
    log(f"data: {name}, {splits[0][0].shape[0]} train / {splits[1][0].shape[0]} test ({time.time() - t_start:.0f} s)")
    for q in queues:
        q.put(splits)
    by_key = {s.key(): s for s in todo}
    running: dict[int, RunSpec] = {}
    measured: set[tuple] = set()
    idle = set()

    def dispatch(w: int) -> None:
        spec = planner.next_run(time.time())
        if spec is None:
            queues[w].put(None)
            idle.add(w)
            return
        running[w] = spec
        queues[w].put(spec)

    while len(idle) < workers:
        try:
            kind, w, key, payload = events.get(timeout=5.0)
        except queue.Empty:
            for w, p in enumerate(procs):
                if w not in idle and not p.is_alive():
                    lost = running.pop(w, None)
                    log(f"worker {w} died (exit code {p.exitcode}){f'; lost {_describe(lost)}' if lost else ''}")
                    if lost is not None:
                        summary["failed"].append((lost, f"worker died ({p.exitcode})"))
                    idle.add(w)
            continue
        elapsed = time.time() - t_start
        if kind == "ready":
            dispatch(w)
        elif kind == "epoch":
            spec = by_key[key]
            planner.record(spec, *payload)
            if _kind(spec) not in measured and payload[0] == 1:
                measured.add(_kind(spec))
                est = planner.estimate(spec)
                log(f"[{elapsed:5.0f} s] measured {_describe(spec)}: epoch 1 in {payload[1]:.1f} s, run ~{est:.0f} s")
        elif kind == "done":
            spec = running.pop(w)
            summary["done"].append((spec, payload))
            log(f"[{elapsed:5.0f} s] {_describe(spec)}: {payload['test_accuracy']} % in {payload['wall_time_s']} s")
            dispatch(w)
        else:  # abandoned, error
            spec = running.pop(w)
            summary["abandoned" if kind == "abandoned" else "failed"].append((spec, payload))
            log(f"[{elapsed:5.0f} s] {kind} {_describe(spec)}: {payload}")
            dispatch(w)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
    _print_summary(summary, t_start, log)
    return summary


def _print_summary(summary: dict[str, list], t_start: float, log) -> None:
    done = summary["done"]
    log(
        f"summary after {time.time() - t_start:.0f} s: {len(done)} runs done, {len(summary['abandoned'])} abandoned, "
        f"{len(summary['failed'])} failed, {len(summary['refused'])} not started (would not fit the budget)"
    )
    for spec, results in done:
        log(f"  {_describe(spec)}: {results['test_accuracy']} % ({results['wall_time_s']} s)")
    for spec, why in summary["failed"]:
        log(f"  FAILED {_describe(spec)}: {why}")


def start_mps(log=print):
    """Start NVIDIA's Multi-Process Service (kernels of the workers then run side by side instead of taking
    turns) and return a function that stops it; None, after saying why, when it cannot be used here. A probe
    process must create a CUDA context through it first, so a broken MPS never takes the workers with it."""
    import shutil
    import subprocess
    import tempfile

    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        log("mps: nvidia-cuda-mps-control not found; workers take turns on the GPU")
        return None
    folder = tempfile.mkdtemp(prefix="paper_gpu_mps_")
    env = {"CUDA_MPS_PIPE_DIRECTORY": folder, "CUDA_MPS_LOG_DIRECTORY": folder}
    os.environ.update(env)

    def stop() -> None:
        try:
            subprocess.run([control], input="quit\n", text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"mps: could not stop it ({exc})")
        for name in env:
            os.environ.pop(name, None)

    try:
        subprocess.run([control, "-d"], check=True, timeout=30)
        probe = "import torch; torch.zeros(1, device='cuda').sum().item()"
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=90, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"mps: not usable ({exc}); workers take turns on the GPU")
        stop()
        return None
    log(f"mps: started ({folder})")
    return stop


def main(argv: list[str] | None = None) -> dict[str, list]:
    t_start = time.time()  # the budget counts from here (interpreter start and imports: a few seconds before)
    parser = argparse.ArgumentParser(
        prog="python -m supermask_fx.experiments.paper_gpu", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--small", action="store_true", help="CPU-sized runs of the same code (the test)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget from the start")
    parser.add_argument("--csv", default="docs/results/paper/results.csv")
    parser.add_argument("--workers", type=int, default=None, help="processes sharing the GPU (default 8; small: 2)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="on CUDA (the CPU: fp32)")
    parser.add_argument("--revision", default=None, help="git revision for the rows (default: git rev-parse)")
    parser.add_argument("--mps", action="store_true", help="run the workers through CUDA MPS (see start_mps)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    specs = small_runs() if args.small else paper_runs(args.seeds)
    workers = args.workers or (SMALL.workers if args.small else 8)
    if args.revision is None:
        from .runner import git_revision

        args.revision = git_revision()
    stop_mps = start_mps() if args.mps and device == "cuda" else None
    try:
        summary = run_paper_grid(
            specs,
            args.csv,
            minutes=args.minutes - (time.time() - t_start) / 60,
            workers=workers,
            device=device,
            bf16=device == "cuda" and args.precision == "bf16",
            channels_last=device == "cuda",
            revision=args.revision,
        )
    finally:
        if stop_mps is not None:
            stop_mps()
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
