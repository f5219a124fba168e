"""Running RunSpecs: build the model, popupify it, train, measure, append a CSV row; skip runs already done."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import fix_masks, mask_stats, popupify, supermask_parameters
from ..models import build_model
from . import engine
from .results import append_curve, append_row, curves_path, done_keys
from .specs import RunSpec, variant_settings

__all__ = ["run_one", "run_all", "git_revision", "estimate_seconds"]

_DATA: dict[tuple, object] = {}


def load_split(dataset: str, split: str, limit: int | None):
    from ..data import load_dataset

    key = (dataset, split, limit)
    if key not in _DATA:
        _DATA[key] = load_dataset(dataset, split, limit=limit)
    return _DATA[key]


def git_revision() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "supermask_fx"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def share_machine(threads: int, nice: int) -> None:
    """Run this process's experiments with ``threads`` torch threads at ``nice`` (long suites share the machine)."""
    torch.set_num_threads(max(1, threads))
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass


def build(spec: RunSpec) -> torch.nn.Module:
    model = build_model(spec.model, dataset=spec.dataset, width=spec.width)
    options = {}
    if spec.method == "sampled" and spec.variant == "zhou":
        from ..methods.sampled import ZHOU_ET_AL

        options = ZHOU_ET_AL  # sampled evaluation, weight rescaling, scores 0
    elif spec.method == "sampled" and spec.variant == "sample_eval":
        options = {"eval_rule": "sample"}  # the edge-popup authors' SampleSubnetConv
    settings, _ = variant_settings(spec.variant)
    options = {**options, **settings.pop("method_options", {})}
    popupify(
        model,
        spec.k,
        method=spec.method,
        init=spec.init,
        scaled=spec.scaled,
        seed=spec.seed,
        method_options=options,
        **settings,
    )
    return model


def training_set(spec: RunSpec):
    """The run's training split; CIFAR-10 with the standard augmentation (pad 4, random 32x32 crop, flip), as the
    paper's recipe."""
    train_set = load_split(spec.dataset, "train", spec.train_limit)
    if spec.dataset == "cifar10":
        from ..training import RandomCropFlip

        train_set = RandomCropFlip(train_set, padding=4, flip=True)
    return train_set


def run_one(spec: RunSpec, revision: str | None = None, curves: list | None = None) -> dict[str, object]:
    """Train one run and return its result columns (``test_accuracy`` in percent, ``kept_weights``, ...).
    ``curves``: if given, the per-epoch test accuracies of the (last) training phase are appended to it."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    train_set = training_set(spec)
    test_set = load_split(spec.dataset, "test", spec.test_limit)
    model = build(spec)
    found_accuracy = None
    if spec.variant == "retrain_found":
        found_accuracy, _ = engine.fit(
            model, supermask_parameters(model), train_set, test_set, spec.recipe, spec.epochs, spec.seed
        )
    if spec.variant.startswith("retrain"):
        fix_masks(model, train_weights=True)
        recipe = spec.retrain or spec.recipe
    else:
        recipe = spec.recipe
    _, train_options = variant_settings(spec.variant)
    accuracy, curve = engine.fit(
        model, supermask_parameters(model), train_set, test_set, recipe, spec.epochs, spec.seed, **train_options
    )
    if curves is not None:
        curves.extend(curve)
    stats = mask_stats(model)
    return {
        "test_accuracy": f"{accuracy:.2f}",
        "kept_weights": stats.kept,
        "total_weights": stats.numel,
        "found_accuracy": None if found_accuracy is None else f"{found_accuracy:.2f}",
        "wall_time_s": f"{time.perf_counter() - start:.1f}",
        "git_revision": revision or git_revision(),
        "engine": engine.engine_name(),
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def run_all(
    specs: list[RunSpec],
    csv_path: str | Path,
    *,
    log=print,
    estimates: dict | None = None,
    shard=(0, 1),
    also_done: tuple[str | Path, ...] = (),
) -> int:
    """Run every spec whose key is not yet in ``csv_path`` (nor in the CSVs ``also_done``, read only); append a
    row after each, and its test-accuracy curve to ``curves.jsonl`` beside the CSV. Returns runs made.

    ``shard=(i, n)``: make only the specs at positions i, i + n, ... of ``specs`` (n processes can share one
    CSV without making the same run twice)."""
    index, count = shard
    specs = specs[index::count]

    def done() -> set:
        return done_keys(csv_path).union(*(done_keys(p) for p in also_done))

    todo = [s for s in specs if s.key() not in done()]
    log(f"{len(specs) - len(todo)} of {len(specs)} runs already in {csv_path}; {len(todo)} to do")
    revision = git_revision()
    made = 0
    for i, spec in enumerate(todo, 1):
        if spec.key() in done():  # another process may have made it meanwhile
            continue
        curve: list[float] = []
        results = run_one(spec, revision, curves=curve)
        append_curve(curves_path(csv_path), spec, curve)
        append_row(csv_path, spec, results)
        made += 1
        est = f" (estimated {estimates[spec.key()]:.0f} s)" if estimates and spec.key() in estimates else ""
        log(
            f"[{i}/{len(todo)}] {spec.experiment} {spec.model} w={spec.width:g} {spec.method} {spec.init}"
            f"{' scaled' if spec.scaled else ''} k={spec.k:.3g} {spec.optimizer} {spec.variant} seed={spec.seed}: "
            f"{results['test_accuracy']}% in {results['wall_time_s']} s{est}"
        )
        sys.stdout.flush()
    return made


_STEP_COST: dict[tuple, float] = {}


def _seconds_per_example(spec: RunSpec, batch: int = 64, steps: int = 3) -> float:
    """Measured training cost per example of a spec's model/method (a few steps on random input), cached."""
    key = (spec.dataset, spec.model, spec.width, spec.method == "dense")
    if key not in _STEP_COST:
        from ..data import dataset_info

        info = dataset_info(spec.dataset)
        model = build(spec.with_(seed=0))
        params = list(supermask_parameters(model))
        optimizer = torch.optim.SGD(params, lr=0.0)
        x = torch.randn(batch, info.channels, info.image_size, info.image_size)
        y = torch.randint(0, info.num_classes, (batch,))
        model.train()
        for i in range(steps + 1):
            if i == 1:
                t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _STEP_COST[key] = (time.perf_counter() - t0) / (steps * batch)
    return _STEP_COST[key]


def estimate_seconds(spec: RunSpec) -> float:
    """Planned wall time of a run: measured per-example training cost x examples x epochs x phases, plus an
    evaluation pass (a forward costs about a third of a training step)."""
    from ..data import dataset_info

    info = dataset_info(spec.dataset)
    n_train = min(spec.train_limit or info.train_size, info.train_size)
    n_test = min(spec.test_limit or info.test_size, info.test_size)
    phases = 2 if spec.variant == "retrain_found" else 1
    per = _seconds_per_example(spec)
    return per * (n_train * spec.epochs * phases + n_test * phases / 3) + 0.5
