"""The experiment suite: smoke runs end to end, resuming, and report verdicts that follow the numbers."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from supermask_fx.experiments import EXPERIMENTS, SCALES, append_row, compare, expand, make_report, read_rows
from supermask_fx.experiments.__main__ import main
from supermask_fx.experiments.configs import ORDER, plan, smoke_subset
from supermask_fx.experiments.report import combine
from supermask_fx.experiments.results import COLUMNS

SEEDS = 3


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _have_fashion_mnist() -> bool:
    try:
        from supermask_fx.data import load_dataset

        load_dataset("fashion_mnist", "test", download=False, limit=1)
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    not _have_fashion_mnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_smoke_runs_write_rows_and_rerun_skips(tmp_path, restore_threads, capsys):
    path = tmp_path / "results.csv"
    for name in ("table3_retrain", "fig6_zhou"):
        assert main([name, "--smoke", "--csv", str(path), "--nice", "0"]) == 0
    rows = read_rows(path)
    expected = plan(["table3_retrain", "fig6_zhou"], "cpu", 1, smoke=True)
    assert len(rows) == len(expected) == 4
    with open(path) as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    for row in rows:
        assert 0.0 <= float(row["test_accuracy"]) <= 100.0
        assert int(row["kept_weights"]) <= int(row["total_weights"])
        assert row["dataset"] == "fashion_mnist" and row["seed"] == "0" and row["epochs"] == "1"
        assert row["git_revision"] and float(row["wall_time_s"]) >= 0
    found = [r for r in rows if r["variant"] == "retrain_found"]
    assert found and found[0]["found_accuracy"]
    size = os.path.getsize(path)
    capsys.readouterr()
    assert main(["table3_retrain", "--smoke", "--csv", str(path), "--nice", "0"]) == 0
    assert "2 of 2 runs already in" in capsys.readouterr().out
    assert os.path.getsize(path) == size


def test_torn_last_line_is_ignored_and_rerun(tmp_path):
    spec = expand("fig7_distributions", "cpu", 1)[0]
    path = tmp_path / "r.csv"
    append_row(path, spec, {"test_accuracy": "50.00"})
    with open(path, "a") as f:
        f.write("fig7_distributions,fashion_mnist,conv4,0.25")  # a crash mid-write
    assert len(read_rows(path)) == 1


def test_configs_are_declarative_grids():
    cpu = plan(list(ORDER), "cpu", 5)
    keys = [s.key() for s in cpu]
    assert len(keys) == len(set(keys)), "shared runs must be planned once"
    first_pass = [s.seed for s in cpu[: len(cpu) * 2 // 5]]
    assert set(first_pass) == {0, 1}, "seeds 0 and 1 of everything first"
    assert [s.seed for s in cpu[len(cpu) * 2 // 5 :]] == sorted(s.seed for s in cpu if s.seed >= 2)
    assert cpu[0].seed == 0 and cpu[1].seed == 1 and cpu[0].key()[:-3] == cpu[1].key()[:-3]
    fig3 = expand("fig3_depth_k", "paper", 1)
    assert {s.k for s in fig3 if s.method == "edge_popup" and s.model == "conv8"} == {0.1, 0.3, 0.5, 0.7, 0.9}
    adam = [s for s in fig3 if s.optimizer == "adam"]
    assert {(s.model, s.recipe.lr, s.recipe.batch_size) for s in adam} >= {("conv2", 2e-4, 60), ("conv4", 3e-4, 60)}
    zhou = [s for s in expand("fig6_zhou", "paper", 1) if s.method == "sampled"]
    assert zhou and all(s.recipe.lr == 200 and s.recipe.weight_decay == 0 for s in zhou)
    # Fig. 5: kept weights fixed at the width-1 count while the width grows.
    from supermask_fx.experiments.configs import gated_weight_count

    fig5 = expand("fig5_fixed_params", "cpu", 1)
    base = SCALES["cpu"].conv_width
    for s in fig5:
        kept = s.k * gated_weight_count(s.model, s.width, 1, 28)
        assert any(abs(kept / (ref * gated_weight_count(s.model, base, 1, 28)) - 1) < 1e-9 for ref in (0.3, 0.5, 0.7))
    assert len(smoke_subset(fig3)) < len(fig3)


def test_imagenet_table2_emits_commands_at_paper_scale_only(capsys):
    assert main(["imagenet_table2", "--scale", "paper", "--seeds", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate launch")]
    assert len(lines) == 6 and all("--k 0.3" in line and "examples/imagenet.py" in line for line in lines)
    assert {m for m in ("resnet50 ", "resnet101 ", "wide_resnet50_2 ") if any(m in line for line in lines)} == {
        "resnet50 ",
        "resnet101 ",
        "wide_resnet50_2 ",
    }
    assert main(["imagenet_table2", "--scale", "cpu"]) == 2


def test_compare_rules():
    assert compare([80, 81, 82], [70, 71, 72]) == "supported"
    assert compare([70, 71, 72], [80, 81, 82]) == "not supported"
    assert compare([80, 82, 84], [81, 83, 85]).startswith("inconclusive (3 seeds")
    assert compare([80], [70]) == "inconclusive (1 seed)"
    assert compare([80, 81], [], ">") == "missing runs"
    assert compare([80, 81], [80.5, 81.5], "~") == "supported"
    assert compare([70, 70.2], [80, 80.2], "~") == "not supported"
    assert compare([80, 81], [80.5, 80.6], ">=") == "inconclusive (2 seeds, overlap)"
    assert compare([81, 82], [80.5, 80.6], ">=") == "supported"
    assert combine(["supported", "missing runs"]).startswith("missing runs (so far supported")
    assert combine(["supported", "not supported"]) == "not supported"


# ----------------------------------------------------------------------------------- synthetic CSVs -> verdicts

DEPTH_BONUS = {"fc": 0.0, "conv2": 2.0, "conv4": 6.0, "conv6": 9.0, "conv8": 12.0}


def paper_world(spec) -> float:
    """Numbers that agree with every claim of the paper."""
    noise = 0.1 * spec.seed
    if spec.method == "dense":
        return 95.0 + noise
    width_bonus = 100.0 * spec.width  # wider is better, also at a fixed kept count; dense is width-independent
    acc = 60.0 + DEPTH_BONUS.get(spec.model, 0.0) + width_bonus - 40.0 * (spec.k - 0.5) ** 2 + noise
    acc += {"signed_constant": 1.0, "kaiming_normal": 0.0}.get(spec.init, -10.0)
    if spec.method == "sampled":
        acc -= 15.0
    if spec.variant:  # retrained subnetworks, found or random: the same
        acc = 83.0 + noise
    return acc


def dense_world(spec) -> float:
    """Dense far ahead, edge-popup best at k = 90 %, gap to dense growing with depth, Zhou better."""
    noise = 0.1 * spec.seed
    if spec.method == "dense":
        return 95.0 + noise
    acc = 70.0 - DEPTH_BONUS.get(spec.model, 0.0) + 10.0 * spec.k + noise
    if spec.method == "sampled":
        acc += 10.0
    if spec.variant == "retrain_random":
        acc -= 20.0
    return acc


def _write(path, world, names=None, seeds=SEEDS):
    for name in names or EXPERIMENTS:
        for spec in expand(name, "cpu", seeds):
            append_row(
                path,
                spec,
                {
                    "test_accuracy": f"{world(spec):.2f}",
                    "kept_weights": 1,
                    "total_weights": 2,
                    "found_accuracy": "70.0" if spec.variant == "retrain_found" else None,
                    "wall_time_s": "1.0",
                    "git_revision": "test",
                    "engine": "synthetic",
                },
            )


def _verdicts(md: str) -> dict[str, str]:
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and "**" in line:
            title, verdict = line.strip("| ").split(" | ")
            out[title.split(" (")[0]] = verdict.strip("* |")
    return out


def test_report_paper_world_supports_every_claim(tmp_path):
    path = tmp_path / "r.csv"
    _write(path, paper_world)
    md = make_report(path, tmp_path / "out", "cpu", SEEDS).read_text()
    verdicts = _verdicts(md)
    assert len(verdicts) == 7
    assert all(v == "supported" for v in verdicts.values()), verdicts
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"fig3_depth_k.png", "fig6_zhou.png", "fig7_distributions.png", "table3_retrain.png"} <= pngs
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in pngs)
    assert "missing" not in md.split("## Experiments")[1].replace("missing runs", "")


def test_report_dense_world_gives_not_supported(tmp_path):
    path = tmp_path / "r.csv"
    _write(path, dense_world)
    verdicts = _verdicts(make_report(path, tmp_path / "out", "cpu", SEEDS).read_text())
    assert verdicts["Accuracy is best for k in 30–70 %"] == "not supported"
    assert verdicts["Deeper nets close the gap to learned dense weights"] == "not supported"
    assert verdicts["Edge-popup beats Zhou et al.'s sampled supermask"] == "not supported"
    assert verdicts["Retraining a found subnetwork ≈ retraining a random one of the same size"] == "not supported"


def test_report_shows_missing_runs(tmp_path):
    path = tmp_path / "r.csv"
    _write(path, paper_world, names=["fig3_depth_k"], seeds=2)  # 2 of 3 seeds, one experiment only
    md = make_report(path, tmp_path / "out", "cpu", SEEDS).read_text()
    verdicts = _verdicts(md)
    assert verdicts["Edge-popup beats Zhou et al.'s sampled supermask"] == "missing runs"
    assert verdicts["Retraining a found subnetwork ≈ retraining a random one of the same size"] == "missing runs"
    assert "1 missing" in md  # the fig3 groups: n=2 done, 1 seed missing
    assert "| conv4 | 0.25 | sampled | xavier_normal | False | 0.5 | sgd |  | missing |" in md
    assert "fig4_width: 12 of 54 runs done" in md  # width-1 points are fig3 runs (2 seeds x 6 configs)
