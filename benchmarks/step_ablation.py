"""Where edge-popup's CPU training step spends its time beyond dense's: each extra pass switched off in turn.

A measurement, not a method: the switched-off variants compute wrong gradients or stale masks on purpose, to
time what a step costs without that pass. Variants, all timed interleaved in one process (``benchmarks.speed``'s
loop, torchvision ResNet-18 at 32x32, batch 128, SGD with momentum):

* ``dense``: the weights train;
* ``edge_popup_float``: ``popupify(k=0.5, weight_storage="dense")``: float weights, every pass on (``w * mask``
  rebuilt in the backward); the variants below switch its passes off:
* ``no_score_grad``: the backward hands ``dL/dw_eff`` to the scores as it is (no ``grad * w * sign(s)`` pass);
* ``no_selection``: the masks are not selected again after the first step (no top-k pass);
* ``no_rebuild``: the convolutions keep ``w * mask`` from the forward (``core.recompute`` off: one weight-sized
  tensor per layer held until the backward);
* ``none_of_the_three``: all three off; ``none_and_no_apply``: also no ``w * mask`` in the forward (the weight is
  used as it is);
* ``edge_popup``: ``popupify(k=0.5)`` as shipped: every pass on, the weights held as sign bits (the passes read 1
  bit of each weight instead of 32) and ``w * mask`` kept from the forward (no rebuild).

Each variant's ratio to ``dense`` is printed; the differences between them are what each pass costs.

    python -m benchmarks.step_ablation                  # 2 threads, 30 rounds (about 2 minutes)
    python -m benchmarks.step_ablation --threads 1 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import speed  # noqa: E402
from supermask_fx.core import recompute  # noqa: E402
from supermask_fx.methods import edge_popup as ep  # noqa: E402
from supermask_fx.selection.selector import TopKSelector  # noqa: E402

OFF = {"score_grad": False, "selection": False, "rebuild": False, "apply": False}  # what is switched off now
VARIANTS = {  # switched off in the float-weight model
    "edge_popup_float": (),
    "no_score_grad": ("score_grad",),
    "no_selection": ("selection",),
    "no_rebuild": ("rebuild",),
    "none_of_the_three": ("score_grad", "selection", "rebuild"),
    "none_and_no_apply": ("score_grad", "selection", "rebuild", "apply"),
}


def _switches() -> None:
    """Wrap the three places so that ``OFF`` decides, per timed step, whether each pass runs."""
    forward, backward = ep.StraightThrough.forward, ep.StraightThrough.backward
    refresh, wanted = TopKSelector.refresh, recompute.RecomputeEffective.wanted

    def st_forward(ctx, scores, weight, mask):
        if OFF["apply"]:
            ctx.save_for_backward(scores, weight, None)
            return weight.view_as(weight)
        return forward(ctx, scores, weight, mask)

    def st_backward(ctx, grad):
        return (grad, None, None) if OFF["score_grad"] else backward(ctx, grad)

    def select(self, effective: bool = True):
        if OFF["selection"] and self.key is not None and not effective:
            return None
        return refresh(self, effective)

    ep.StraightThrough.forward = staticmethod(st_forward)
    ep.StraightThrough.backward = staticmethod(st_backward)
    TopKSelector.refresh = select
    recompute.RecomputeEffective.wanted = staticmethod(lambda: not OFF["rebuild"] and wanted())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per variant (default 30)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _switches()
    setting = speed.Setting(torch.device("cpu"))
    case = speed.CASES["resnet18_tv"]
    x, y = setting.inputs(case)

    def task(variant: str) -> speed.Task:
        build = {"dense": speed.dense, "edge_popup": speed.edge_popup}.get(variant, speed.edge_popup_float)
        model = build(case.build())
        off = VARIANTS.get(variant, ())
        return speed.Task(speed.train_step(model, x, y, setting), lambda: OFF.update({k: k in off for k in OFF}))

    tasks = {name: task(name) for name in ("dense", *VARIANTS, "edge_popup")}
    figures = speed.interleaved(tasks, args.rounds, 2, setting)
    dense = figures["dense"]["median_ms"]
    print(f"torchvision ResNet-18, 32x32, batch 128, {args.threads} thread(s), {args.rounds} interleaved rounds")
    for name, f in figures.items():
        print(f"  {name:20s} median {f['median_ms']:7.1f} ms   ratio to dense {f['median_ms'] / dense:.3f}")
    out = {
        "machine": setting.describe(),
        "rounds": args.rounds,
        "ratio_to_dense": {name: round(f["median_ms"] / dense, 4) for name, f in figures.items()},
        "median_ms": {name: round(statistics.median(f["times_ms"]), 2) for name, f in figures.items()},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
