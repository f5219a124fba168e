"""The deciding CPU protocol (supermask_fx/experiments/protocol.py): its plan, its report's verdicts on synthetic
results whose truth is known, and a few shrunken real runs end to end (rows, curves, resume)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from supermask_fx.experiments import protocol
from supermask_fx.experiments.decide_report import make_decide_report
from supermask_fx.experiments.results import append_row, curves_path, read_curves, read_rows
from supermask_fx.experiments.runner import run_all
from supermask_fx.models import build_model

scipy_stats = pytest.importorskip("scipy.stats")


def test_plan_gives_every_configuration_three_seeds_mnist_first():
    runs = protocol.plan()
    keys = [r.key() for r in runs]
    assert len(keys) == len(set(keys))
    configs = {c.key() for claim in protocol.claims() for c in claim.configs()}
    configs |= {spec.key() for _, spec, _ in protocol.anchors()}
    seeds: dict[tuple, set[int]] = {}
    for r in runs:
        seeds.setdefault(r.with_(seed=0).key(), set()).add(r.seed)
    assert set(seeds) == configs
    assert all(s == {0, 1, 2} for s in seeds.values())
    datasets = [r.dataset for r in runs]
    assert datasets == sorted(datasets, key=lambda d: d != "mnist")  # every MNIST run before any CIFAR-10 run
    assert {r.dataset for r in runs} == {"mnist", "cifar10"}


def test_fixed_kept_weights_match_width_one():
    def weights(width):  # counted from the module, not from the code that chose k
        return sum(p.numel() for p in build_model("fc", dataset="mnist", width=width).parameters())

    assert weights(1.0) == 784 * 300 + 300 * 100 + 100 * 10
    claim = next(c for c in protocol.claims() if c.number == 4)
    for comparison, ref in zip(claim.comparisons, (0.3, 0.5), strict=True):
        (_, wide), (_, base) = comparison.terms
        assert base.width == 1.0 and base.k == ref and wide.width == 2.0
        assert wide.k * weights(2.0) == pytest.approx(ref * weights(1.0))


def _claims_true(spec) -> float:
    """A world where the paper is right: mid k best, gaps shrink with depth and width, wider is better at fixed
    kept weights, edge-popup beats Zhou et al., signed constant ~ Kaiming normal >> the others, retraining equal."""
    acc = 90.0
    if spec.method == "dense":
        acc = 95.0
    elif spec.method == "sampled":
        acc = 85.0
    elif spec.variant.startswith("retrain"):
        acc = 94.0
    else:
        acc -= 5.0 if spec.k in (0.1, 0.9) else 0.0
        acc -= {"fc1": 4.0, "fc4": 1.0}.get(spec.model, 0.0)
        acc += {0.25: -4.0, 2.0: 2.0}.get(spec.width, 0.0) + (2.0 if spec.model == "conv4" else 0.0)
        if spec.init in ("xavier_normal", "kaiming_uniform"):
            acc -= 5.0
    return acc


def _write_world(path, world, rng, seeds=3, skip=()):
    for spec in protocol.plan(seeds):
        if spec.with_(seed=0).key() in skip:
            continue
        acc = world(spec) + rng.gauss(0.0, 0.1)
        append_row(path, spec, {"test_accuracy": f"{acc:.2f}", "wall_time_s": "1.0"})


def _verdicts(markdown: str) -> dict[int, str]:
    return {
        int(n): v for n, v in re.findall(r"^\| (\d) \| .*\| \*\*([a-z ]+)(?: \(.*\))?\*\* \|$", markdown, flags=re.M)
    }


def test_report_supports_claims_in_a_world_where_they_hold(tmp_path):
    path = tmp_path / "results.csv"
    _write_world(path, _claims_true, random.Random(0))
    md = make_decide_report(path, tmp_path).read_text()
    assert _verdicts(md) == {n: "supported" for n in range(1, 8)}
    assert "Missing runs" not in md
    # claim 5's first interval equals scipy's Welch interval on the same rows
    rows = read_rows(path)
    claim = next(c for c in protocol.claims() if c.number == 5)
    (_, ep), (_, zhou) = claim.comparisons[0].terms

    def accs(spec):
        keys = {spec.with_(seed=s).key() for s in range(3)}
        return [float(r["test_accuracy"]) for r in rows if tuple(r[k] for k in _key_fields()) in keys]

    ci = scipy_stats.ttest_ind(accs(ep), accs(zhou), equal_var=False).confidence_interval(0.95)
    assert f"[{ci.low:+.2f}, {ci.high:+.2f}]" in md


def _key_fields():
    from supermask_fx.experiments.specs import KEY_FIELDS

    return KEY_FIELDS


def test_report_contradicts_claims_in_a_world_where_they_fail(tmp_path):
    def claims_false(spec):
        acc = _claims_true(spec)
        if spec.method == "sampled":
            acc = 95.0  # Zhou et al. beat edge-popup
        if spec.init == "signed_constant" and spec.method == "edge_popup" and not spec.variant:
            acc -= 3.0  # signed constant clearly worse than Kaiming normal
        return acc

    path = tmp_path / "results.csv"
    _write_world(path, claims_false, random.Random(1))
    verdicts = _verdicts(make_decide_report(path, tmp_path).read_text())
    assert verdicts[5] == "contradicted" and verdicts[6] == "contradicted"


def test_report_lists_missing_runs_and_never_fills_them_in(tmp_path):
    path = tmp_path / "results.csv"
    zhou_fc = protocol.zhou(protocol.fc, epochs=protocol.ANCHOR_EPOCHS)
    _write_world(path, _claims_true, random.Random(2), skip={zhou_fc.key()})
    md = make_decide_report(path, tmp_path).read_text()
    assert _verdicts(md)[5] == "missing runs"
    assert "**missing runs (so far 1 supported of 2 comparisons)**" in md  # Conv2 CIFAR-10 is decided already
    assert "## Missing runs (3)" in md
    assert "fc Zhou et al. xavier signed constant k=0.5 50 ep (mnist): seeds [0, 1, 2]" in md


@pytest.mark.needs_data("mnist", "cifar10")
def test_shrunken_protocol_runs_write_rows_and_curves_and_resume(tmp_path, capsys):
    threads = torch.get_num_threads()
    runs = protocol.plan(1)
    first_mnist = next(r for r in runs if r.dataset == "mnist" and r.variant == "retrain_found")
    first_cifar = next(r for r in runs if r.dataset == "cifar10")
    small = [r.with_(epochs=2, train_limit=256, test_limit=128, width=r.width / 8) for r in (first_mnist, first_cifar)]
    path = tmp_path / "results.csv"
    try:
        assert run_all(small, path, log=lambda *_: None) == 2
        assert run_all(small, path, log=print) == 0
    finally:
        torch.set_num_threads(threads)
    assert "2 of 2 runs already in" in capsys.readouterr().out
    rows = read_rows(path)
    assert [r["dataset"] for r in rows] == ["mnist", "cifar10"]
    assert rows[0]["found_accuracy"] and all(0 <= float(r["test_accuracy"]) <= 100 for r in rows)
    curves = read_curves(curves_path(path))
    for spec, row in zip(small, rows, strict=True):
        curve = curves[spec.key()]
        assert len(curve) == 2 and curve[-1] == pytest.approx(float(row["test_accuracy"]), abs=0.01)


def test_runs_on_a_data_set_that_is_not_here_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    import supermask_fx.data as sdata
    from supermask_fx.experiments.__main__ import main

    monkeypatch.setattr(sdata, "is_available_offline", lambda name, root=None: name != "cifar10")
    monkeypatch.setattr(sdata, "download_possible", lambda name, timeout=3.0: False)
    csv_path = tmp_path / "results.csv"
    assert main(["decide", "--plan-only", "--csv", str(csv_path), "--also"]) == 0
    out = capsys.readouterr().out
    cifar_runs = sum(r.dataset == "cifar10" for r in protocol.plan())
    assert f"{cifar_runs} runs on cifar10 skipped: CIFAR-10 not found locally" in out
    assert "(cifar10)" not in out and f"0 of {len(protocol.plan()) - cifar_runs} runs done" in out
