"""Masks over weights a user brings, at CPU scale (issue 26, "Prove it at CPU scale"): fixed here before any run.

A. **Mask tuning vs fine-tuning on a new task.** A base is trained dense on a source task (our own training: nothing
   is downloaded), then each arm learns the target task from it:

   * ``mask`` (k = 0.5 and k = 0.9): ``popupify(base, k, init="keep")``, every layer masked (the last one too: no new
     head, so the task costs the mask bits only); the first mask is each layer's top-k by |w|; edge-popup recipe.
   * ``finetune``: every weight of the base trained (dense SGD recipe).
   * ``probe``: the last layer trained, the rest frozen (dense SGD recipe).
   * ``random_weights``: edge-popup on freshly drawn weights of the same architecture (signed constant, k = 0.5).

   Pairs: FC 784-300-100-10 trained on MNIST -> Fashion-MNIST; Conv4 at width 0.25 trained on CIFAR-10 (JPEG copy)
   classes 0-4 -> classes 5-9 (5 outputs, labels 5-9 read as 0-4). Seed ``s`` of every arm starts from the base
   trained with seed ``s`` (the base is a run of its own, with its source-task accuracy).

   Comparisons (``COMPARISONS``), each a difference of means with its 95 % Welch interval (``stats.py``), k = 0.5
   and k = 0.9 compared separately (no choice after the runs):

   * mask - finetune, ``">="`` with a 3-point margin (non-inferiority: "within a few points of fine-tuning"),
   * mask - probe ``> 0`` (masks beat the linear probe),
   * mask over pretrained (k = 0.5) - edge-popup on random weights (k = 0.5) ``> 0``.

   Storage per task (bits per gated weight): fine-tuning 32 x (all parameters) / weights; the probe 32 x (last
   layer's parameters) / weights; a mask ``save_subnetwork``'s bytes x 8 / weights (measured).

B. **Several tasks on one weight set** (Supermasks in Superposition, task-incremental, GG): ``TASKS`` permuted-MNIST
   tasks on one FC 784-300-100-10 of signed-constant random weights, k = 0.5, one named mask per task trained in
   turn (``add_mask`` / ``set_mask``). After the last task every task's test logits are recomputed under its mask and
   must equal (``torch.equal``) those right after its own training; both accuracies are recorded, and the file of
   all masks (``save_subnetwork``) gives the set's storage.

``python -m supermask_fx.experiments.transfer`` makes the runs (resumable: one CSV row per finished run, runs in
the CSV skipped; ``--shard i/n``), ``--report`` writes docs/results/transfer/report.md, ``--plan-only`` lists them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .protocol import Comparison, diff
from .results import _append, _line, row_key
from .specs import DENSE_SGD, EDGE_POPUP, KEY_FIELDS, RunSpec

__all__ = ["COMPARISONS", "PAIRS", "Pair", "plan", "comparisons", "run_spec", "make_report", "main"]

EXPERIMENT = "transfer"
SEEDS = 3
SC, KN = "signed_constant", "kaiming_normal"
#: Epochs (fixed from one measured run per kind: docs/results/transfer/report.md, "Cost").
#: Measured before the runs (1 torch thread, 2-core VM shared): an FC epoch 3-4 s (60,000 images), a Conv4 epoch
#: (width 0.25, 25,000 images) about 25 s, slower while the machine is shared; 3 seeds of every arm fit about 1.5
#: CPU-hours.
FC_EPOCHS = 8
CONV_EPOCHS = 5
BASE_FC_EPOCHS = 10
BASE_CONV_EPOCHS = 8
TASKS = 5
SUPSUP_EPOCHS = 5
MARGIN = 3.0  # points: "within a few points of fine-tuning"
ARMS = ("mask", "finetune", "probe", "random_weights")
KS = (0.5, 0.9)
DEFAULT_CSV = Path("docs/results/transfer/results.csv")
BASES = Path("runs/transfer/bases")
EXTRA = ("storage_bytes", "bits_per_weight", "weights", "right_after", "after_all", "bit_exact")
COLUMNS = ("experiment", *KEY_FIELDS, "test_accuracy", *EXTRA, "wall_time_s", "git_revision", "finished_at")


@dataclass(frozen=True)
class Pair:
    """A source task, the target task and the architecture they share."""

    name: str
    model: str
    width: float
    source: str  # data set of the base
    target: str  # data set of the arms
    source_classes: tuple[int, ...] | None
    target_classes: tuple[int, ...] | None
    epochs: int
    base_epochs: int

    @property
    def num_classes(self) -> int:
        return len(self.target_classes) if self.target_classes else 10

    def label(self, which: str) -> str:
        name, classes = (self.source, self.source_classes) if which == "source" else (self.target, self.target_classes)
        return name if classes is None else f"{name}[{classes[0]}-{classes[-1]}]"


PAIRS = (
    Pair("fc", "fc", 1.0, "mnist", "fashion_mnist", None, None, FC_EPOCHS, BASE_FC_EPOCHS),
    Pair("conv", "conv4", 0.25, "cifar10", "cifar10", (0, 1, 2, 3, 4), (5, 6, 7, 8, 9), CONV_EPOCHS, BASE_CONV_EPOCHS),
)


def run_spec(pair: Pair, arm: str, k: float = 0.5, seed: int = 0) -> RunSpec:
    """The RunSpec of one arm (``"base"`` for the base) of ``pair``: dataset ``"source->target"`` for the arms."""
    dataset = pair.label("source") if arm == "base" else f"{pair.label('source')}->{pair.label('target')}"
    dense = arm in ("base", "finetune", "probe")
    init = {"mask": "keep", "random_weights": SC}.get(arm, KN if arm == "base" else "keep")
    return RunSpec(
        experiment=EXPERIMENT,
        model=pair.model,
        width=pair.width,
        method="dense" if dense else "edge_popup",
        init=init,
        k=1.0 if dense else k,
        seed=seed,
        epochs=pair.base_epochs if arm == "base" else pair.epochs,
        dataset=dataset,
        recipe=DENSE_SGD if dense else EDGE_POPUP,
        variant=arm,
    )


def supsup_spec(task: int, seed: int = 0, epochs: int = SUPSUP_EPOCHS, limit: int | None = None) -> RunSpec:
    return RunSpec(
        experiment=EXPERIMENT,
        model="fc",
        width=1.0,
        method="edge_popup",
        init=SC,
        k=0.5,
        seed=seed,
        epochs=epochs,
        dataset=f"permuted_mnist[{task}]",
        recipe=EDGE_POPUP,
        variant=f"supsup_{TASKS}tasks",
        train_limit=limit,
        test_limit=limit,
    )


def _comparisons(pair: Pair) -> tuple[Comparison, ...]:
    p = pair.label("source") + " -> " + pair.label("target")
    out = []
    for k in KS:
        mask = run_spec(pair, "mask", k)
        out.append(diff(f"{p}: mask k={k:g} minus fine-tuning", mask, run_spec(pair, "finetune"), ">=", MARGIN))
        out.append(diff(f"{p}: mask k={k:g} minus linear probe", mask, run_spec(pair, "probe")))
    out.append(
        diff(
            f"{p}: mask over pretrained k=0.5 minus edge-popup on random weights k=0.5",
            run_spec(pair, "mask", 0.5),
            run_spec(pair, "random_weights", 0.5),
        )
    )
    return tuple(out)


COMPARISONS: dict[str, tuple[Comparison, ...]] = {pair.name: _comparisons(pair) for pair in PAIRS}


def comparisons() -> list[Comparison]:
    return [c for pair in PAIRS for c in COMPARISONS[pair.name]]


def arm_specs(pair: Pair, seed: int) -> list[RunSpec]:
    return [
        run_spec(pair, "mask", 0.5, seed),
        run_spec(pair, "finetune", seed=seed),
        run_spec(pair, "probe", seed=seed),
        run_spec(pair, "random_weights", 0.5, seed),
        run_spec(pair, "mask", 0.9, seed),
    ]


def plan(seeds: int = SEEDS) -> list[RunSpec]:
    """Every run, seed-major (every arm has seed 0 before any has seed 1): FC and SupSup (cheap) first, then Conv.
    A base precedes its arms; SupSup's seed is one run of ``TASKS`` rows (the first task's spec stands for it)."""
    fc, conv = PAIRS
    out = []
    for s in range(seeds):
        out += [run_spec(fc, "base", seed=s), *arm_specs(fc, s), supsup_spec(0, s)]
    for s in range(seeds):
        out += [run_spec(conv, "base", seed=s), *arm_specs(conv, s)]
    return out


# ----------------------------------------------------------------------------------------------------- data
_DATA: dict = {}


def _split(name: str, split: str, classes, limit: int | None):
    """A split of ``name`` restricted to ``classes`` (relabelled 0..n-1), first ``limit`` examples."""
    from ..data import load_dataset
    from ..data.vision import ImageTensorDataset

    key = (name, split, classes, limit)
    if key not in _DATA:
        ds = load_dataset(name, split, download=False)
        if classes is not None:
            keep = torch.isin(ds.targets, torch.tensor(classes))
            targets = ds.targets[keep] - classes[0]
            ds = ImageTensorDataset(ds.images[keep], targets, ds.info, split, ds.source, ds.exact)
        if limit is not None:
            ds = ImageTensorDataset(ds.images[:limit], ds.targets[:limit], ds.info, split, ds.source, ds.exact)
        _DATA[key] = ds
    return _DATA[key]


def _data(pair: Pair, which: str, limit: int | None):
    name, classes = (pair.source, pair.source_classes) if which == "source" else (pair.target, pair.target_classes)
    train_set, test_set = _split(name, "train", classes, limit), _split(name, "test", classes, limit)
    if name == "cifar10":
        from ..training import RandomCropFlip

        train_set = RandomCropFlip(train_set, padding=4, flip=True)
    return train_set, test_set


def _permuted(split: str, task: int, seed: int, limit: int | None):
    from ..data.vision import ImageTensorDataset

    ds = _split("mnist", split, None, limit)
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(1000 * seed + task))
    images = ds.images.reshape(len(ds), -1)[:, perm].reshape(ds.images.shape).contiguous()
    return ImageTensorDataset(images, ds.targets, ds.info, split, ds.source + f" permuted {task}", ds.exact)


# --------------------------------------------------------------------------------------------------- models
def _build(pair: Pair) -> nn.Module:
    from ..models import build_model

    return build_model(
        pair.model,
        num_classes=pair.num_classes,
        in_channels=3 if pair.model != "fc" else 1,
        image_size=32 if pair.model != "fc" else 28,
        width=pair.width,
    )


def _base_path(pair: Pair, spec: RunSpec, bases: Path) -> Path:
    suffix = "" if spec.train_limit is None else f"_limit{spec.train_limit}"
    return bases / f"{pair.name}_{pair.model}_w{pair.width:g}_e{spec.epochs}_seed{spec.seed}{suffix}.pt"


def _weights(model: nn.Module) -> int:
    """Weights of the layers a mask covers (Linear and Conv weights), counted from the plain model."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _last_layer(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _fit(model, train_set, test_set, spec: RunSpec):
    from . import engine

    return engine.fit(model, None, train_set, test_set, spec.recipe, spec.epochs, spec.seed)


