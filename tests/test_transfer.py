"""The transfer / several-masks experiments (supermask_fx/experiments/transfer.py): the plan, the verdicts on
synthetic rows whose truth is known, and one shrunken real run of every arm (rows, storage, resume, bit-exact
SupSup)."""

from __future__ import annotations

import random

import pytest
import torch

from supermask_fx.experiments import transfer
from supermask_fx.experiments.results import row_key

pytest.importorskip("scipy.stats")


def test_the_plan_gives_every_arm_three_seeds_and_a_base_before_its_arms():
    runs = transfer.plan()
    keys = [r.key() for r in runs]
    assert len(keys) == len(set(keys))
    configs: dict[tuple, set[int]] = {}
    for r in runs:
        configs.setdefault(r.with_(seed=0).key(), set()).add(r.seed)
    assert all(s == {0, 1, 2} for s in configs.values())
    per_pair = {"fc": 0, "conv4": 0}
    for r in runs:
        if not r.variant.startswith("supsup"):
            per_pair[r.model] += 1
    assert per_pair == {"fc": 18, "conv4": 18}  # base + mask 0.5 / 0.9 + finetune + probe + random, 3 seeds
    for i, r in enumerate(runs):  # the base of a seed comes before that seed's arms
        if r.variant not in ("base", "") and not r.variant.startswith("supsup"):
            base = transfer.run_spec(next(p for p in transfer.PAIRS if p.model == r.model), "base", seed=r.seed)
            assert base.key() in keys[:i]
    compared = {s.key() for c in transfer.comparisons() for s in c.configs()}
    assert compared <= set(configs)
    assert len(transfer.comparisons()) == 10  # per pair: 2 x (vs finetune, vs probe) + pretrained vs random
    rules = {(c.relation, c.margin) for c in transfer.comparisons()}
    assert rules == {(">=", transfer.MARGIN), (">", 0.0)}


def _rows(means: dict, sd: float = 0.1):
    rnd = random.Random(0)
    rows = []
    for spec, mean in means.items():
        for s in range(3):
            row = dict(spec.with_(seed=s).row_fields())
            row["test_accuracy"] = f"{mean + rnd.gauss(0, sd):.2f}"
            rows.append(row)
    return rows


def test_verdicts_on_synthetic_rows():
    fc, conv = transfer.PAIRS
    means = {}
    for pair, mask, finetune, probe, rand in ((fc, 88.0, 90.0, 80.0, 85.0), (conv, 60.0, 70.0, 65.0, 62.0)):
        for k in transfer.KS:
            means[transfer.run_spec(pair, "mask", k)] = mask
        means[transfer.run_spec(pair, "finetune")] = finetune
        means[transfer.run_spec(pair, "probe")] = probe
        means[transfer.run_spec(pair, "random_weights")] = rand
    verdicts = {c.label: v for c, _, v in transfer.evaluate_rows(_rows(means))}
    got = {label: v for label, v in verdicts.items() if "fashion" in label}
    assert set(got.values()) == {"supported"}  # 2 points under fine-tuning (margin 3), 8 over the probe, 3 over random
    got = {label.split(": ")[1]: v for label, v in verdicts.items() if "cifar" in label}
    assert got["mask k=0.5 minus fine-tuning"] == "contradicted"  # 10 points under
    assert got["mask k=0.9 minus linear probe"] == "contradicted"
    assert got["mask over pretrained k=0.5 minus edge-popup on random weights k=0.5"] == "contradicted"
    rows = [r for r in _rows(means) if not (r["variant"] == "probe" and r["seed"] != "0")]
    assert "inconclusive (n < 2)" in {v for _, _, v in transfer.evaluate_rows(rows)}
    rows = [r for r in _rows(means) if r["variant"] != "probe"]
    assert "missing runs" in {v for _, _, v in transfer.evaluate_rows(rows)}


@pytest.mark.needs_data("mnist", "fashion_mnist", "cifar10")
def test_one_shrunken_run_of_every_arm_and_supsup_resumes(tmp_path):
    torch.set_num_threads(1)
    csv = tmp_path / "results.csv"
    specs = [s.with_(train_limit=128, test_limit=128, epochs=1) for s in transfer.plan(1)]
    made = transfer.run_plan(specs, csv, bases=tmp_path / "bases", log=lambda *_: None)
    assert made == len(specs)
    rows = transfer.read(csv)
    assert {row_key(r) for r in rows} >= {s.key() for s in specs}
    by = {(r["model"], r["variant"], r["k"]): r for r in rows}
    for model in ("fc", "conv4"):
        assert float(by[(model, "finetune", "1.0")]["bits_per_weight"]) >= 32.0
        probe = float(by[(model, "probe", "1.0")]["bits_per_weight"])
        mask = float(by[(model, "mask", "0.5")]["bits_per_weight"])
        assert 0.9 < mask < 1.3 and probe < 1.0  # about a bit per weight; the probe stores its last layer only
    sup = [r for r in rows if r["variant"].startswith("supsup")]
    assert len(sup) == transfer.TASKS
    assert all(r["bit_exact"] == "True" and r["right_after"] == r["after_all"] for r in sup)
    assert len({r["storage_bytes"] for r in sup}) == 1
    assert transfer.run_plan(specs, csv, bases=tmp_path / "bases", log=lambda *_: None) == 0  # resumes: all done
    report = transfer.make_report(csv, seeds=1).read_text()  # the full-size plan: its runs are all missing here
    assert "missing runs" in report and "| 0 | permuted_mnist[4] |" in report
