"""The paper-scale GPU grid (``experiments.paper_gpu``): its small mode end to end on CIFAR-10 (rows with the
keys of ``configs.expand``, curves, resuming), the device augmentation against an independent reference and
against the engine's ``RandomCropFlip``, the run order, and the deadline logic."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import supermask_fx.data as sdata
from supermask_fx.experiments import paper_gpu as pg
from supermask_fx.experiments.configs import expand, gated_weight_count
from supermask_fx.experiments.results import curves_path, read_curves, read_rows, row_key
from supermask_fx.experiments.specs import DENSE_SGD, EDGE_POPUP

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SC, KN = "signed_constant", "kaiming_normal"

needs_cifar = pytest.mark.skipif(
    not sdata.is_available_offline("cifar10"),
    reason="CIFAR-10 not found locally (../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz or $SUPERMASK_FX_DATA)",
)


def _expected_small_specs():
    """The small mode's runs derived from configs.expand directly: Conv4 k=0.5 signed constant, Conv4 dense SGD,
    Conv2 k=0.5 signed constant, seeds 0 and 1, at width 1/8, 2 epochs, 512 / 256 examples."""
    wanted = [("conv4", "edge_popup"), ("conv4", "dense"), ("conv2", "edge_popup")]
    out = []
    for spec in expand("fig3_depth_k", "paper", 2):
        popup = spec.method == "edge_popup" and spec.init == SC and spec.k == 0.5
        dense = spec.method == "dense" and spec.optimizer == "sgd"
        if (spec.model, spec.method) in wanted and (popup or dense):
            out.append(spec.with_(width=spec.width / 8, epochs=2, train_limit=512, test_limit=256))
    return out


@needs_cifar
def test_small_mode_writes_rows_with_expand_keys_curves_and_resumes(tmp_path, capsys):
    csv_path = tmp_path / "paper" / "results.csv"
    summary = pg.main(["--small", "--csv", str(csv_path), "--revision", "abc123"])
    assert len(summary["done"]) == 6 and not summary["failed"] and not summary["abandoned"]

    expected = _expected_small_specs()
    assert len(expected) == 6
    rows = read_rows(csv_path)
    assert sorted(row_key(r) for r in rows) == sorted(s.key() for s in expected)
    for row in rows:
        assert row["experiment"] == "fig3_depth_k" and row["dataset"] == "cifar10" and row["width"] == "0.125"
        assert row["engine"] == "supermask_fx.experiments.paper_gpu" and row["git_revision"] == "abc123"
        assert 0.0 <= float(row["test_accuracy"]) <= 100.0 and float(row["wall_time_s"]) > 0
        assert row["finished_at"].endswith("Z") and row["found_accuracy"] == ""
        total = gated_weight_count(row["model"], 0.125, "cifar10")
        assert int(row["total_weights"]) == total
        kept = int(row["kept_weights"])
        assert kept == total if row["method"] == "dense" else abs(kept - total / 2) < 10  # k per layer, rounded
        assert (row["lr"], row["weight_decay"], row["batch_size"], row["schedule"]) == (
            "0.01" if row["method"] == "dense" else "0.1",
            "0.0001",
            "128",
            "cosine",
        )

    curves = read_curves(curves_path(csv_path))
    assert set(curves) == {s.key() for s in expected}
    for row in rows:
        curve = curves[row_key(row)]
        assert len(curve) == 2 and curve[-1] == pytest.approx(float(row["test_accuracy"]), abs=0.01)

    before = csv_path.read_text()
    again = pg.main(["--small", "--csv", str(csv_path), "--revision", "abc123"])
    assert again["done"] == [] and again["refused"] == []
    assert csv_path.read_text() == before, "a rerun must skip the runs already in the CSV"
    out = capsys.readouterr().out
    assert "0 runs to do (6 already in the CSV)" in out and "summary after" in out


def test_a_budget_already_spent_starts_nothing(tmp_path, capsys):
    csv_path = tmp_path / "results.csv"
    summary = pg.main(["--small", "--minutes", "0", "--csv", str(csv_path), "--revision", "x"])
    assert summary["done"] == [] and len(summary["refused"]) == 6
    assert not csv_path.exists()
    assert "6 not started (would not fit the budget)" in capsys.readouterr().out


def _reference_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int = 4):
    """Per image: zero-pad, slice the 32x32 window at (row, column) = offsets, mirror the columns if flipped."""
    out = []
    for image, (y, x), flip in zip(images, offsets, flips):
        padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
        crop = padded[:, y : y + image.shape[1], x : x + image.shape[2]]
        out.append(crop[:, :, ::-1] if flip else crop)
    return np.stack(out)


def test_device_crop_flip_equals_reference_for_the_same_draws(monkeypatch):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    offsets, flips = pg.draw_augmentation(400, generator)
    assert offsets.device.type == flips.device.type == torch.device(DEVICE).type
    assert set(offsets.flatten().tolist()) == set(range(9)) and 100 < int(flips.sum()) < 300

    got = pg.crop_flip(images, offsets, flips)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    expected = _reference_crop_flip(images.cpu().numpy(), offsets.cpu().numpy(), flips.cpu().numpy())
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    # extreme draws: the corner crops keep a 4-pixel black border, the flip moves the border
    corner = pg.crop_flip(images[:2], torch.tensor([[0, 0], [8, 8]], device=DEVICE), torch.tensor([False, True]))
    assert int(corner[0, :, :4].sum()) == 0 and int(corner[0, :, :, :4].sum()) == 0
    assert torch.equal(corner[0, :, 4:, 4:], images[0, :, :28, :28])
    assert torch.equal(corner[1, :, :28, 4:], images[1, :, 4:, 4:].flip(2))  # flipped: the black border is left
    assert int(corner[1, :, 28:].sum()) == 0 and int(corner[1, :, :, :4].sum()) == 0

    # the engine's RandomCropFlip gives the same images when made to draw the same numbers
    from supermask_fx.training import RandomCropFlip

    cpu_offsets, cpu_flips = offsets.cpu(), flips.cpu()
    monkeypatch.setattr(torch, "randint", lambda *a, **k: cpu_offsets.clone())
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.where(cpu_flips, 0.25, 0.75))
    engine_aug = RandomCropFlip(None).augment(images.cpu())
    monkeypatch.undo()
    assert torch.equal(engine_aug, got.cpu())


def test_device_normalisation_equals_the_datasets():
    info = sdata.dataset_info("cifar10")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 10, (16,))
    dataset = sdata.ImageTensorDataset(images, targets, info)
    split = (images, targets, info.mean, info.std)
    data = pg.DeviceData.from_splits(split, split, torch.device(DEVICE))
    expected, _ = dataset.get_batch(torch.arange(16))
    torch.testing.assert_close(data.normalize(images.to(DEVICE)).cpu(), expected)
    torch.testing.assert_close(data.test_inputs.cpu(), expected)


def test_paper_runs_are_figure_3_in_priority_order():
    runs = pg.paper_runs(3)
    assert sorted(s.key() for s in runs) == sorted(s.key() for s in expand("fig3_depth_k", "paper", 3))
    head = [(s.model, s.method, s.init, s.k, s.seed) for s in runs[:6]]
    assert head == [("conv4", "edge_popup", SC, 0.5, i) for i in range(3)] + [
        ("conv4", "dense", KN, 1.0, i) for i in range(3)
    ]
    assert [(s.model, s.method) for s in runs[6:24:3]] == [
        (m, method) for m in ("conv2", "conv6", "conv8") for method in ("edge_popup", "dense")
    ]
    assert all(s.optimizer == "sgd" and s.init == SC for s in runs[6:24] if s.method == "edge_popup")
    tier2 = [s for s in runs[24:48]]
    assert {s.k for s in tier2} == {0.3, 0.7} and {s.init for s in tier2} == {SC}
    assert {(s.init, s.k) for s in runs[48:84]} == {(KN, 0.5), (KN, 0.3), (KN, 0.7)}
    for s in runs:
        if s.optimizer == "sgd":
            assert s.recipe == (DENSE_SGD if s.method == "dense" else EDGE_POPUP)
            assert s.epochs == 100 and s.width == 1.0 and s.train_limit is None
    assert runs[-1].optimizer == "adam" or runs[-1].model == "fc"


def _spec(model: str, epochs: int = 100, method: str = "edge_popup"):
    """The paper-scale run of ``model``: k = 0.5 signed constant, or dense SGD."""
    (spec,) = [
        s
        for s in expand("fig3_depth_k", "paper", 1)
        if s.model == model
        and s.method == method
        and s.optimizer == "sgd"
        and (method == "dense" or s.init == SC)
        and s.k in (0.5, 1.0)
    ]
    return spec.with_(epochs=epochs)


def test_planner_refuses_runs_whose_estimate_passes_the_deadline():
    now = 1000.0
    conv8, conv4, conv2 = _spec("conv8"), _spec("conv4"), _spec("conv2")
    planner = pg.Planner([conv4, conv8, conv2], deadline=now + 300)
    assert planner.estimate(conv4) is None
    assert planner.next_run(now) == conv4, "nothing measured yet: the first runs start"
    planner.record(conv4, 1, 4.0)
    planner.record(conv4, 2, 3.0)
    assert planner.estimate(conv4) == pytest.approx(4.0 + 99 * 3.0)  # 301 s: just too long
    ratio8 = pg.work_per_epoch(conv8) / pg.work_per_epoch(conv4)
    ratio2 = pg.work_per_epoch(conv2) / pg.work_per_epoch(conv4)
    assert ratio8 > 1.5 and ratio2 < 0.6
    assert planner.estimate(conv8) == pytest.approx(100 * 3.0 * ratio8)  # scaled from the measured kind
    planner.pending = [conv4.with_(seed=1), conv8, conv2]
    assert planner.next_run(now) == conv2, "the conv4 and conv8 runs do not fit, the conv2 run does"
    assert planner.refused == [conv4.with_(seed=1), conv8]
    assert planner.next_run(now) is None
    late = pg.Planner([conv2], deadline=now)
    assert late.next_run(now) is None and late.refused == [conv2]


def test_a_running_run_is_abandoned_when_its_epochs_say_it_cannot_finish():
    assert not pg.would_overrun([10.0], 100, now=0.0, deadline=math.inf)
    assert pg.would_overrun([30.0, 2.0, 2.0], 100, now=0.0, deadline=100.0)  # 97 epochs x 2 s > 100 s
    assert not pg.would_overrun([30.0, 2.0, 2.0], 50, now=0.0, deadline=100.0)  # the slow first epoch is left out
    assert not pg.would_overrun([5.0, 5.0], 2, now=0.0, deadline=1.0), "a finished run is never abandoned"

    info = sdata.dataset_info("cifar10")
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    split = (images, torch.randint(0, 10, (256,)), info.mean, info.std)
    data = pg.DeviceData.from_splits(split, split, torch.device(DEVICE))
    spec = _spec("conv2", epochs=5).with_(width=1 / 8, train_limit=256, test_limit=256)
    epochs = []
    with pytest.raises(pg.Abandoned):
        pg.train_run(
            spec, data, pg.Options(device=DEVICE, deadline=time.time()), on_epoch=lambda e, s: epochs.append(e)
        )
    assert epochs == [1]


def test_channels_last_training_matches_the_default_layout():
    info = sdata.dataset_info("cifar10")
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=gen)
    split = (images, torch.randint(0, 10, (256,), generator=gen), info.mean, info.std)
    data = pg.DeviceData.from_splits(split, split, torch.device(DEVICE))
    spec = _spec("conv2", epochs=1).with_(width=1 / 8, train_limit=256, test_limit=256)
    plain, plain_curve = pg.train_run(spec, data, pg.Options(device=DEVICE))
    last, last_curve = pg.train_run(spec, data, pg.Options(device=DEVICE, channels_last=True))
    assert plain["kept_weights"] == last["kept_weights"]
    assert abs(plain_curve[-1] - last_curve[-1]) <= 2.0