def train_base(pair: Pair, spec: RunSpec, bases: Path) -> tuple[nn.Module, dict]:
    """Dense training on the source task (Kaiming normal, dense SGD); the plain trained model, saved in ``bases``."""
    from .. import materialize, popupify

    torch.manual_seed(spec.seed)
    model = popupify(_build(pair), 1.0, method="dense", init=KN, seed=spec.seed)
    accuracy, curve = _fit(model, *_data(pair, "source", spec.train_limit), spec)
    plain = materialize(model)
    path = _base_path(pair, spec, bases)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(plain.state_dict(), partial)
    os.replace(partial, path)  # atomic: another process never loads half a base
    return plain, {"test_accuracy": accuracy, "curve": curve}


def load_base(pair: Pair, spec: RunSpec, bases: Path) -> nn.Module | None:
    path = _base_path(pair, spec, bases)
    if not path.exists():
        return None
    model = _build(pair)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def run_arm(pair: Pair, spec: RunSpec, base: nn.Module) -> dict:
    """Train one arm from ``base`` (left unchanged) on the target task; accuracy, curve and storage."""
    from .. import popupify, save_subnetwork

    torch.manual_seed(spec.seed)
    arm = spec.variant
    weights = _weights(base)
    if arm == "random_weights":
        model = popupify(_build(pair), spec.k, init=SC, seed=spec.seed)
    elif arm == "mask":
        model = popupify(copy.deepcopy(base), spec.k, init="keep")
    else:
        model = copy.deepcopy(base)
        if arm == "probe":
            last = _last_layer(model)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in last.parameters():
                p.requires_grad_(True)
    accuracy, curve = _fit(model, *_data(pair, "target", spec.train_limit), spec)
    if arm in ("mask", "random_weights"):
        with tempfile.TemporaryDirectory() as tmp:
            size = save_subnetwork(model, Path(tmp) / "task.safetensors")
        bits = size * 8 / weights
    else:
        trained = [p for p in model.parameters() if p.requires_grad]
        size = sum(p.numel() for p in trained) * 4
        bits = size * 8 / weights
    return {
        "test_accuracy": accuracy,
        "curve": curve,
        "storage_bytes": size,
        "bits_per_weight": bits,
        "weights": weights,
    }


