"""The baselines at their published figures: FC 784-300-100-10 on MNIST (docs/reproducing.md, "Baselines at their
published figures").

``python -m supermask_fx.experiments.baselines [--epochs 50] [--seeds 2] [--runs 1 5] [--csv ...] [--plan-only]``

Runs, in this order (all of seed 0 first, then seed 1, ...), each a row of the CSV through the usual runner (a
rerun skips the rows already there, so the command resumes where it stopped):

1. Zhou et al.'s supermask (``method="sampled"``, variant ``"zhou"``: sampled evaluation, dynamic weight
   rescaling, scores 0) on the project's Kaiming signed constant weights (Zhou et al. use a Glorot signed constant:
   the deciding protocol's Zhou runs do, see ``protocol.zhou``), the edge-popup authors' recipe for it (SGD lr 200,
   momentum 0.9, no weight decay, cosine, batch 128);
2. edge-popup, k = 50 %, signed constant, SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine, batch 128;
3. learned dense weights, Kaiming normal, SGD lr 0.01, momentum 0.9, weight decay 1e-4, cosine, batch 128;
4. learned dense weights, Kaiming normal, Adam lr 1.2e-3, batch 60, constant (the authors' ``fc_adam_baseline.yml``);
5. Zhou et al.'s supermask as in 1, with Zhou et al.'s own recipe (their README: SGD lr 100, momentum 0.9,
   constant learning rate, batch 250 (their default), no weight decay);
6. the project's earlier ``sampled`` (threshold evaluation, no rescaling) with recipe 1, for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .specs import DENSE_SGD, EDGE_POPUP, ZHOU, Recipe, RunSpec

EXPERIMENT = "baselines_fc_mnist"
DEFAULT_CSV = Path("docs/results/baselines/results.csv")
#: The authors' FC Adam config on MNIST (allenai/hidden-networks configs/smallscale_baselines/dense/fc).
FC_ADAM = Recipe(optimizer="adam", lr=1.2e-3, momentum=0.0, weight_decay=0.0, batch_size=60, schedule="constant")
#: Zhou et al.'s own supermask command (uber-research/deconstructing-lottery-tickets README, train_supermask.py).
ZHOU_OWN = Recipe(lr=100.0, momentum=0.9, weight_decay=0.0, batch_size=250, schedule="constant")

#: (method, init, k, variant, recipe) in run order.
RUNS: tuple[tuple[str, str, float, str, Recipe], ...] = (
    ("sampled", "signed_constant", 0.5, "zhou", ZHOU),
    ("edge_popup", "signed_constant", 0.5, "", EDGE_POPUP),
    ("dense", "kaiming_normal", 1.0, "", DENSE_SGD),
    ("dense", "kaiming_normal", 1.0, "", FC_ADAM),
    ("sampled", "signed_constant", 0.5, "zhou", ZHOU_OWN),
    ("sampled", "signed_constant", 0.5, "", ZHOU),
)


def plan(epochs: int, seeds: int, runs: tuple[int, ...] | None = None) -> list[RunSpec]:
    """The specs of ``RUNS`` (only the entries numbered ``runs``, from 1, if given) for each seed."""
    chosen = [RUNS[i - 1] for i in runs] if runs else RUNS
    return [
        RunSpec(
            experiment=EXPERIMENT,
            model="fc",
            width=1.0,
            method=method,
            init=init,
            k=k,
            seed=seed,
            epochs=epochs,
            dataset="mnist",
            recipe=recipe,
            variant=variant,
        )
        for seed in range(seeds)
        for method, init, k, variant, recipe in chosen
    ]


#: Published FC MNIST figures, per run of ``RUNS`` (Zhou et al.: learned supermask; edge-popup and dense: the
#: figures quoted in the reproduction issue for the same setting).
PUBLISHED = ("98.0 (Zhou et al.)", "97.9", "98.2", "98.2", "98.0 (Zhou et al.)", "98.0 (Zhou et al.)")
LABELS = (
    "Zhou et al. supermask (`zhou`), Kaiming signed constant, SGD lr 200, cosine, batch 128",
    "edge-popup, k = 50 %, SGD lr 0.1, cosine, batch 128",
    "dense, SGD lr 0.01, cosine, batch 128",
    "dense, Adam lr 1.2e-3, constant, batch 60",
    "Zhou et al. supermask (`zhou`), Kaiming signed constant, SGD lr 100, constant, batch 250",
    "`sampled` as before (threshold evaluation), SGD lr 200, cosine, batch 128",
)


def table(specs: list[RunSpec], csv_path: Path) -> str:
    """Markdown: one line per entry of ``RUNS``, the accuracy of each seed in the CSV (``-`` if not run yet)."""
    from .results import read_rows, row_key

    acc = {row_key(row): row["test_accuracy"] for row in read_rows(csv_path)}
    seeds = sorted({s.seed for s in specs})
    lines = [
        "| run | " + " | ".join(f"seed {i}" for i in seeds) + " | mean | published |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for i, label in enumerate(LABELS):
        values = [acc.get(s.key()) for s in specs[i :: len(RUNS)]]
        done = [float(v) for v in values if v]
        mean = f"{sum(done) / len(done):.2f}" if done else "-"
        cells = " | ".join(v or "-" for v in values)
        lines.append(f"| {label} | {cells} | {mean} | {PUBLISHED[i]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supermask_fx.experiments.baselines", description=__doc__)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--runs",
        type=int,
        nargs="+",
        choices=range(1, len(RUNS) + 1),
        metavar="N",
        help="only these entries of the list above (numbered from 1); the table needs all of them",
    )
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: share the CPU)")
    parser.add_argument("--nice", type=int, default=10, help="raise niceness by this much (default 10)")
    parser.add_argument("--plan-only", action="store_true", help="print the runs, run nothing")
    parser.add_argument("--table", action="store_true", help="print the CSV's accuracies as a markdown table")
    args = parser.parse_args(argv)
    specs = plan(args.epochs, args.seeds, args.runs)
    if args.table:
        if args.runs:
            parser.error("--table prints every entry: leave out --runs")
        print(table(specs, args.csv))
        return 0
    if args.plan_only:
        for s in specs:
            r = s.recipe
            print(
                f"{s.method} {s.variant or '-'} {s.init} k={s.k:g} {r.optimizer} lr={r.lr:g} bs={r.batch_size} "
                f"{r.schedule} epochs={s.epochs} seed={s.seed}"
            )
        return 0
    from .runner import share_machine

    share_machine(args.threads, args.nice)
    from .runner import run_all

    run_all(specs, args.csv)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
