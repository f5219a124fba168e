"""The experiment suite: smoke runs end to end, resuming, and report verdicts that follow the numbers."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

import supermask_fx.data as sdata
from supermask_fx.experiments import EXPERIMENTS, SCALES, Grid, append_row, compare, expand, make_report, read_rows
from supermask_fx.experiments.__main__ import main
from supermask_fx.experiments.configs import ORDER, gated_weight_count, plan, smoke_subset
from supermask_fx.experiments.report import combine
from supermask_fx.experiments.results import COLUMNS

SEEDS = 3
PAPER_KS = {0.1, 0.3, 0.5, 0.7, 0.9}


def _data_here(monkeypatch, cifar: bool, download: bool = False, exact: bool | None = False):
    """Pretend CIFAR-10 is (or is not) local, downloadable, and its local copy (not) bit-exact; the other data
    sets count as local."""
    monkeypatch.setattr(sdata, "is_available_offline", lambda name, root=None: cifar or name != "cifar10")
    monkeypatch.setattr(sdata, "download_possible", lambda name, timeout=3.0: download)
    real = sdata.local_copy_is_exact
    monkeypatch.setattr(
        sdata, "local_copy_is_exact", lambda name, root=None: exact if name == "cifar10" else real(name)
    )


@pytest.fixture
def cifar_local(monkeypatch):
    _data_here(monkeypatch, cifar=True)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.needs_data("fashion_mnist")
def test_smoke_runs_write_rows_and_rerun_skips(tmp_path, restore_threads, capsys):
    path = tmp_path / "results.csv"
    for name in ("table3_retrain", "fig6_zhou"):
        assert main([name, "--smoke", "--csv", str(path), "--nice", "0"]) == 0
    rows = read_rows(path)
    expected = plan(["table3_retrain", "fig6_zhou"], "small", 1, smoke=True)
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
    spec = expand("fig7_distributions", "small", 1)[0]
    path = tmp_path / "r.csv"
    append_row(path, spec, {"test_accuracy": "50.00"})
    with open(path, "a") as f:
        f.write("fig7_distributions,fashion_mnist,conv4,0.25")  # a crash mid-write
    assert len(read_rows(path)) == 1


def test_configs_are_declarative_grids(cifar_local):
    cpu = plan(list(ORDER), "small", 5)
    keys = [s.key() for s in cpu]
    assert len(keys) == len(set(keys)), "shared runs must be planned once"
    fashion = [s for s in cpu if s.dataset == "fashion_mnist"]
    assert cpu[: len(fashion)] == fashion, "the scale's own data set first, then CIFAR-10"
    for part in (fashion, cpu[len(fashion) :]):
        first_pass = [s.seed for s in part[: len(part) * 2 // 5]]
        assert set(first_pass) == {0, 1}, "seeds 0 and 1 of everything first"
        assert [s.seed for s in part[len(part) * 2 // 5 :]] == sorted(s.seed for s in part if s.seed >= 2)
    assert cpu[0].seed == 0 and cpu[1].seed == 1 and cpu[0].key()[:-3] == cpu[1].key()[:-3]
    fig3 = expand("fig3_depth_k", "paper", 1)
    assert {s.k for s in fig3 if s.method == "edge_popup" and s.model == "conv8"} == {0.1, 0.3, 0.5, 0.7, 0.9}
    adam = [s for s in fig3 if s.optimizer == "adam"]
    assert {(s.model, s.recipe.lr, s.recipe.batch_size) for s in adam} >= {("conv2", 2e-4, 60), ("conv4", 3e-4, 60)}
    zhou = [s for s in expand("fig6_zhou", "paper", 1) if s.method == "sampled"]
    assert zhou and all(s.recipe.lr == 200 and s.recipe.weight_decay == 0 for s in zhou)
    # the edge-popup authors' baseline: sampled masks in evaluation too, no rescaling (their SampleSubnetConv)
    assert {s.variant for s in zhou} == {"sample_eval"}
    from supermask_fx.experiments.runner import build
    from supermask_fx.methods.sampled import options

    small = zhou[0].with_(model="fc", dataset="mnist", width=1.0)
    assert options(build(small)) == {"eval_rule": "sample", "rescale": False}
    # Fig. 5: kept weights fixed at the width-1 count while the width grows.
    from supermask_fx.experiments.configs import gated_weight_count

    fig5 = expand("fig5_fixed_params", "small", 1)
    base = SCALES["small"].conv_width
    for s in fig5:
        kept = s.k * gated_weight_count(s.model, s.width, "fashion_mnist")
        assert any(
            abs(kept / (ref * gated_weight_count(s.model, base, "fashion_mnist")) - 1) < 1e-9 for ref in (0.3, 0.5, 0.7)
        )
    assert len(smoke_subset(fig3)) < len(fig3)


def test_cifar10_k_planned_at_cpu_scale_on_cifar_shapes(cifar_local):
    from supermask_fx.experiments.runner import build

    cpu = SCALES["small"]
    runs = plan(["cifar10_k"], "small", 5)
    assert len(runs) == 30 and {s.dataset for s in runs} == {"cifar10"}
    assert {(s.model, s.width, s.epochs, s.train_limit, s.test_limit) for s in runs} == {
        ("conv4", cpu.conv_width, cpu.epochs, cpu.train_limit, cpu.test_limit)
    }
    ep = [s for s in runs if s.method == "edge_popup"]
    assert {s.k for s in ep} == set(cpu.ks) == PAPER_KS and {s.init for s in ep} == {"signed_constant"}
    assert {(s.recipe.lr, s.recipe.weight_decay) for s in ep} == {(0.1, 1e-4)}
    dense = [s for s in runs if s.method == "dense"]
    assert len(dense) == 5 and {(s.k, s.optimizer, s.recipe.lr) for s in dense} == {(1.0, "sgd", 0.01)}
    # the current Fashion-MNIST plan is unchanged and comes first, so the shards of a running suite stay the same
    before = plan([n for n in ORDER if n != "cifar10_k"], "small", 5)
    assert plan(list(ORDER), "small", 5) == before + runs
    # built for 32x32x3 inputs
    model = build(runs[0])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    gated = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert (
        gated
        == gated_weight_count("conv4", cpu.conv_width, "cifar10")
        != gated_weight_count("conv4", cpu.conv_width, "fashion_mnist")
    )


def test_grid_dataset_sets_shapes_of_kept_refs(monkeypatch, cifar_local):
    """Fig. 5-style grids count weights on the grid's own data set (3x32x32), not the scale's (1x28x28)."""
    monkeypatch.setitem(
        EXPERIMENTS, "tmp_fig5_cifar", [Grid(("conv4",), widths=(1.0, 1.5), kept_refs=(0.5,), dataset="cifar10")]
    )
    runs = expand("tmp_fig5_cifar", "small", 1)
    base = SCALES["small"].conv_width
    wide = next(s for s in runs if s.width > base)
    want = 0.5 * gated_weight_count("conv4", base, "cifar10") / gated_weight_count("conv4", 1.5 * base, "cifar10")
    wrong = (
        0.5
        * gated_weight_count("conv4", base, "fashion_mnist")
        / gated_weight_count("conv4", 1.5 * base, "fashion_mnist")
    )
    assert wide.dataset == "cifar10" and abs(wide.k - want) < 1e-12 and abs(want - wrong) > 1e-5


def test_cifar10_k_skipped_with_reason_when_cifar_is_missing(monkeypatch, capsys):
    _data_here(monkeypatch, cifar=False)
    assert plan(["cifar10_k"], "small", 5) == []
    out = capsys.readouterr().out
    assert "cifar10_k: 30 runs skipped: CIFAR-10 not found locally" in out and "not downloadable" in out
    assert plan(list(ORDER), "small", 2) == plan([n for n in ORDER if n != "cifar10_k"], "small", 2)
    capsys.readouterr()
    assert main(["cifar10_k", "--scale", "small", "--seeds", "5", "--plan-only", "--no-estimate", "--nice", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cifar10_k: 30 runs skipped: CIFAR-10 not found locally") and out[1] == "0 runs planned"
    # not local, but downloadable: planned (the runner downloads it)
    _data_here(monkeypatch, cifar=False, download=True)
    assert len(plan(["cifar10_k"], "small", 5)) == 30


def test_cifar10_k_is_a_subset_of_fig3_at_paper_scale(cifar_local):
    cifar = expand("cifar10_k", "paper", 2)
    fig3 = expand("fig3_depth_k", "paper", 2)
    assert len(cifar) == 12 and {s.dataset for s in cifar} == {"cifar10"}
    assert {s.key() for s in cifar} <= {s.key() for s in fig3}
    both = plan(["fig3_depth_k", "cifar10_k"], "paper", 2)
    assert both == plan(["fig3_depth_k"], "paper", 2)
    assert len(plan(list(ORDER), "paper", 2)) == len({s.key() for n in ORDER for s in expand(n, "paper", 2)})


def test_availability_and_exactness_of_a_local_copy(tmp_path, monkeypatch, local_dataset):
    from PIL import Image

    monkeypatch.setenv(sdata.ENV_VAR, str(tmp_path))
    classes = sdata.dataset_info("cifar10").classes
    for ext, exact in ((".png", True), (".jpg", False)):
        root = tmp_path / ext[1:]
        for split in ("train", "test"):
            for cls in classes:
                (root / split / cls).mkdir(parents=True)
                Image.new("RGB", (32, 32)).save(root / split / cls / f"0000{ext}")
        assert sdata.is_available_offline("cifar10", root=root)
        assert sdata.local_copy_is_exact("cifar10", root=root) is exact
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sdata.is_available_offline("fashion_mnist", root=empty) == local_dataset("fashion_mnist")


def test_imagenet_table2_emits_commands_at_paper_scale_only(capsys):
    assert main(["imagenet_table2", "--scale", "paper", "--seeds", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("accelerate launch")]
    assert len(lines) == 6 and all("--k 0.3" in line and "examples/imagenet.py" in line for line in lines)
    assert {m for m in ("resnet50 ", "resnet101 ", "wide_resnet50_2 ") if any(m in line for line in lines)} == {
        "resnet50 ",
        "resnet101 ",
        "wide_resnet50_2 ",
    }
    assert main(["imagenet_table2", "--scale", "small"]) == 2


def test_compare_rules():
    # Welch intervals: [80, 81, 82] - [70, 71, 72] is 10 +- 2.78 * 0.816 (df 4): far above 0
    assert compare([80, 81, 82], [70, 71, 72]) == "supported"
    assert compare([70, 71, 72], [80, 81, 82]) == "contradicted"
    assert compare([80, 82, 84], [81, 83, 85]) == "inconclusive"
    assert compare([80], [70]) == "inconclusive (n < 2)"
    assert compare([80, 81], [], ">") == "missing runs"
    # equivalence within 1 point: [80, 81] - [80.4, 81.4] = -0.4 with a 95 % interval of +-4.30 * 0.707 (df 2)
    assert compare([80, 81], [80.4, 81.4], "~") == "inconclusive"
    assert compare([80, 80.1, 80.2], [80.1, 80.2, 80.3], "~") == "supported"
    assert compare([70, 70.2], [80, 80.2], "~") == "contradicted"
    # non-inferiority within 0.5 point
    assert compare([80, 81], [80.5, 80.6], ">=") == "inconclusive"
    assert compare([81.0, 81.1, 81.2], [80.5, 80.6, 80.7], ">=") == "supported"
    assert combine(["supported", "missing runs"]).startswith("missing runs (so far supported")
    assert combine(["supported", "contradicted"]) == "contradicted"


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
    if spec.variant.startswith("retrain"):  # retrained subnetworks, found or random: the same
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
        for spec in expand(name, "small", seeds):
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


def test_report_paper_world_supports_every_claim(tmp_path, cifar_local):
    path = tmp_path / "r.csv"
    _write(path, paper_world)
    md = make_report(path, tmp_path / "out", "small", SEEDS).read_text()
    verdicts = _verdicts(md)
    assert len(verdicts) == 8
    assert all(v == "supported" for v in verdicts.values()), verdicts
    assert "On CIFAR-10 (JPEG copy), accuracy is best for k in 30–70 %" in md
    assert "cifar10_k: 18 of 18 runs done" in md and "Data set: CIFAR-10 (JPEG copy)." in md
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"fig3_depth_k.png", "fig6_zhou.png", "fig7_distributions.png", "table3_retrain.png"} <= pngs
    assert {"cifar10_k.png", "resnet18.png"} <= pngs
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in pngs)
    assert "missing" not in md.split("## Experiments")[1].replace("missing runs", "")


def test_report_dense_world_gives_contradicted(tmp_path, cifar_local):
    path = tmp_path / "r.csv"
    _write(path, dense_world)
    verdicts = _verdicts(make_report(path, tmp_path / "out", "small", SEEDS).read_text())
    assert verdicts["Accuracy is best for k in 30–70 %"] == "contradicted"
    assert verdicts["On CIFAR-10"] == "contradicted"
    assert verdicts["Deeper nets close the gap to learned dense weights"] == "contradicted"
    assert verdicts["Edge-popup beats Zhou et al.'s sampled supermask"] == "contradicted"
    assert verdicts["Retraining a found subnetwork ≈ retraining a random one of the same size"] == "contradicted"


def test_report_shows_missing_runs(tmp_path, cifar_local):
    path = tmp_path / "r.csv"
    _write(path, paper_world, names=["fig3_depth_k"], seeds=2)  # 2 of 3 seeds, one experiment only
    md = make_report(path, tmp_path / "out", "small", SEEDS).read_text()
    verdicts = _verdicts(md)
    assert verdicts["Edge-popup beats Zhou et al.'s sampled supermask"] == "missing runs"
    assert verdicts["Retraining a found subnetwork ≈ retraining a random one of the same size"] == "missing runs"
    assert "1 missing" in md  # the fig3 groups: n=2 done, 1 seed missing
    assert "| conv4 | 0.25 | sampled | xavier_normal | False | 0.5 | sgd | sample_eval | missing |" in md
    assert "fig4_width: 12 of 54 runs done" in md  # width-1 points are fig3 runs (2 seeds x 6 configs)


def test_report_shows_skipped_cifar_runs_as_missing_with_reason(tmp_path, monkeypatch):
    _data_here(monkeypatch, cifar=False)
    path = tmp_path / "r.csv"
    _write(path, paper_world, names=["fig3_depth_k"])
    md = make_report(path, tmp_path / "out", "small", SEEDS).read_text()
    assert _verdicts(md)["On CIFAR-10"] == "missing runs"
    section = md.split("### cifar10_k: 0 of 18 runs done")[1].split("###")[0]
    assert "Missing runs skipped by the planner here: CIFAR-10 not found locally" in section
    assert "| conv4 | 0.25 | edge_popup | signed_constant | False | 0.1 | sgd |  | missing |" in section
    assert "| conv4 | 0.25 | dense | kaiming_normal | False | 1 | sgd |  | missing |" in section
    claim = md.split("### On CIFAR-10 (JPEG copy), accuracy")[1].split("###")[0]
    assert "runs missing because they are skipped here: CIFAR-10 not found locally" in claim


def _tiny_cifar_folder(root, per_class=26):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in sdata.dataset_info("cifar10").classes:
            (root / "cifar10" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / "cifar10" / split / cls / f"{i:04d}.png")


def test_cifar10_k_smoke_runs_end_to_end(tmp_path, monkeypatch, restore_threads):
    """The smoke subset of cifar10_k through the real loader (a tiny CIFAR-10 image folder found through
    $SUPERMASK_FX_DATA), model, training and CSV."""
    from supermask_fx.experiments import runner

    _tiny_cifar_folder(tmp_path / "data")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    monkeypatch.setenv(sdata.ENV_VAR, str(tmp_path / "data"))
    monkeypatch.setenv("SUPERMASK_FX_CACHE", str(tmp_path / "cache"))  # the decoded images go here
    monkeypatch.setattr(runner, "_DATA", {})
    path = tmp_path / "results.csv"
    assert main(["cifar10_k", "--smoke", "--csv", str(path), "--nice", "0"]) == 0
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before  # nothing beside
    assert any((tmp_path / "cache" / "imagefolder").iterdir())
    rows = read_rows(path)
    assert sorted(r["method"] for r in rows) == ["dense", "edge_popup"]
    width = SCALES["small"].conv_width / 4
    for row in rows:
        assert row["dataset"] == "cifar10" and row["model"] == "conv4" and float(row["width"]) == width
        assert row["epochs"] == "1" and row["train_limit"] == "256" and 0.0 <= float(row["test_accuracy"]) <= 100.0
        assert int(row["total_weights"]) == gated_weight_count("conv4", width, "cifar10")
    ep = next(r for r in rows if r["method"] == "edge_popup")
    assert int(ep["kept_weights"]) < int(ep["total_weights"])
    assert runner._DATA[("cifar10", "train", 256)].images.shape == (256, 3, 32, 32)


def test_results_go_under_runs_not_over_the_committed_ones(tmp_path, monkeypatch, restore_threads, capsys):
    """Without --csv a run appends to runs/experiments/<scale>/results.csv of the current folder (docs/results/ holds
    the committed results); --help gives --scale's choices and default."""
    from supermask_fx.experiments import runner

    with pytest.raises(SystemExit):
        main(["--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "--scale {small,paper} small (default):" in helped and "runs/experiments/<scale>/results.csv" in helped
    assert "default docs/results" not in helped
    used = []
    monkeypatch.setattr(runner, "run_all", lambda specs, csv_path, **kwargs: used.append(csv_path))
    monkeypatch.chdir(tmp_path)
    assert main(["fig7_distributions", "--smoke", "--nice", "0"]) == 0
    assert main(["fig7_distributions", "--no-estimate", "--nice", "0"]) == 0
    assert main(["decide", "--nice", "0"]) == 0
    assert used == [Path("runs/experiments") / name / "results.csv" for name in ("smoke", "small", "cpu")]