def _logits(model: nn.Module, test_set) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(test_set), 1000):
            x, _ = test_set.get_batch(slice(start, start + 1000))
            out.append(model(x))
    return torch.cat(out)


def run_supsup(seed: int, epochs: int = SUPSUP_EPOCHS, limit: int | None = None, tasks: int = TASKS) -> list[dict]:
    """One random FC, ``tasks`` permuted-MNIST tasks, one named mask each, trained in turn. Asserts that after the
    last task each task's test logits equal those right after its own training (``torch.equal``). One dict per
    task: accuracy right after, after all, and the storage of the file holding every mask."""
    from .. import add_mask, popupify, save_subnetwork, set_mask
    from ..models import build_model

    torch.manual_seed(seed)
    model = popupify(build_model("fc", dataset="mnist"), 0.5, init=SC, seed=seed)
    weights = _weights(build_model("fc", dataset="mnist"))
    after, out = [], []
    for t in range(tasks):
        start = time.perf_counter()
        name = "default" if t == 0 else f"task{t}"
        if t:
            add_mask(model, name)
            set_mask(model, name)
        spec = supsup_spec(t, seed, epochs, limit)
        test_set = _permuted("test", t, seed, limit)
        accuracy, curve = _fit(model, _permuted("train", t, seed, limit), test_set, spec)
        logits = _logits(model, test_set)
        after.append(logits)
        acc = 100.0 * float(logits.argmax(1).eq(test_set.targets).float().mean())
        out.append(
            {
                "spec": spec,
                "right_after": acc,
                "engine_accuracy": accuracy,
                "curve": curve,
                "wall_time_s": time.perf_counter() - start,
            }
        )
    for t in range(tasks):
        set_mask(model, "default" if t == 0 else f"task{t}")
        test_set = _permuted("test", t, seed, limit)
        logits = _logits(model, test_set)
        exact = torch.equal(logits, after[t])
        assert exact, f"task {t}: logits after all tasks differ from those right after its training"
        out[t]["after_all"] = 100.0 * float(logits.argmax(1).eq(test_set.targets).float().mean())
        out[t]["bit_exact"] = exact
    with tempfile.TemporaryDirectory() as tmp:
        size = save_subnetwork(model, Path(tmp) / "all.safetensors")
    for row in out:
        row.update(storage_bytes=size, bits_per_weight=size * 8 / weights, weights=weights)
    return out


