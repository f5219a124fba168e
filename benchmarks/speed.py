"""Speed and size of edge-popup against learned dense weights and the paper's Algorithm 1.

Run from the repository root::

    python -m benchmarks.speed --quick --json benchmarks/results/cpu.json     # CPU, a few minutes
    python -m benchmarks.speed --json benchmarks/results/gpu.json             # on a CUDA machine

What is measured (every figure goes to ``--json``; each target is printed as measured / target, PASS or FAIL):

* training step (zero_grad, forward, cross-entropy, backward, SGD momentum step) of the same model on the same
  batch in five variants: ``dense`` (the weights train), ``edge_popup`` (``popupify`` with its defaults: the scores
  train, the frozen weights are sign bits, ``w * mask`` is kept from the forward), ``edge_popup_float`` (float
  weights, ``weight_storage="dense"``: ``w * mask`` rebuilt in the backward), ``edge_popup_rebuilt`` (sign bits,
  ``rebuild_effective=True``) and ``algorithm1`` (the paper's sort-every-forward reference,
  ``benchmarks/algorithm1.py``). Variants are timed
  interleaved in one process (round-robin, rotating order, warm-up rounds discarded); medians and ratios.
  Each case runs in a fresh subprocess, so that no case times its steps on the heap, caches and thread state
  that the cases before it left (``--in-process`` runs them all in this process).
  Cases: Conv4, CIFAR ResNet-18 (stride-1 stem: 0.56 GFLOPs per image) and torchvision's ResNet-18 (stride-2
  stem and max-pool: 0.04 GFLOPs per image; the model of the issue's figures) at 32x32 (batch 128 on CPU),
  torchvision ResNet-50 at 224x224 (batch 32 on CPU). On CUDA: batch 256, bf16 autocast, channels-last, cudnn.benchmark.
* inference (eval mode, ``no_grad``) of the dense model, the popupified model and ``materialize(model)``, timed
  the same way over three times as many rounds (a forward is cheap; its ratios are the ones closest to 1).
* peak training memory of each variant, above what the process held before the model was built: on CPU each
  variant runs alone in a subprocess (glibc told to return freed blocks at once) that reads its high-water mark
  ``VmHWM``; on CUDA ``torch.cuda.max_memory_allocated``.
* ResNet-50's masks alone (on CPU by the compiled ``select_topk_native_many``, all layers in one call as the
  library does after an optimizer step; also the pure-PyTorch ``band`` for comparison), the whole refresh
  (masks plus the cached ``w * mask``), against one elementwise pass
  ``torch.abs(scores, out=buf)`` over all scores, per-layer ``kthvalue`` and full ``sort``. Between timed calls
  the scores take an SGD momentum step along a real gradient, so the threshold moves as in training.
* the compact subnetwork file (``save_subnetwork``) in bits per gated weight, at k = 0.3 (the paper's ImageNet
  setting) and k = 0.5 (its best CIFAR setting). The masks cost about H(k) bits per weight (binary entropy: 0.881
  at 0.3, 1 at 0.5); batch-norm running statistics (float32) come on top, so at k = 0.5 no lossless file can
  meet 1.05 bits per weight on a network with as many channels per weight as ResNet-50.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make supermask_fx and benchmarks importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from benchmarks.algorithm1 import algorithm1  # noqa: E402
from supermask_fx import materialize, popupify, save_subnetwork  # noqa: E402
from supermask_fx.core.masks import gated_layers  # noqa: E402
from supermask_fx.models import build_model  # noqa: E402
from supermask_fx.selection import native  # noqa: E402
from supermask_fx.selection.topk import NativeGroup, select_topk, select_topk_native_many  # noqa: E402

K = 0.5  # fraction kept
GPU_BATCH = 256
INFERENCE_ROUNDS = 3  # inference is timed over this many times the step rounds
MAX_ROUNDS_FACTOR = 10  # a time budget (--seconds) adds rounds up to this many times --repeats
OPTIMIZER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # the paper's CIFAR settings


# ---------------------------------------------------------------------------------------------------------
# Cases, devices, variants


@dataclass(frozen=True)
class Case:
    name: str
    image_size: int
    num_classes: int
    cpu_batch: int

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.name == "resnet50":
            return torchvision.models.resnet50(num_classes=self.num_classes)
        if self.name == "resnet18_tv":  # torchvision's ImageNet-style ResNet-18 (stride-2 stem, max-pool)
            return torchvision.models.resnet18(num_classes=self.num_classes)
        return build_model(self.name, num_classes=self.num_classes, in_channels=3, image_size=self.image_size)


CASES = {
    "conv4": Case("conv4", 32, 10, 128),
    "resnet18": Case("resnet18", 32, 10, 128),
    "resnet18_tv": Case("resnet18_tv", 32, 10, 128),
    "resnet50": Case("resnet50", 224, 1000, 32),
}


LABELS = {
    "conv4": "Conv4",
    "resnet18": "ResNet-18 (CIFAR)",
    "resnet18_tv": "ResNet-18 (torchvision)",
    "resnet50": "ResNet-50",
}


@dataclass(frozen=True)
class Setting:
    """Where and how models run: CPU in float32, or CUDA with bf16 autocast and channels-last."""

    device: torch.device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def batch(self, case: Case) -> int:
        return GPU_BATCH if self.cuda else case.cpu_batch

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def place(self, module: nn.Module) -> nn.Module:
        module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.cuda else module

    def inputs(self, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        n = self.batch(case)
        x = torch.randn(n, 3, case.image_size, case.image_size, generator=g)
        y = torch.randint(0, case.num_classes, (n,), generator=g)
        x = x.to(self.device, memory_format=torch.channels_last if self.cuda else torch.contiguous_format)
        return x, y.to(self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        info = {
            "device": self.device.type,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),
            "native": native.thread_pool() or f"unavailable: {native.unavailable_reason()}",
        }
        if self.cuda:
            info.update(
                gpu=torch.cuda.get_device_name(self.device),
                cuda=torch.version.cuda,
                dtype="bfloat16",
                memory_format="channels_last",
            )
        return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dense(model: nn.Module) -> nn.Module:
    """Learned dense weights: the model as built, every parameter trains."""
    return model


def edge_popup(model: nn.Module) -> nn.Module:
    """This library with its defaults: ``popupify``; only the scores train (for the default init the frozen
    weights are sign bits and ``w * mask`` is kept from the forward to the backward)."""
    return popupify(model, K)


def edge_popup_float(model: nn.Module) -> nn.Module:
    """The frozen weights as float tensors (``weight_storage="dense"``; ``w * mask`` rebuilt in the backward)."""
    return popupify(model, K, weight_storage="dense")


def edge_popup_rebuilt(model: nn.Module) -> nn.Module:
    """Sign-bit weights, ``w * mask`` rebuilt in the backward (``rebuild_effective=True``): the least memory."""
    return popupify(model, K, rebuild_effective=True)


def paper_algorithm1(model: nn.Module) -> nn.Module:
    """The paper's Algorithm 1: sort every layer's |scores| in every forward (benchmarks/algorithm1.py)."""
    return algorithm1(model, K)


VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "dense": dense,
    "edge_popup": edge_popup,
    "edge_popup_float": edge_popup_float,
    "edge_popup_rebuilt": edge_popup_rebuilt,
    "algorithm1": paper_algorithm1,
}


def build(case: Case, variant: str, setting: Setting) -> nn.Module:
    return setting.place(VARIANTS[variant](case.build()))


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, setting: Setting) -> Callable[[], None]:
    """One training step of ``model`` on ``(x, y)``: what every variant is timed on."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], **OPTIMIZER)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with setting.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def inference(model: nn.Module, x: torch.Tensor, setting: Setting) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.no_grad(), setting.autocast():
            model(x)

    return forward


