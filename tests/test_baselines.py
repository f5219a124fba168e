"""The baselines command (FC MNIST at the published figures): its plan, a subset of runs, and its table."""

import pytest

from supermask_fx.experiments import baselines
from supermask_fx.experiments.results import append_row


def test_plan_runs_every_entry_per_seed_in_order():
    specs = baselines.plan(epochs=50, seeds=2)
    assert len(specs) == 2 * len(baselines.RUNS)
    assert [s.seed for s in specs] == [0] * len(baselines.RUNS) + [1] * len(baselines.RUNS)
    for spec, (method, init, k, variant, recipe) in zip(specs, baselines.RUNS * 2, strict=True):
        assert (spec.method, spec.init, spec.k, spec.variant, spec.recipe) == (method, init, k, variant, recipe)
        assert (spec.model, spec.dataset, spec.epochs) == ("fc", "mnist", 50)


def test_runs_selects_entries_numbered_from_one():
    (spec,) = baselines.plan(epochs=200, seeds=1, runs=(5,))
    assert spec.recipe == baselines.ZHOU_OWN and spec.variant == "zhou" and spec.epochs == 200
    assert [s.recipe for s in baselines.plan(1, 1, runs=(2, 3))] == [baselines.RUNS[1][4], baselines.RUNS[2][4]]


def test_table_shows_each_seed_the_mean_and_a_dash_for_runs_not_made(tmp_path):
    csv = tmp_path / "results.csv"
    specs = baselines.plan(epochs=50, seeds=2)
    append_row(csv, specs[1], {"test_accuracy": "97.50"})  # edge-popup, seed 0
    append_row(csv, specs[1 + len(baselines.RUNS)], {"test_accuracy": "98.00"})  # edge-popup, seed 1
    append_row(csv, baselines.plan(epochs=20, seeds=1)[0], {"test_accuracy": "11.00"})  # another length: not shown
    lines = baselines.table(specs, csv).splitlines()
    assert lines[0] == "| run | seed 0 | seed 1 | mean | published |"
    assert lines[2 + 1] == f"| {baselines.LABELS[1]} | 97.50 | 98.00 | 97.75 | 97.9 |"
    assert lines[2 + 0] == f"| {baselines.LABELS[0]} | - | - | - | 98.0 (Zhou et al.) |"


def test_table_with_a_subset_of_runs_is_refused(capsys):
    with pytest.raises(SystemExit):
        baselines.main(["--table", "--runs", "5"])
    assert "--table prints every entry" in capsys.readouterr().err