# ------------------------------------------------------------------------------------------------------ CSV
def _revision() -> str:
    from .runner import git_revision

    return git_revision()


def append(csv_path: Path, spec: RunSpec, values: dict, revision: str) -> None:
    row = dict(spec.row_fields())
    row.update({name: "" if values.get(name) is None else str(values[name]) for name in EXTRA})
    row["test_accuracy"] = f"{values['test_accuracy']:.2f}"
    row["wall_time_s"] = f"{values['wall_time_s']:.1f}"
    row["git_revision"] = revision
    row["finished_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    curve = {**{name: row[name] for name in KEY_FIELDS}, "test_top1": [round(a, 2) for a in values["curve"]]}
    _append(csv_path.with_name("curves.jsonl"), json.dumps(curve) + "\n")
    _append(csv_path, _line([row.get(name, "") for name in COLUMNS]), header=_line(list(COLUMNS)))


def read(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.exists():
        return []
    text = csv_path.read_text()
    text = text[: text.rfind("\n") + 1]
    return [r for r in csv.DictReader(io.StringIO(text)) if r.get("test_accuracy")]


def run_plan(specs: list[RunSpec], csv_path: Path, bases: Path = BASES, shard=(0, 1), log=print) -> int:
    """Make every run of ``specs`` not yet in ``csv_path`` (positions i, i + n, ... for ``shard=(i, n)``; a base
    another shard needs is trained or loaded where needed). Returns the runs made."""
    index, count = shard
    revision = _revision()
    made = 0
    for spec in specs[index::count]:
        done = {row_key(r) for r in read(csv_path)}
        if spec.key() in done:
            continue
        start = time.perf_counter()
        if spec.variant.startswith("supsup"):
            for row in run_supsup(spec.seed, spec.epochs, spec.train_limit):
                row["test_accuracy"] = row["after_all"]
                append(csv_path, row["spec"], row, revision)
                log(
                    f"supsup seed={spec.seed} {row['spec'].dataset}: right after {row['right_after']:.2f} %, "
                    f"after all {row['after_all']:.2f} %, bit-exact {row['bit_exact']}, {row['wall_time_s']:.0f} s"
                )
            made += 1
            continue
        pair = next(p for p in PAIRS if p.model == spec.model)
        if spec.variant == "base":
            base_spec = spec
        else:  # shrunken runs (a train_limit: the tests) take a 1-epoch base of the same limits
            epochs = pair.base_epochs if spec.train_limit is None else 1
            base_spec = run_spec(pair, "base", seed=spec.seed).with_(
                epochs=epochs, train_limit=spec.train_limit, test_limit=spec.test_limit
            )
        base = load_base(pair, base_spec, bases)
        if spec.variant == "base" or base is None:
            base, values = train_base(pair, base_spec, bases)
            if base_spec.key() not in {row_key(r) for r in read(csv_path)}:
                values["wall_time_s"] = time.perf_counter() - start
                append(csv_path, base_spec, values, revision)
                log(
                    f"{pair.name} base seed={spec.seed}: {values['test_accuracy']:.2f} % on "
                    f"{pair.label('source')} in {values['wall_time_s']:.0f} s"
                )
            if spec.variant == "base":
                made += 1
                continue
            start = time.perf_counter()
        values = run_arm(pair, spec, base)
        values["wall_time_s"] = time.perf_counter() - start
        append(csv_path, spec, values, revision)
        made += 1
        log(
            f"{pair.name} {spec.variant} k={spec.k:g} seed={spec.seed}: {values['test_accuracy']:.2f} % in "
            f"{values['wall_time_s']:.0f} s, {values['bits_per_weight']:.3f} bits/weight"
        )
        sys.stdout.flush()
    return made


# --------------------------------------------------------------------------------------------------- report
def evaluate_rows(rows: list[dict[str, str]], seeds: int = SEEDS) -> list[tuple[Comparison, object, str]]:
    """(comparison, interval, verdict) for every comparison of the plan, from CSV rows (``decide_report.evaluate``)."""
    from .decide_report import evaluate

    index = {row_key(r): r for r in rows}
    return [(c, *evaluate(c, index, seeds)[:2]) for c in comparisons()]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.2f} ± {sd:.2f} (n={len(values)})"


def make_report(csv_path: Path = DEFAULT_CSV, out: Path | None = None, seeds: int = SEEDS) -> Path:
    rows = read(csv_path)
    index = {row_key(r): r for r in rows}
    out = out or csv_path.with_name("report.md")
    lines = [
        "# Masks over pretrained weights and several masks over one weight set (CPU scale)",
        "",
        "Generated by `python -m supermask_fx.experiments.transfer --report` from "
        f"`{csv_path.name}`; plan and rules fixed in `supermask_fx/experiments/transfer.py` before the runs. "
        f"{seeds} seeds, 95 % Welch intervals (`stats.py`). CIFAR-10 is the project's JPEG copy.",
        "",
        "## A. Mask tuning vs fine-tuning",
        "",
        f"Bases trained dense (Kaiming normal, SGD lr 0.01, cosine, batch 128) on the source task: FC 784-300-100-10 "
        f"on MNIST for {BASE_FC_EPOCHS} epochs, Conv4 at width 0.25 on CIFAR-10 classes 0-4 for {BASE_CONV_EPOCHS} "
        "epochs (seed s of each arm starts from base seed s). Arms on the target task: `mask` = "
        '`popupify(base, k, init="keep")` over every layer, the last one included (no new head: the task costs '
        "the mask file only; Piggyback and Zhao et al. train a new head beside the masks), edge-popup recipe "
        "(SGD lr 0.1, cosine, batch 128); `finetune` = every weight, `probe` = last layer only, both SGD lr 0.01 "
        "cosine batch 128; `random weights` = edge-popup on signed-constant random weights, k = 0.5. Storage per task "
        "in bits per masked weight: fine-tuning 32 x all parameters; probe 32 x last layer's parameters; masks the "
        "measured `save_subnetwork` file (entropy-coded masks: k = 0.9 codes below 1 bit). Comparisons fixed before "
        f"the runs; mask vs fine-tuning is non-inferiority with a {MARGIN:g}-point margin, the others '> 0'.",
        "",
    ]
    lines += ["| comparison | rule | difference [95 % interval] | verdict |", "|---|---|---|---|"]
    for c, interval, verdict in evaluate_rows(rows, seeds):
        rule = f">= -{c.margin:g} (non-inferiority)" if c.relation == ">=" else "> 0"
        lines.append(f"| {c.label} | {rule} | {interval.text()} | **{verdict}** |")
    lines += [
        "",
        "| pair | arm | epochs | test top-1 % (mean ± sd) | storage per task (bits / weight) | wall time per run (s) |",
        "|---|---|---|---|---|---|",
    ]
    for pair in PAIRS:
        specs = [("base (source task)", run_spec(pair, "base"))]
        specs += [(f"mask k={k:g}", run_spec(pair, "mask", k)) for k in KS]
        specs += [(a.replace("_", " "), run_spec(pair, a)) for a in ("finetune", "probe", "random_weights")]
        for label, spec in specs:
            got = [index[s.key()] for s in (spec.with_(seed=i) for i in range(seeds)) if s.key() in index]
            acc = _mean_sd([float(r["test_accuracy"]) for r in got])
            bits = (
                f"{statistics.fmean(float(r['bits_per_weight']) for r in got):.3f}"
                if got and got[0]["bits_per_weight"]
                else "-"
            )
            wall = f"{statistics.fmean(float(r['wall_time_s']) for r in got):.0f}" if got else "-"
            lines.append(f"| {spec.dataset} | {label} | {spec.epochs} | {acc} | {bits} | {wall} |")
    lines += [
        "",
        "## B. Five permuted-MNIST tasks on one random FC (SupSup, GG)",
        "",
        f"FC 784-300-100-10, signed constant random weights (seed s), k = 0.5, {TASKS} tasks (pixel permutations), "
        f"one named mask per task (`add_mask` / `set_mask`), {SUPSUP_EPOCHS} epochs per task, edge-popup recipe. "
        "'after all tasks' recomputes each task's test logits under its mask after the last task; the run asserts "
        "they equal (`torch.equal`) those right after its own training. The file is `save_subnetwork` of the model "
        "holding every mask (base = the seed; bits / weight over the 266,200 masked weights, all tasks together). "
        "Published: Wortsman et al. (SupSup, NeurIPS 2020), GG on PermutedMNIST with FC 1024-1024, about 97 % "
        "(figure as given in the brief, not re-checked offline). Differences: width (300-100 vs 1024-1024), tasks "
        f"({TASKS} vs their longer sequences), epochs per task ({SUPSUP_EPOCHS} here), their sparsity and optimizer "
        "settings; CPU-scale, not a replication.",
        "",
        "| seed | task | right after its training % | after all tasks % | logits bit-exact | "
        "all masks' file (bytes, bits / weight) |",
        "|---|---|---|---|---|---|",
    ]
    sup = [r for r in rows if r["variant"].startswith("supsup")]
    for r in sorted(sup, key=lambda r: (int(r["seed"]), r["dataset"])):
        lines.append(
            f"| {r['seed']} | {r['dataset']} | {float(r['right_after']):.2f} | "
            f"{float(r['after_all']):.2f} | {r['bit_exact']} | {r['storage_bytes']} "
            f"({float(r['bits_per_weight']):.3f}) |"
        )
    if sup:
        lines += ["", f"Mean over tasks and seeds: {_mean_sd([float(r['after_all']) for r in sup])} %."]
    missing = [s for s in plan(seeds) if s.key() not in index]
    lines += ["", "## Missing runs", ""]
    lines += [f"- {s.dataset} {s.variant} k={s.k:g} seed {s.seed}" for s in missing] or ["none"]
    out.write_text("\n".join(lines) + "\n")
    _plot(csv_path, out.parent, seeds)
    return out


def _plot(csv_path: Path, folder: Path, seeds: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    from .results import read_curves

    curves = read_curves(csv_path.with_name("curves.jsonl"))
    fig, axes = plt.subplots(1, len(PAIRS), figsize=(11, 4))
    for ax, pair in zip(axes, PAIRS, strict=True):
        for label, spec in [(f"mask k={k:g}", run_spec(pair, "mask", k)) for k in KS] + [
            (a, run_spec(pair, a)) for a in ("finetune", "probe", "random_weights")
        ]:
            got = [curves[s.key()] for s in (spec.with_(seed=i) for i in range(seeds)) if s.key() in curves]
            if got:
                n = min(len(c) for c in got)
                ax.plot(
                    range(1, n + 1),
                    [statistics.fmean(c[e] for c in got) for e in range(n)],
                    marker="o",
                    label=f"{label} (n={len(got)})",
                )
        ax.set_title(run_spec(pair, "mask").dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 %")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=90)
    plt.close(fig)


def fingerprint() -> str:
    """A hash of the plan and its comparisons (to show it did not change after the runs)."""
    text = repr([s.key() for s in plan()]) + repr([(c.label, c.relation, c.margin) for c in comparisons()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supermask_fx.experiments.transfer", description=__doc__)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--only", choices=("fc", "conv", "supsup"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reverse", action="store_true", help="last run first (a second process meets the first)")
    args = parser.parse_args(argv)
    if args.report:
        print(make_report(args.csv))
        return 0
    specs = plan()
    if args.only == "supsup":
        specs = [s for s in specs if s.variant.startswith("supsup")]
    elif args.only:
        pair = next(p for p in PAIRS if p.name == args.only)
        specs = [s for s in specs if s.model == pair.model and not s.variant.startswith("supsup")]
    if args.plan_only:
        done = {row_key(r) for r in read(args.csv)}
        for s in specs:
            print(
                f"{'done' if s.key() in done else 'todo'} {s.dataset} {s.model} {s.variant} k={s.k:g} "
                f"epochs={s.epochs} seed={s.seed}"
            )
        print(f"plan fingerprint {fingerprint()}")
        return 0
    torch.set_num_threads(max(1, args.threads))
    i, n = (int(x) for x in args.shard.split("/"))
    run_plan(specs[::-1] if args.reverse else specs, args.csv, shard=(i, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