# ---------------------------------------------------------------------------------------------------------
# Timing: the one loop every figure goes through


@dataclass
class Task:
    run: Callable[[], object]
    prepare: Callable[[], object] = field(default=lambda: None)  # untimed, before every timed run


def interleaved(
    tasks: dict[str, Task], repeats: int, warmup: int, setting: Setting, seconds: float = 0.0
) -> dict[str, dict]:
    """Time the tasks round-robin (the order rotates every round); the first ``warmup`` rounds are dropped.

    At least ``repeats`` timed rounds; more while the timed rounds took under ``seconds`` in all (at most
    ``MAX_ROUNDS_FACTOR * repeats``): cheap cases get the extra rounds that a noisy machine needs."""
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    round_, timed = 0, 0.0
    while round_ < warmup + repeats or (timed < seconds and round_ < warmup + MAX_ROUNDS_FACTOR * repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            tasks[name].prepare()
            setting.sync()
            start = time.perf_counter()
            tasks[name].run()
            setting.sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
                timed += times[name][-1]
        round_ += 1
    return {name: summary(t) for name, t in times.items()}


def summary(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "times_ms": ms}


def ratio(figures: dict, a: str, b: str) -> float:
    return figures[a]["median_ms"] / figures[b]["median_ms"]


# ---------------------------------------------------------------------------------------------------------
# The figures


def bench_case(case: Case, setting: Setting, repeats: int, warmup: int, seconds: float = 0.0) -> dict:
    """Training steps of the five variants, then inference of dense, popupified and materialized models."""
    x, y = setting.inputs(case)
    models = {name: build(case, name, setting) for name in VARIANTS}
    steps = interleaved(
        {name: Task(train_step(m, x, y, setting)) for name, m in models.items()}, repeats, warmup, setting, seconds
    )
    served = {
        "dense": models["dense"],
        "popupified": models["edge_popup"],
        "materialized": setting.place(materialize(models["edge_popup"])),
    }
    # A forward costs a quarter of a step: three times the rounds for about the same time, a steadier median.
    infer = interleaved(
        {name: Task(inference(m, x, setting)) for name, m in served.items()},
        INFERENCE_ROUNDS * repeats,
        warmup,
        setting,
        seconds / 2,
    )
    return {
        "batch": setting.batch(case),
        "image_size": case.image_size,
        "step": steps,
        "step_ratios": {
            "edge_popup/dense": ratio(steps, "edge_popup", "dense"),
            "edge_popup_float/dense": ratio(steps, "edge_popup_float", "dense"),
            "edge_popup_rebuilt/dense": ratio(steps, "edge_popup_rebuilt", "dense"),
            "algorithm1/edge_popup": ratio(steps, "algorithm1", "edge_popup"),
            "algorithm1/dense": ratio(steps, "algorithm1", "dense"),
        },
        "inference": infer,
        "inference_ratios": {
            "popupified/dense": ratio(infer, "popupified", "dense"),
            "materialized/dense": ratio(infer, "materialized", "dense"),
        },
    }


def case_in_subprocess(name: str, args: argparse.Namespace, repeats: int, warmup: int, seconds: float) -> dict:
    """``bench_case`` for ``CASES[name]`` in a fresh interpreter (same device and threads); its figures."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--case-child",
        name,
        "--device",
        args.device,
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
        "--seconds",
        str(seconds),
        "--threads",
        str(torch.get_num_threads()),
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the benchmark of case {name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_training_memory(case: Case, variant: str, setting: Setting, steps: int = 3) -> dict:
    """Bytes the process holds at its peak over a few training steps, above what it held before the model."""
    if setting.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        x, y = setting.inputs(case)
        torch.cuda.reset_peak_memory_stats(setting.device)
        before = torch.cuda.memory_allocated(setting.device)
        step = train_step(build(case, variant, setting), x, y, setting)
        for _ in range(steps):
            step()
        setting.sync()
        peak = torch.cuda.max_memory_allocated(setting.device)
        del step
        return {"peak_bytes": peak - before, "how": "torch.cuda.max_memory_allocated"}
    command = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--peak-child",
        case.name,
        variant,
        "--threads",
        str(torch.get_num_threads()),
    ]
    # glibc's dynamic mmap threshold keeps freed large blocks in the heap, so the high-water mark would count
    # memory already released (run to run: +-20 MiB on ResNet-18). A fixed threshold returns every block over
    # 128 KiB to the kernel on free: the mark is then the live peak, the same in every run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_child(case_name: str, variant: str, steps: int = 3) -> None:
    """Body of the CPU memory subprocess: prints ``{"peak_bytes": ...}`` as its last line.

    The peak is the kernel's high-water mark of this process's resident memory (``VmHWM``), reset to the current
    size before the model is built (``/proc/self/clear_refs``). ``ru_maxrss`` would not do: Linux carries the
    parent's size over ``exec`` into it.
    """
    setting = Setting(torch.device("cpu"))
    case = CASES[case_name]
    x, y = setting.inputs(case)
    gc.collect()
    before = memory_status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the high-water mark then counts from the start of this (fresh) process
    step = train_step(build(case, variant, setting), x, y, setting)
    for _ in range(steps):
        step()
    peak = memory_status("VmHWM")
    print(json.dumps({"peak_bytes": peak - before, "process_peak_bytes": peak, "how": "VmHWM of a subprocess"}))


def memory_status(key: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def bench_masks(setting: Setting, repeats: int, warmup: int) -> dict:
    """ResNet-50's masks against one elementwise pass, per-layer kthvalue and per-layer sort.

    Each mask computation works on its own copy of the scores, which takes one SGD momentum step along a real
    gradient before every timed call: its threshold moves as in training, one optimizer step per call.
    """
    model = build(CASES["resnet50"], "edge_popup", setting)
    pairs = list(gated_layers(model))
    scores = [m._parameters[g.scores] for m, g in pairs]
    selectors = list({id(g.selector): g.selector for _, g in pairs}.values())
    x, y = setting.inputs(CASES["resnet50"])
    with setting.autocast():
        F.cross_entropy(model(x[:8]), y[:8]).backward()

    def stepped_copy() -> tuple[list[torch.Tensor], Callable[[], object]]:
        copy = [nn.Parameter(s.detach().clone()) for s in scores]
        for c, s in zip(copy, scores):
            c.grad = s.grad.clone()
        return [c.detach().view(-1) for c in copy], torch.optim.SGD(copy, **OPTIMIZER).step

    weights = [m._parameters[g.param].detach().reshape(-1) for m, g in pairs]
    kept = [g.selector.kept for _, g in pairs]
    magnitudes = [torch.empty(s.numel(), dtype=s.dtype, device=s.device) for s in scores]
    masks = [torch.empty(s.numel(), dtype=torch.bool, device=s.device) for s in scores]
    bit_words = [torch.empty(-(-s.numel() // 64), dtype=torch.int64) for s in scores]  # the compiled path's masks
    native_scores, native_step = stepped_copy()
    band_scores, band_step = stepped_copy()
    native_hints: list = [None] * len(pairs)
    band_hints: list = [None] * len(pairs)

    def abs_pass() -> None:
        for s, a in zip(band_scores, magnitudes):
            torch.abs(s, out=a)

    def native_masks() -> None:  # the compiled pass, masks only, every layer in one call
        groups = [
            NativeGroup([s], [w], [b], None, n, h)
            for s, w, b, n, h in zip(native_scores, weights, bit_words, kept, native_hints)
        ]
        native_hints[:] = select_topk_native_many(groups)

    def band_masks() -> None:  # the pure-PyTorch path: |s|, then the exact top-k per layer
        abs_pass()
        for i, (a, m) in enumerate(zip(magnitudes, masks)):
            band_hints[i] = select_topk([a], kept[i], [m], band_hints[i])

    def refresh() -> None:  # the library's whole refresh: masks plus the cached w * mask
        for selector in selectors:
            selector.refresh()

    def kthvalue() -> None:
        for a, n in zip(magnitudes, kept):
            torch.kthvalue(a, a.numel() - n + 1)

    def sort() -> None:
        for a in magnitudes:
            torch.sort(a)

    use_native = not setting.cuda and native.kernel() is not None
    tasks = {
        "abs_pass": Task(abs_pass),
        "masks": Task(native_masks, prepare=native_step) if use_native else Task(band_masks, prepare=band_step),
        "refresh": Task(refresh, prepare=torch.optim.SGD(scores, **OPTIMIZER).step),
        "kthvalue": Task(kthvalue),
        "sort": Task(sort),
    }
    if use_native:
        tasks["masks_torch_band"] = Task(band_masks, prepare=band_step)
    for task in tasks.values():
        task.run()
    figures = interleaved(tasks, repeats, warmup, setting)
    return {
        "layers": len(scores),
        "scores": sum(s.numel() for s in scores),
        "strategy": "select" if setting.cuda else "native band (compiled)" if use_native else "band",
        "native_unavailable": None if setting.cuda else native.unavailable_reason(),
        "times": figures,
        "ratios": {f"{name}/abs_pass": ratio(figures, name, "abs_pass") for name in tasks if name != "abs_pass"},
    }


FILE_KS = (0.3, 0.5)  # the paper's ImageNet k, and its best CIFAR k


def subnetwork_bits(case: Case, k: float) -> dict:
    model = popupify(case.build(), k)
    weights = sum(m._parameters[g.param].numel() for m, g in gated_layers(model))
    with tempfile.TemporaryDirectory() as tmp:
        size = save_subnetwork(model, Path(tmp) / "subnetwork.safetensors")
    # The file's least possible size for its masks: sum over layers of n * H(kept / n) bits.
    entropy = 0.0
    for selector in {id(g.selector): g.selector for _, g in gated_layers(model)}.values():
        n = sum(m._parameters[g.param].numel() for m, g in selector.members)
        p = selector.kept / n
        entropy += 0.0 if p in (0.0, 1.0) else -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return {
        "k": k,
        "file_bytes": size,
        "gated_weights": weights,
        "bits_per_weight": 8 * size / weights,
        "mask_entropy_bits_per_weight": entropy / weights,
    }


# ---------------------------------------------------------------------------------------------------------
# Targets and report


@dataclass
class Targets:
    rows: list[dict] = field(default_factory=list)

    def check(self, name: str, measured: float, op: str, limit: float) -> None:
        ok = measured <= limit if op == "<=" else measured >= limit
        self.rows.append({"target": name, "measured": measured, "op": op, "limit": limit, "pass": ok})

    def print(self) -> None:
        print("\nTargets (measured / target):")
        width = max(len(r["target"]) for r in self.rows)
        for r in self.rows:
            verdict = "PASS" if r["pass"] else "FAIL"
            print(f"  {r['target']:<{width}}  {r['measured']:8.3f} / {r['op']} {r['limit']:<5g}  {verdict}")


def print_case(name: str, figures: dict) -> None:
    print(f"\n{name}: batch {figures['batch']}, {figures['image_size']}x{figures['image_size']}")
    for kind in ("step", "inference"):
        row = "  ".join(f"{v} {f['median_ms']:9.1f} ms" for v, f in figures[kind].items())
        ratios = "  ".join(f"{k} {v:.3f}" for k, v in figures[f"{kind}_ratios"].items())
        print(f"  {kind:<9} {row}\n  {'':<9} {ratios}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--quick", action="store_true", help="fewer repeats (3; ResNet-50 on CPU: 2)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 5 on CPU, 10 on CUDA; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="discarded rounds (default 1 on CPU, 3 on CUDA)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="time budget per case: training steps get more rounds while their timed rounds took less than this "
        "(half of it for inference; at most 10x --repeats; default 60; 0: exactly --repeats)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["steps", "memory", "masks", "files"])
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--in-process", action="store_true", help="time every case in this process (default: a fresh one each)"
    )
    parser.add_argument("--peak-child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--case-child", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_child(*args.peak_child)
        return {}

    setting = Setting(torch.device(args.device))
    if setting.cuda:
        torch.backends.cudnn.benchmark = True
    if args.case_child:
        print(json.dumps(bench_case(CASES[args.case_child], setting, args.repeats, args.warmup, args.seconds)))
        return {}
    repeats = args.repeats or (3 if args.quick else 10 if setting.cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if setting.cuda else 1)
    # A CPU ResNet-50 step takes seconds: half the rounds there.
    repeats_for = {
        name: repeats if setting.cuda or name != "resnet50" else max(2, math.ceil(repeats / 2)) for name in CASES
    }
    results: dict = {
        "machine": setting.describe(),
        "k": K,
        "optimizer": OPTIMIZER,
        "repeats": repeats,
        "seconds_per_case": 0.0 if args.quick else args.seconds,
        "case_process": "this one" if args.in_process else "a fresh subprocess per case",
        "warmup": warmup,
        "cases": {},
        "memory": {},
        "section_seconds": {},
    }
    targets = Targets()
    tag = "GPU" if setting.cuda else "CPU"
    print(json.dumps(results["machine"]))

    def done(section: str, began: float) -> None:
        """Record the section's duration and write everything so far (a run cut short keeps its figures)."""
        results["section_seconds"][section] = time.perf_counter() - began
        results["targets"] = targets.rows
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    for name in args.cases:
        case = CASES[name]
        if "steps" not in args.skip:
            began = time.perf_counter()
            seconds = 0.0 if args.quick else args.seconds
            if args.in_process:
                figures = bench_case(case, setting, repeats_for[name], warmup, seconds)
            else:
                figures = case_in_subprocess(name, args, repeats_for[name], warmup, seconds)
            results["cases"][name] = figures
            print_case(name, figures)
            if name.startswith("resnet18"):
                ratios = figures["step_ratios"]
                limit = 1.05 if setting.cuda else 1.10
                label = LABELS[name]
                targets.check(f"edge-popup step / dense step, {label} {tag}", ratios["edge_popup/dense"], "<=", limit)
                for variant, how in (("edge_popup_float", "float weights"), ("edge_popup_rebuilt", "w*mask rebuilt")):
                    targets.check(
                        f"edge-popup step ({how}) / dense step, {label} {tag}",
                        ratios[f"{variant}/dense"],
                        "<=",
                        limit,
                    )
                if not setting.cuda:
                    targets.check(
                        f"Algorithm 1 step / edge-popup step, {label} CPU", ratios["algorithm1/edge_popup"], ">=", 3.0
                    )
            for kind, value in figures["inference_ratios"].items():
                targets.check(f"inference {kind}, {name} {tag}", value, "<=", 1.05)
            done(f"steps {name}", began)
        if "memory" not in args.skip:
            began = time.perf_counter()
            memory = {variant: peak_training_memory(case, variant, setting) for variant in VARIANTS}
            memory["edge_popup/dense"] = memory["edge_popup"]["peak_bytes"] / memory["dense"]["peak_bytes"]
            for variant in ("edge_popup_float", "edge_popup_rebuilt"):
                memory[f"{variant}/dense"] = memory[variant]["peak_bytes"] / memory["dense"]["peak_bytes"]
                targets.check(
                    f"peak training memory {variant} / dense, {name} {tag}", memory[f"{variant}/dense"], "<=", 1.3
                )
            results["memory"][name] = memory
            print(
                "  peak training memory (MiB above baseline): "
                + "  ".join(f"{v} {memory[v]['peak_bytes'] / 2**20:.0f}" for v in VARIANTS)
            )
            targets.check(
                f"peak training memory edge-popup / dense, {name} {tag}", memory["edge_popup/dense"], "<=", 1.3
            )
            done(f"memory {name}", began)

    if "masks" not in args.skip:
        began = time.perf_counter()
        masks = bench_masks(setting, repeats, warmup)
        results["masks_resnet50"] = masks
        print(
            f"\nResNet-50 masks ({masks['layers']} layers, {masks['scores']:,} scores, strategy {masks['strategy']}):"
        )
        for name, f in masks["times"].items():
            extra = f"  ({masks['ratios'][name + '/abs_pass']:.2f}x abs)" if name != "abs_pass" else ""
            print(f"  {name:<9} {f['median_ms']:9.2f} ms{extra}")
        targets.check(f"ResNet-50 all masks / one abs pass {tag}", masks["ratios"]["masks/abs_pass"], "<=", 3.0)
        done("masks", began)

    if "files" not in args.skip:
        began = time.perf_counter()
        results["subnetwork_files"] = {
            f"{name}@k={k}": subnetwork_bits(CASES[name], k) for name in args.cases for k in FILE_KS
        }
        print("\nsubnetwork files (H: the masks' entropy, the least a lossless mask code can take):")
        for name, f in results["subnetwork_files"].items():
            print(
                f"  {name:<16} {f['file_bytes']:>10,} bytes for {f['gated_weights']:>11,} weights: "
                f"{f['bits_per_weight']:.4f} bits/weight (H {f['mask_entropy_bits_per_weight']:.4f})"
            )
            targets.check(f"subnetwork file bits per weight, {name}", f["bits_per_weight"], "<=", 1.05)
        done("files", began)

    targets.print()
    if args.json:
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
