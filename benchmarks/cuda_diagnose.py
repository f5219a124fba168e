"""Diagnostics for an edge-popup training step on CUDA (not a benchmark; prints, writes nothing else).

1. every host synchronisation in a few edge-popup training steps and an eval forward (``set_sync_debug_mode``
   "warn"), each with the Python line that caused it;
2. the memory format of the weights the convolutions receive (dense vs edge-popup under channels-last);
3. a profile of one training step of the dense and the edge-popup ResNet-18 (top ops by device time);
4. a candidate for the ``select`` strategy (``supermask_fx.topk._select_sync_free``): the threshold from one
   ``torch.sort`` instead of ``torch.kthvalue`` (which runs one thread block per slice on CUDA). Checked exact
   against ``topk_mask_reference`` on tied data, then timed (masks of ResNet-50; training steps) next to the
   library as it is, with ``benchmarks.speed``'s timing loop.

Run: ``python -m benchmarks.cuda_diagnose [--case resnet18]``.
"""

from __future__ import annotations

import argparse
import traceback
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import supermask_fx.topk as topk
from benchmarks.speed import CASES, Setting, Task, bench_masks, build, interleaved, train_step
from supermask_fx.masks import gated_layers


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


def sort_select(parts: list[torch.Tensor], kept: int, masks: list[torch.Tensor]) -> None:
    """``_select_sync_free`` with ``T`` read from a sorted copy instead of ``kthvalue``: no host sync either."""
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    threshold = torch.sort(flat).values[flat.numel() - kept]
    above = flat > threshold
    ties = flat == threshold
    room = kept - above.sum()
    keep = above | (ties & (torch.cumsum(ties, 0) <= room))
    start = 0
    for m in masks:
        m.copy_(keep[start : start + m.numel()])
        start += m.numel()


class patched:
    """Context manager: the library's select strategy replaced by ``sort_select``."""

    def __enter__(self):
        self.saved, topk._select_sync_free = topk._select_sync_free, sort_select

    def __exit__(self, *exc):
        topk._select_sync_free = self.saved


def with_candidate(run):
    def wrapped():
        with patched():
            run()

    return wrapped


def candidate(setting: Setting, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    for n, levels, fraction in [(1, 2, 0.5), (1000, 3, 0.5), (37_000, 16, 0.3), (2_359_296, 64, 0.5)]:
        a = (torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels).abs()
        kept = max(1, round(fraction * n))
        mask = torch.empty(n, dtype=torch.bool, device=setting.device)
        sort_select([a.to(setting.device)], kept, [mask])
        assert torch.equal(mask.cpu(), topk.topk_mask_reference(a, kept)), (n, levels)
    print("\ncandidate sort_select: exact on tied data (matches topk_mask_reference)")
    for name in ("resnet18", "resnet50"):
        case = CASES[name]
        x, y = setting.inputs(case)
        tasks = {v: Task(train_step(build(case, v, setting), x, y, setting)) for v in ("dense", "edge_popup")}
        with patched():
            tasks["edge_popup_sort_select"] = Task(
                with_candidate(train_step(build(case, "edge_popup", setting), x, y, setting))
            )
        figures = interleaved(tasks, repeats, 3, setting)
        dense_ms = figures["dense"]["median_ms"]
        print(
            f"{name} step, batch {setting.batch(case)}: "
            + "  ".join(f"{v} {f['median_ms']:.2f} ms ({f['median_ms'] / dense_ms:.3f}x)" for v, f in figures.items())
        )
    with patched():
        masks = bench_masks(setting, repeats, 2)
    print(
        "ResNet-50 masks with sort_select: "
        + "  ".join(f"{k} {f['median_ms']:.2f} ms" for k, f in masks["times"].items())
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", default="resnet18", choices=list(CASES))
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only-candidate", action="store_true")
    args = parser.parse_args()
    setting = Setting(torch.device("cuda"))
    print(torch.cuda.get_device_name(), torch.__version__)
    if not args.only_candidate:
        list_syncs(CASES[args.case], setting)
        weight_formats(CASES[args.case], setting)
        profile_steps(CASES[args.case], setting, args.rows)
    candidate(setting, args.repeats)


if __name__ == "__main__":
    main()
