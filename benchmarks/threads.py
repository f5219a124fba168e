"""Which threads the compiled CPU passes run on, and what that does to a training step.

Run from the repository root::

    python -m benchmarks.threads --json benchmarks/results/cpu_threads.json

Times one training step (as ``benchmarks/speed.py`` does: zero_grad, forward, cross-entropy, backward, SGD
momentum step) of the same model and batch in four variants, interleaved in one process:

* ``dense``: the weights train (no compiled pass runs);
* ``edge_popup``: ``popupify``, the compiled passes as the library loads them (``native.thread_pool()``: on
  PyTorch's own OpenMP pool where PyTorch runs on GNU OpenMP and the compiler is GCC);
* ``edge_popup_pthreads``: the same, on the build that starts its own pthreads per call (the fallback);
* ``edge_popup_1thread``: the same, each compiled pass on the calling thread only.

The three edge-popup variants compute identical masks and gradients (``tests/test_native.py``); only the
threads differ. Prints medians and each variant / dense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make supermask_fx and benchmarks importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.speed import CASES, Setting, Task, build, interleaved, ratio, train_step  # noqa: E402
from supermask_fx.selection import native  # noqa: E402


class _OneThread:
    """A kernel whose passes run on the calling thread only (the thread count is each method's last argument)."""

    def __init__(self, kernel: native.NativeKernel) -> None:
        self.kernel = kernel

    def __getattr__(self, name: str):
        method = getattr(self.kernel, name)

        def one_thread(*args):
            return method(*args[:-1], 1)

        return one_thread


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="resnet18_tv", choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)

    loaded = native.kernel()
    if loaded is None:
        raise SystemExit(f"no compiled kernel: {native.unavailable_reason()}")
    pthreads, reason, _ = native._load(openmp=False)
    if pthreads is None:
        raise SystemExit(f"no pthreads build: {reason}")
    kernels = {
        "dense": loaded,
        "edge_popup": loaded,
        "edge_popup_pthreads": pthreads,
        "edge_popup_1thread": _OneThread(loaded),
    }

    setting = Setting(torch.device("cpu"))
    case = CASES[args.case]
    x, y = setting.inputs(case)
    tasks = {}
    for name, kern in kernels.items():
        step = train_step(build(case, "dense" if name == "dense" else "edge_popup", setting), x, y, setting)

        def select(kern=kern) -> None:  # untimed: which build the next timed step calls
            native._state["kernel"] = kern

        tasks[name] = Task(step, prepare=select)
    try:
        figures = interleaved(tasks, args.repeats, args.warmup, setting)
    finally:
        native._state["kernel"] = loaded
    results = {
        "machine": setting.describe(),
        "case": args.case,
        "batch": setting.batch(case),
        "repeats": args.repeats,
        "step": figures,
        "ratios": {f"{name}/dense": ratio(figures, name, "dense") for name in kernels if name != "dense"},
    }
    print(json.dumps(results["machine"]))
    print(f"\n{args.case}: batch {results['batch']}, {args.repeats} interleaved rounds")
    for name in kernels:
        extra = "" if name == "dense" else f"  {results['ratios'][name + '/dense']:.3f}x dense"
        print(f"  {name:<22} {figures[name]['median_ms']:9.1f} ms{extra}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
