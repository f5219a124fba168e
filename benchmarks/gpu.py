"""One prepared command for a lent GPU: step ratios against dense per selection back-end, the masks of ResNet-50
against one pass over its scores, host synchronisations counted, the memory per parameter of a GPT-2 training step
(dense AdamW against edge-popup's defaults, float weights with fp32 and bf16 scores, and bf16 scores with sign
bits), then the CUDA and selection tests.

    python -m benchmarks.gpu                      # on the GPU machine: about 5-8 minutes on one H100/H200
    python -m benchmarks.gpu --small              # the same code on tiny sizes, on the CPU if there is no GPU

Cases (batch 256, bf16 autocast, channels-last on CUDA): Conv4 and torchvision ResNet-18 at 32x32, ResNet-50 and
Wide ResNet-50-2 at 224x224; each timed as ``dense`` (the weights train) and ``edge_popup`` (the defaults:
sign-bit weights, ``w * mask`` kept) under every selection back-end that runs there (``cpu``: the per-layer path,
``device``: all layers at once), and ``edge_popup_float`` (float weights, ``w * mask`` rebuilt) under
``device``, interleaved
round-robin in one process (benchmarks/speed.py's loop), medians and ratios. Host synchronisations per training
step are counted two ways: ATen ops that read data back to the host (``.item()``, ``nonzero``, ...), and, on
CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` warnings. Results: ``benchmarks/results/gpu_<gpu>.json`` (or
``--json``) and the pytest output beside it. Targets: ResNet-50 at 224x224 <= 1.05x dense, ResNet-18 at
32x32 <= 1.15x, with the ``device`` back-end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.speed import Setting, Task, interleaved, train_step  # noqa: E402
from supermask_fx import popupify  # noqa: E402
from supermask_fx.core.masks import gated_layers  # noqa: E402
from supermask_fx.models import build_model  # noqa: E402
from supermask_fx.selection import set_backend  # noqa: E402

CASES = {  # name: (builder, image size, classes)
    "conv4": (lambda: build_model("conv4", num_classes=10, in_channels=3, image_size=32), 32, 10),
    "resnet18_tv": (lambda: torchvision.models.resnet18(num_classes=10), 32, 10),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=1000), 224, 1000),
    "wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(num_classes=1000), 224, 1000),
}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class SyncCounter(TorchDispatchMode):
    """Counts ATen ops that need the data on the host (each one a device synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.syncs: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def inputs(size: int, classes: int, batch: int, setting: Setting):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    fmt = torch.channels_last if setting.cuda else torch.contiguous_format
    return x.to(setting.device, memory_format=fmt), torch.randint(0, classes, (batch,), generator=g).to(setting.device)


def with_backend(name: str | None, run):
    def wrapped():
        set_backend(name)
        try:
            run()
        finally:
            set_backend(None)

    return wrapped


def bench_case(name: str, setting: Setting, batch: int, small: bool, repeats: int, warmup: int) -> dict:
    builder, size, classes = CASES[name]
    if small and size > 64:
        size = 64
    x, y = inputs(size, classes, batch, setting)
    torch.manual_seed(0)
    dense = setting.place(popupify(builder(), 1.0, method="dense", init="kaiming_normal"))
    torch.manual_seed(0)
    popup = setting.place(popupify(builder(), 0.3))  # the defaults: sign-bit weights, w * mask kept
    torch.manual_seed(0)
    popup_float = setting.place(popupify(builder(), 0.3, weight_storage="dense"))  # float weights, rebuilt
    tasks = {"dense": Task(train_step(dense, x, y, setting))}
    step = train_step(popup, x, y, setting)
    for backend in ("cpu", "device"):
        tasks[f"edge_popup[{backend}]"] = Task(with_backend(backend, step))
    tasks["edge_popup_float[device]"] = Task(with_backend("device", train_step(popup_float, x, y, setting)))
    figures = interleaved(tasks, repeats, warmup, setting)
    out = {"image_size": size, "batch": batch, "median_ms": {k: v["median_ms"] for k, v in figures.items()}}
    out["ratio_vs_dense"] = {
        k: figures[k]["median_ms"] / figures["dense"]["median_ms"] for k in figures if k != "dense"
    }
    out["host_syncs_per_step"] = {}
    for backend in ("cpu", "device"):
        set_backend(backend)
        try:
            with SyncCounter() as counter:
                step()
            cuda_warnings = 0
            if setting.cuda:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        step()
                        setting.sync()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)
            out["host_syncs_per_step"][backend] = {"aten_ops": counter.syncs, "cuda_sync_warnings": cuda_warnings}
        finally:
            set_backend(None)
    return out


