"""Diagnostics for an edge-popup training step on CUDA (not a benchmark; prints, writes nothing else).

1. every host synchronisation in a few edge-popup training steps and an eval forward (``set_sync_debug_mode``
   "warn"), each with the Python line that caused it;
2. the memory format of the weights the convolutions receive (dense vs edge-popup under channels-last);
3. a profile of one training step of the dense and the edge-popup ResNet-18 (top ops by device time);

(A fourth section timed a candidate ``select`` strategy, the threshold from ``torch.sort`` instead of CUDA's
``torch.kthvalue``; it is now the library's own, so the section is gone and its measurement stays in
``benchmarks/results/gpu_h100_candidate_sort_select.txt``. Exactness on tied data is in ``tests/test_cuda.py``.)

Run: ``python -m benchmarks.cuda_diagnose [--case resnet18]``.
"""

from __future__ import annotations

import argparse
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.speed import CASES, Setting, build, train_step
from supermask_fx.core.masks import gated_layers


def list_syncs(case, setting: Setting) -> None:
    model = build(case, "edge_popup", setting)
    x, y = setting.inputs(case)
    step = train_step(model, x, y, setting)
    found: dict[tuple[str, str], int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in frames[-6:][::-1])
        key = (str(message).splitlines()[0], where)
        found[key] = found.get(key, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
            model.eval()
            with torch.no_grad(), setting.autocast():
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"host synchronisations in 3 edge-popup steps + 1 eval forward of {case.name}: {sum(found.values())}")
    for (message, where), count in found.items():
        print(f"  {count}x {message}\n      at {where}")


def weight_formats(case, setting: Setting) -> None:
    for variant in ("dense", "edge_popup"):
        model = build(case, variant, setting)
        if variant == "edge_popup":
            model(setting.inputs(case)[0][:2])  # fill the caches
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        cl = sum(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        print(f"{variant}: {cl}/{len(convs)} conv weights as read by forward are channels-last")
        if variant == "edge_popup":
            m, g = next(iter(gated_layers(model)))
            scores = m._parameters[g.scores]
            print(f"  scores channels-last: {scores.is_contiguous(memory_format=torch.channels_last)}")


def profile_steps(case, setting: Setting, rows: int) -> None:
    x, y = setting.inputs(case)
    for variant in ("dense", "edge_popup"):
        step = train_step(build(case, variant, setting), x, y, setting)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"\n{variant} step, {case.name}, batch {setting.batch(case)}")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="resnet18", choices=list(CASES))
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    setting = Setting(torch.device("cuda"))
    print(torch.cuda.get_device_name(), torch.__version__)
    list_syncs(CASES[args.case], setting)
    weight_formats(CASES[args.case], setting)
    profile_steps(CASES[args.case], setting, args.rows)


if __name__ == "__main__":
    main()
