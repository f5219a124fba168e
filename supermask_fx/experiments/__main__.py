"""Command line: ``python -m supermask_fx.experiments <experiment|all|report|list> [options]``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .configs import EXPERIMENTS, ORDER, PAPER_ONLY, plan

IMAGENET_MODELS = ("resnet50", "resnet101", "wide_resnet50_2")
#: Where results go unless --csv says otherwise: under the current folder's runs/, never over the committed
#: results in docs/results/ (pass --csv docs/results/<scale>/results.csv to add to those on purpose).
RUNS = Path("runs") / "experiments"


BASELINES_CSV = Path("docs/results/baselines/results.csv")
PAPER_CSV = Path("docs/results/cpu/results.csv")


def default_csv(name: str) -> Path:
    """``runs/experiments/<name>/results.csv`` under the current folder."""
    return RUNS / name / "results.csv"


def imagenet_commands(seeds: int, data_dir: str = "$IMAGENET") -> list[str]:
    """Table 2 at the paper's scale: ImageNet, k = 30 %, the authors' large-scale recipe (SGD lr 0.256, momentum
    0.875, weight decay 3.0517578125e-05, batch 256, label smoothing 0.1, 5 warm-up epochs, cosine, 100 epochs;
    their ``configs/largescale/subnetonly/*-u{kn,sc}-unsigned.yaml``: Kaiming normal and signed constant, not
    scaled), as ``examples/imagenet.py`` takes them."""
    out = []
    for model in IMAGENET_MODELS:
        for init in ("kaiming_normal", "signed_constant"):
            for seed in range(seeds):
                out.append(
                    f"accelerate launch examples/imagenet.py --data-dir {data_dir} --model {model} --k 0.3 "
                    f"--init {init} --epochs 100 --warmup-epochs 5 --batch-size 256 --lr 0.256 --momentum 0.875 "
                    f"--weight-decay 3.0517578125e-05 --label-smoothing 0.1 --seed {seed} "
                    f"--out runs/imagenet/{model}-{init}-k30-seed{seed}"
                )
    return out


def decide(args) -> int:
    """``decide``: the CPU protocol that decides the paper's claims (``protocol.py``), or with
    ``--protocol followups`` the follow-up methods' (``followups.py``): run it, or ``--report``."""
    from . import followups, protocol

    paper = args.protocol == "paper"
    proto = protocol if paper else followups
    csv_path = args.csv or default_csv("cpu" if paper else "followups")
    given = args.also if args.also is not None else [BASELINES_CSV] + ([] if paper else [PAPER_CSV])
    also = tuple(p for p in given if p != csv_path)
    seeds = args.seeds if args.seeds_given else proto.SEEDS
    if args.report:
        from .decide_report import make_decide_report

        command = (
            "python -m supermask_fx.experiments decide"
            + ("" if paper else " --protocol followups")
            + " --report"
            + (f" --csv {csv_path}" if args.csv else "")
        )
        written = make_decide_report(csv_path, args.out or csv_path.parent, seeds, command, also, proto=proto)
        print(f"wrote {written}")
        return 0
    from ..core.method import registered_methods
    from .configs import missing_data_reason

    specs = proto.plan(seeds)
    unknown = sorted({s.method for s in specs} - set(registered_methods()))
    if unknown:  # a method this checkout lacks: run the rest; the report lists these runs as missing
        print(f"{sum(s.method in unknown for s in specs)} runs skipped: method(s) {', '.join(unknown)} not registered")
        specs = [s for s in specs if s.method not in unknown]
    for dataset in sorted({s.dataset for s in specs}):
        reason = missing_data_reason(dataset)
        if reason is not None:  # run what can run here; the report lists the rest as missing
            skipped = [s for s in specs if s.dataset == dataset]
            specs = [s for s in specs if s.dataset != dataset]
            print(f"{len(skipped)} runs on {dataset} skipped: {reason}")
    if args.plan_only:
        from .decide_report import describe
        from .results import done_keys

        done = done_keys(csv_path).union(*(done_keys(p) for p in also))
        for spec in specs:
            print(f"{'done ' if spec.key() in done else 'to do'}  {describe(spec)} ({spec.dataset}) seed {spec.seed}")
        print(f"{sum(s.key() in done for s in specs)} of {len(specs)} runs done")
        return 0
    from .runner import run_all, share_machine

    share_machine(args.threads, args.nice)
    run_all(specs, csv_path, shard=args.shard_pair, also_done=also)
    return 0


def main(argv: list[str] | None = None) -> int:
    names = [*EXPERIMENTS, *PAPER_ONLY]
    parser = argparse.ArgumentParser(
        prog="python -m supermask_fx.experiments",
        description=__doc__,
        epilog="Results are appended to the CSV as each run ends; a command run again skips the runs already in it. "
        "Reports read the same CSV. The committed results live in docs/results/<scale>/results.csv (decide: "
        "docs/results/cpu/): pass that path as --csv to extend or re-report them.",
    )
    parser.add_argument(
        "name",
        help=f"decide (the CPU protocol that decides the paper's claims), or a grid: {', '.join(names)}, all, "
        "report, list",
    )
    parser.add_argument(
        "--scale",
        choices=("small", "paper"),
        default="small",
        help="small (default): the grids cut down for a CPU (Fashion-MNIST, 8,000 training images, 2 epochs, "
        "conv widths 0.25, fewer k values); paper: the paper's CIFAR-10 grids at full width, 100 epochs (GPU work)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 5; decide: 3)")
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="results CSV, appended to (default runs/experiments/<scale>/results.csv under the current folder; "
        "--smoke: runs/experiments/smoke/, decide: runs/experiments/cpu/)",
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: the CSV's folder)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 epoch, 256 examples, one run per config kind")
    parser.add_argument("--plan-only", action="store_true", help="print the runs and the planned time, run nothing")
    parser.add_argument("--no-estimate", action="store_true", help="skip measuring step costs for the plan")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: share the CPU)")
    parser.add_argument("--nice", type=int, default=10, help="raise niceness by this much (default 10)")
    parser.add_argument(
        "--shard", default="0/1", help="I/N: make only every N-th run starting at I (N processes on one CSV)"
    )
    parser.add_argument("--report", action="store_true", help="decide: write the report instead of running")
    parser.add_argument(
        "--protocol",
        choices=("paper", "followups"),
        default="paper",
        help="decide: the paper's claims (default; docs/results/cpu/) or the follow-up methods' "
        "(docs/results/followups/; reads the paper protocol's edge-popup runs from --also)",
    )
    parser.add_argument(
        "--also",
        type=Path,
        nargs="*",
        default=None,
        help="decide: read-only CSVs whose rows count as done (default: the FC MNIST baselines' CSV; with "
        "--protocol followups also the paper protocol's docs/results/cpu/results.csv)",
    )
    args = parser.parse_args(argv)
    args.seeds_given = args.seeds is not None
    if args.seeds is None:
        args.seeds = 5
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        parser.error(f"--shard {args.shard!r} must be I/N with 0 <= I < N, e.g. 0/2 and 1/2")
    args.shard_pair = shard
    if args.name == "decide":
        return decide(args)

    if args.smoke:
        args.seeds = 1
    csv_path = args.csv or default_csv("smoke" if args.smoke else args.scale)
    if args.name == "list":
        for name in names:
            print(name + ("  (paper scale only)" if name in PAPER_ONLY else ""))
        return 0
    if args.name == "report":
        from .report import make_report

        command = "python -m supermask_fx.experiments " + shlex.join(sys.argv[1:] if argv is None else argv)
        path = make_report(
            csv_path, args.out or csv_path.parent, args.scale, args.seeds, command=command, smoke=args.smoke
        )
        print(f"wrote {path}")
        return 0
    if args.name == "imagenet_table2":
        if args.scale != "paper":
            print(
                "imagenet_table2 exists at --scale paper only (ImageNet needs GPUs); nothing to run at the small scale"
            )
            return 2
        print("# Table 2 (ImageNet, k = 30 %): run each on a multi-GPU machine (examples/imagenet.py)")
        print("\n".join(imagenet_commands(args.seeds)))
        return 0
    if args.name != "all" and args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; choose one of {', '.join(names)}, all, report, list")

    import torch

    from .runner import share_machine

    share_machine(args.threads, args.nice)
    chosen = list(ORDER) if args.name == "all" else [args.name]
    specs = plan(chosen, args.scale, args.seeds, smoke=args.smoke)
    from .results import done_keys
    from .runner import estimate_seconds, run_all

    done = done_keys(csv_path)
    estimates = {}
    if not args.no_estimate and not args.smoke:
        t0 = time.perf_counter()
        estimates = {s.key(): estimate_seconds(s) for s in specs}
        per_exp: dict[str, list[float]] = {}
        for s in specs:
            per_exp.setdefault(s.experiment, []).append(estimates[s.key()])
        for name, secs in per_exp.items():
            print(f"  {name}: {len(secs)} runs, planned {sum(secs) / 3600:.2f} h")
        todo = sum(v for k, v in estimates.items() if k not in done)
        print(
            f"planned total: {len(specs)} runs, {sum(estimates.values()) / 3600:.2f} h "
            f"({todo / 3600:.2f} h still to do; step costs measured in {time.perf_counter() - t0:.0f} s "
            f"with {torch.get_num_threads()} thread(s))"
        )
    else:
        print(f"{len(specs)} runs planned")
    if args.plan_only:
        return 0
    sys.stdout.flush()
    run_all(specs, csv_path, estimates=estimates, shard=shard)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