def bench_masks(setting: Setting, small: bool, repeats: int, warmup: int) -> dict:
    """All masks of ResNet-50 (one refresh of every layer after a step) against one ``abs`` pass over its scores."""
    torch.manual_seed(0)
    builder = torchvision.models.resnet18 if small else torchvision.models.resnet50  # small: a check of the code
    model = setting.place(popupify(builder(num_classes=1000), 0.3))
    scores = [gate_module._parameters[gate.scores] for gate_module, gate in gated_layers(model)]
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    buffer = torch.empty_like(flat)
    first = next(gate for _, gate in gated_layers(model))

    def touch():  # a tiny in-place change: every selector is stale, as after an optimizer step
        with torch.no_grad():
            for s in scores:
                s.mul_(1.0)

    tasks = {"abs_pass": Task(lambda: torch.abs(flat, out=buffer))}
    for backend in ("cpu", "device"):
        tasks[f"masks[{backend}]"] = Task(with_backend(backend, lambda: first.selector.refresh(False)), touch)
    figures = interleaved(tasks, repeats, warmup, setting)
    return {
        "model": "resnet18" if small else "resnet50",
        "scores": flat.numel(),
        "layers": len(scores),
        "median_ms": {k: v["median_ms"] for k, v in figures.items()},
        "ratio_vs_abs_pass": {k: figures[k]["median_ms"] / figures["abs_pass"]["median_ms"] for k in figures},
    }


def bench_llm_memory(setting: Setting, small: bool) -> dict:
    """Bytes per parameter of a training step (peak allocated over what was allocated before the model, divided by
    the parameters) of GPT-2 124M (2 layers with ``--small``), batch 8 x 512 tokens (2 x 64), bf16 autocast: dense
    AdamW against edge-popup (SGD with momentum on the scores): with its defaults (fp32 scores, sign-bit weights,
    ``w * mask`` kept from the forward), then ``w * mask`` rebuilt in the backward and float weights
    (``weight_storage="dense"``) with fp32 and with bf16 scores, and bf16 scores with sign-bit weights. CUDA only."""
    if not setting.cuda:
        return {"skipped": "needs CUDA (torch.cuda.max_memory_allocated)"}
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    from supermask_fx import supermask_parameters

    logging.set_verbosity_error()
    batch, tokens = (2, 64) if small else (8, 512)
    out = {}
    for case in ("dense_adamw", "popup_default", "popup_sgd", "popup_bf16", "popup_bf16_bits"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2 if small else 12)).to(setting.device)
        params = sum(p.numel() for p in model.parameters())
        if case == "dense_adamw":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            chosen = {} if case == "popup_default" else {"rebuild_effective": True}
            if case != "popup_default":
                chosen["weight_storage"] = "bits" if case.endswith("bits") else "dense"
            popupify(model, k=0.5, score_dtype="bfloat16" if "bf16" in case else None, **chosen)
            optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9)
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, 50257, (batch, tokens), device=setting.device)
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out[case] = round((torch.cuda.max_memory_allocated() - before) / params, 2)
        del model, optimizer, loss
    dense = out["dense_adamw"]
    out["ratio_vs_dense_adamw"] = {
        case: round(value / dense, 3) for case, value in out.items() if case != "dense_adamw"
    }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes (batch 8, images <= 64 px): a check of the code")
    p.add_argument("--json", help="output file (default benchmarks/results/gpu_<device>.json)")
    p.add_argument("--repeats", type=int, help="timed rounds (default 20, --small 3)")
    p.add_argument("--no-tests", action="store_true", help="skip pytest tests/test_cuda.py tests/test_selection.py")
    args = p.parse_args(argv)
    setting = Setting(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if setting.cuda:
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (3 if args.small else 20)
    warmup = 1 if args.small else 5
    batch = 8 if args.small else 256
    started = time.perf_counter()
    results = {"machine": setting.describe(), "small": args.small, "cases": {}}
    for name in CASES:
        results["cases"][name] = bench_case(name, setting, batch, args.small, repeats, warmup)
        print(name, json.dumps(results["cases"][name]["ratio_vs_dense"]), flush=True)
    results["masks_resnet50"] = bench_masks(setting, args.small, repeats, warmup)
    print("all masks / one abs pass:", json.dumps(results["masks_resnet50"]["ratio_vs_abs_pass"]))
    results["llm_memory_bytes_per_param"] = bench_llm_memory(setting, args.small)
    print("GPT-2 step, bytes per parameter:", json.dumps(results["llm_memory_bytes_per_param"]), flush=True)
    device_name = torch.cuda.get_device_name().split()[-1].lower() if setting.cuda else "cpu"
    path = Path(
        args.json or ROOT / "benchmarks" / "results" / f"gpu_{device_name}{'_small' if args.small else ''}.json"
    )
    if not args.no_tests:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_cuda.py",
                "tests/test_selection.py",
                "tests/test_score_dtype.py",
                "tests/test_multicoat.py",
                "tests/test_weight_storage.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        path.with_suffix(".tests.txt").write_text(done.stdout[-20000:] + done.stderr[-5000:])
        results["tests"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
        print("tests:", results["tests"])
    results["wall_s"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {path} ({results['wall_s']} s)")
    return results


if __name__ == "__main__":
    main()
