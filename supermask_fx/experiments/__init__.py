"""Reproduce the experiments of Ramanujan et al. (CVPR 2020): the CPU protocol that decides the paper's claims
(``decide``, protocol.py), and the paper's grids at the paper's scale (GPU) or shrunk to minutes (``small``).

    python -m supermask_fx.experiments decide                 # resumable; then: decide --report
    python -m supermask_fx.experiments fig3_depth_k --scale small --seeds 5
    python -m supermask_fx.experiments all --scale small --seeds 5 --csv /tmp/small/results.csv
    python -m supermask_fx.experiments report --scale small --seeds 5 --csv /tmp/small/results.csv
    python -m supermask_fx.experiments imagenet_table2 --scale paper   # prints the accelerate commands

See docs/reproducing.md.
"""

from .configs import EXPERIMENTS, ORDER, PAPER_ONLY, Grid, expand, plan, smoke_subset
from .report import compare, make_report
from .results import COLUMNS, append_row, read_rows
from .runner import estimate_seconds, run_all, run_one
from .specs import SCALES, Recipe, RunSpec, Scale

__all__ = [
    "COLUMNS",
    "EXPERIMENTS",
    "ORDER",
    "PAPER_ONLY",
    "SCALES",
    "Grid",
    "Recipe",
    "RunSpec",
    "Scale",
    "append_row",
    "compare",
    "estimate_seconds",
    "expand",
    "make_report",
    "plan",
    "read_rows",
    "run_all",
    "run_one",
    "smoke_subset",
]
