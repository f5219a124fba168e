"""The training engine (supermask_fx.training): schedule, metrics, loop, checkpoints, exact resume, bad input."""

from __future__ import annotations

import errno
import io
import json
import math
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("accelerate")

from supermask_fx import fix_masks, gated_layers, mask_stats, popupify  # noqa: E402
from supermask_fx.training import (  # noqa: E402
    CheckpointError,
    CheckpointMismatchError,
    EpochBatchSampler,
    TrainConfig,
    WarmupCosine,
    load_checkpoint,
    read_metrics,
    topk_correct,
    train,
)
from supermask_fx.training.runlog import RunLog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(n_train=96, n_test=37, seed=0):
    """A learnable 4-class problem on 3x6x6 'images' (labels from a random linear teacher)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 6, 6, generator=g)
    teacher = torch.randn(3 * 6 * 6, 4, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def make_model(method="edge_popup", k=0.5, seed=0, batchnorm=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 16, bias=False),
        nn.ReLU(),
        nn.Linear(16, 4, bias=False),
    )
    return popupify(model, 1.0 if method == "dense" else k, method=method, seed=seed)


def quiet(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.1, progress="none", eval_batch_size=10)
    base.update(kw)
    return TrainConfig(**base)


def frozen_weights(model):
    return {gate.name: module._parameters[gate.param].detach().clone() for module, gate in gated_layers(model)}


def scores(model):
    return {gate.name: module._parameters[gate.scores].detach().clone() for module, gate in gated_layers(model)}


def without_times(history):
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]


# ---------------------------------------------------------------------------------------------- pieces


def test_warmup_cosine_per_step():
    f = WarmupCosine(total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert f(10) == pytest.approx(0.0)
    assert WarmupCosine(10, 0, cosine=False)(7) == 1.0
    assert WarmupCosine(10, 0, min_ratio=0.1)(10) == pytest.approx(0.1)


def test_topk_correct_matches_definition():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3], [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    targets = torch.tensor([2, 5])
    hits = topk_correct(logits, targets, (1, 3, 5, 10))
    # row 0 order: 3, 1, 5, 2, 0, 4 -> target 2 is 4th; row 1: target 5 is last (6th)
    assert hits.tolist() == [[False, False, True, True], [False, False, False, True]]


def test_sampler_shards_cover_every_example_once_per_epoch():
    n, world = 23, 2
    shards = [list(EpochBatchSampler(n, 5, rank=r, world_size=world, seed=3)) for r in range(world)]
    flat = [i for shard in shards for batch in shard for i in batch]
    assert len(flat) == 24 and set(flat) == set(range(n))  # one example repeated as padding
    assert [len(s) for s in shards] == [3, 3]
    s = EpochBatchSampler(n, 5, seed=3)
    s.set_epoch(1)
    assert list(s) != list(EpochBatchSampler(n, 5, seed=3))  # another order in another epoch


def test_config_rejects_bad_values():
    for bad in (dict(epochs=0), dict(batch_size=-1), dict(optimizer="lamb"), dict(lr=0), dict(mixed_precision="fp8")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=3)
    config = TrainConfig(epochs=3, lr=0.05)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['epoch'\]; known fields: \['batch_size',"):
        TrainConfig.from_dict({"epoch": 3})


class _Terminal(io.StringIO):
    """A stand-in for a terminal: keeps what is written, and says it is a TTY."""

    def isatty(self) -> bool:
        return True


def test_progress_mode_follows_the_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert RunLog(True, "auto").mode == "bar"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert RunLog(True, "auto").mode == "lines"
    assert RunLog(False, "auto").mode == "none"  # processes other than the main one stay silent
    assert RunLog(True, "auto", stream=_Terminal()).mode == "bar"  # the stream the bar would be drawn on
    assert RunLog(True, "auto", stream=io.StringIO()).mode == "lines"


def test_a_terminal_without_width_gets_lines(monkeypatch):
    """A pseudo-terminal opened without a size (``script``, some CI runners) has 0 columns: tqdm would draw nothing,
    so ``auto`` prints lines there."""
    import os
    import pty

    main, child = pty.openpty()  # a fresh pty: 0 x 0 until someone sets its size
    try:
        with os.fdopen(child, "w", closefd=False) as stream:
            assert stream.isatty() and os.get_terminal_size(child).columns == 0
            assert RunLog(True, "auto", stream=stream).mode == "lines"
            import fcntl
            import struct
            import termios

            fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            assert RunLog(True, "auto", stream=stream).mode == "bar"
    finally:
        os.close(main)
        os.close(child)


def test_progress_lines_say_elapsed_time_and_eta(capsys):
    """Not a terminal (a log file, CI): plain lines, each with the elapsed time and the time left for the run."""
    train_set, test_set = make_data()
    train(make_model(), train_set, test_set, quiet(epochs=3, progress="lines", log_every=2))
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("epoch 1/3 step ")]
    assert len(steps) == 3 and all(re.search(r"steps/s, elapsed \d+:\d\d, ETA \d+:\d\d\)$", s) for s in steps)
    epochs = [line for line in lines if re.match(r"epoch \d  train_loss", line)]
    assert len(epochs) == 3
    assert re.search(r"\(elapsed \d+:\d\d, ETA \d+:\d\d\)$", epochs[0])
    assert re.search(r"\(elapsed \d+:\d\d\)$", epochs[-1])  # the run is over: no time left to announce
    assert "\r" not in "".join(lines) and "%|" not in "".join(lines)  # no bar in a log


def test_progress_on_a_terminal_is_one_tqdm_bar_over_the_run(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    import tqdm.auto

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, mininterval=0, **kwargs)  # draw every update, however fast the steps

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    train_set, test_set = make_data()
    train(make_model(), train_set, test_set, quiet(epochs=3, progress="auto"))
    text = terminal.getvalue()
    assert len(bars) == 1 and bars[0]["total"] == 3 * 6 and bars[0]["file"] is terminal
    assert re.search(r"epoch 3/3: 100%\|.*\| 18/18 \[\d\d:\d\d<\d\d:\d\d", text)  # elapsed<time left
    assert re.search(r"epoch 1  train_loss .*\(elapsed \d+:\d\d, ETA \d+:\d\d\)", text)  # written above the bar


def test_progress_bar_of_a_resumed_run_starts_where_it_stopped(monkeypatch):
    monkeypatch.setattr(sys, "stdout", _Terminal())
    log = RunLog(True, "auto")
    log.start_run(epochs=4, steps_per_epoch=6, start_epoch=2)
    assert log._bar.n == 12 and log._bar.total == 24
    assert log.timing()[1] is None  # no step timed yet: no estimate
    log.end_run()


# ---------------------------------------------------------------------------------------------- training


def test_edge_popup_trains_scores_only_and_writes_run_files(tmp_path, capsys):
    train_set, test_set = make_data()
    model = make_model()
    weights, before = frozen_weights(model), scores(model)
    result = train(model, train_set, test_set, quiet(epochs=4, out_dir=tmp_path, progress="lines", log_every=2))
    hist = result["history"]
    assert [m["epoch"] for m in hist] == [1, 2, 3, 4]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["test_examples"] == len(test_set)
    assert hist[-1]["step"] == 4 * math.ceil(96 / 16)
    assert 0 <= hist[-1]["test_top1"] <= hist[-1]["test_top5"] <= 1
    after = frozen_weights(model)
    assert all(torch.equal(weights[n], after[n]) for n in weights)  # the weights never change
    assert any(not torch.equal(before[n], s) for n, s in scores(model).items())
    assert mask_stats(model).fraction == pytest.approx(0.5, abs=0.01)
    assert [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 4
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 4 and state["step"] == hist[-1]["step"]
    out = capsys.readouterr().out
    assert "epoch 1/4 step 2/6" in out and "test_top1" in out


def test_random_method_has_nothing_to_optimize_but_updates_batchnorm():
    train_set, test_set = make_data()
    model = make_model("random")
    before = scores(model)
    bn = model[1]
    result = train(model, train_set, test_set, quiet(epochs=1))
    assert all(torch.equal(before[n], s) for n, s in scores(model).items())
    assert int(bn.num_batches_tracked) == math.ceil(96 / 16)
    assert not torch.equal(bn.running_mean, torch.zeros(8))
    assert result["final"]["test_examples"] == len(test_set)


def test_dense_and_retraining_after_fix_masks_train_the_weights():
    train_set, test_set = make_data()
    dense = make_model("dense")
    w0 = frozen_weights(dense)
    train(dense, train_set, test_set, quiet(epochs=1))
    assert all(not torch.equal(w0[n], w) for n, w in frozen_weights(dense).items())

    model = make_model()
    train(model, train_set, None, quiet(epochs=1))
    fix_masks(model, train_weights=True)
    masks = {g.name: g.current_mask(m).clone() for m, g in gated_layers(model)}
    w1, s1 = frozen_weights(model), scores(model)
    result = train(model, train_set, test_set, quiet(epochs=1, lr=0.01))
    w2 = frozen_weights(model)
    assert all(torch.equal(masks[g.name], g.current_mask(m)) for m, g in gated_layers(model))
    assert all(torch.equal(s1[n], s) for n, s in scores(model).items())
    for name in w1:  # kept weights move
        assert not torch.equal(w1[name][masks[name]], w2[name][masks[name]])
    assert math.isfinite(result["final"]["test_loss"])


def test_gradient_accumulation_equals_the_large_batch():
    train_set, _ = make_data()
    a, b = make_model(batchnorm=False), make_model(batchnorm=False)  # BatchNorm sees the micro-batches
    train(a, train_set, None, quiet(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, weight_decay=0.0))
    train(
        b,
        train_set,
        None,
        quiet(epochs=1, batch_size=8, grad_accum_steps=2, optimizer="adam", lr=1e-3, weight_decay=0.0),
    )
    sa, sb = scores(a), scores(b)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-4, atol=1e-6)


def test_label_smoothing_and_warmup_are_applied():
    train_set, _ = make_data()
    model = make_model()
    result = train(model, train_set, None, quiet(epochs=2, warmup_epochs=1, label_smoothing=0.1))
    # the first epoch starts at lr / warm-up steps; the second at the peak (warm-up ended)
    assert result["history"][0]["lr"] == pytest.approx(0.1 / 6)
    assert result["history"][1]["lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- resume


class Stop(Exception):
    pass


def stop_after(epoch):
    def callback(metrics):
        if metrics["epoch"] == epoch:
            raise Stop

    return callback


@pytest.mark.parametrize("method", ["edge_popup", "sampled"])  # sampled draws random masks: RNG states matter
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path, method):
    train_set, test_set = make_data()
    config = quiet(epochs=3, batch_size=8, grad_accum_steps=2, warmup_epochs=1, label_smoothing=0.1, optimizer="sgd")
    full = make_model(method)
    ref = train(full, train_set, test_set, config, out_dir=tmp_path / "full")

    interrupted = make_model(method)
    with pytest.raises(Stop):
        train(interrupted, train_set, test_set, config, out_dir=tmp_path / "cut", callbacks=[stop_after(1)])
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1

    torch.manual_seed(1234)  # a new process: its random streams come from the checkpoint, not from here
    resumed = make_model(method)  # a fresh process would rebuild the model the same way
    res = train(resumed, train_set, test_set, config, out_dir=tmp_path / "cut")
    assert res["resumed_from_epoch"] == 1
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # scores, weights, BatchNorm statistics: bit for bit
        assert torch.equal(a[key], b[key]), key
    assert without_times(ref["history"]) == without_times(res["history"])
    assert [m["epoch"] for m in read_metrics(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3]


def test_resume_of_a_finished_run_returns_its_history(tmp_path):
    train_set, _ = make_data()
    train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path))
    again = train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path, resume=True))
    assert again["resumed_from_epoch"] == 1 and len(again["history"]) == 1


# ---------------------------------------------------------------------------------------------- bad input


def test_batch_larger_than_the_dataset_is_refused():
    train_set, _ = make_data(n_train=20)
    with pytest.raises(ValueError, match=r"batch_size=32 is larger than the training set: 20 examples"):
        train(make_model(), train_set, None, quiet(batch_size=32))


def test_checkpoint_of_another_model_is_refused_and_left_intact(tmp_path):
    train_set, _ = make_data()
    train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path))
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    other = popupify(nn.Sequential(nn.Flatten(), nn.Linear(108, 4, bias=False)), 0.5)
    with pytest.raises(CheckpointMismatchError, match="different model"):
        train(other, train_set, None, quiet(epochs=2, out_dir=tmp_path))
    with pytest.raises(CheckpointMismatchError, match="popupify config"):
        train(make_model(seed=1), train_set, None, quiet(epochs=1, out_dir=tmp_path))
    with pytest.raises(CheckpointMismatchError, match="lr: checkpoint 0.1, now 0.05"):
        train(make_model(), train_set, None, quiet(epochs=1, lr=0.05, out_dir=tmp_path))
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_fresh_start_does_not_overwrite_a_checkpoint(tmp_path):
    train_set, _ = make_data()
    train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path))
    with pytest.raises(FileExistsError, match="resume"):
        train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path, resume=False))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path / "empty", resume=True))


def test_unreadable_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="checkpoint.pt: damaged: truncated"):
        train(make_model(), make_data()[0], None, quiet(out_dir=tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"some other file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(make_model(), make_data()[0], None, quiet(out_dir=tmp_path))


def _offset_of(data: bytes, tensor) -> int:
    """Where the bytes of ``tensor`` lie in a checkpoint file (its storage, stored raw by torch.save)."""
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    return at


def test_a_flipped_byte_anywhere_in_a_checkpoint_is_damage_not_a_resume(tmp_path):
    """The checkpoint's SHA-256 digest covers the whole file: one changed byte in the scores, the frozen
    weights, the optimizer's momentum, the zip structure or the digest itself is a CheckpointError saying the
    file is damaged, before anything is unpickled, and the engine refuses to resume from it."""
    train_set, _ = make_data()
    train(make_model(), train_set, None, quiet(epochs=1, out_dir=tmp_path / "run"))
    path = tmp_path / "run" / "checkpoint.pt"
    data = path.read_bytes()
    state = load_checkpoint(path)
    assert torch.load(path, weights_only=True)["epoch"] == 1  # still a plain torch.save archive
    momentum = next(iter(state["optimizer"]["state"].values()))["momentum_buffer"]
    positions = {
        "scores": _offset_of(data, state["model"]["4.scores"]) + 101,
        "frozen weight": _offset_of(data, state["model"]["0.weight"]) + 17,
        "optimizer state": _offset_of(data, momentum) + 3,
        "first byte": 0,
        "pickle": data.find(b"data.pkl") + 40,
        "zip end record": len(data) - 100,
        "digest": len(data) - 1,
    }
    bad = tmp_path / "bad" / "checkpoint.pt"
    bad.parent.mkdir()
    for at in positions.values():
        for flip in (0x01, 0x80):
            changed = bytearray(data)
            changed[at] ^= flip
            bad.write_bytes(bytes(changed))
            with pytest.raises(CheckpointError, match=r"bad/checkpoint.pt: damaged"):
                load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"bad/checkpoint.pt: damaged"):
        train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path / "bad"))
    assert bad.read_bytes() == bytes(changed)  # left as it was
    bad.write_bytes(data[:-50])
    with pytest.raises(CheckpointError, match=r"damaged: truncated"):
        load_checkpoint(bad)


def test_version_1_checkpoints_without_a_digest_still_load(tmp_path):
    train_set, _ = make_data()
    with pytest.raises(Stop):
        train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path), callbacks=[stop_after(1)])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "version": 1}, tmp_path / "checkpoint.pt")  # what version 1 wrote: no zip comment
    assert load_checkpoint(tmp_path / "checkpoint.pt")["version"] == 1
    result = train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path))
    assert result["resumed_from_epoch"] == 1
    torch.save(state, tmp_path / "checkpoint.pt")  # a version-2 state without its digest: damaged
    with pytest.raises(CheckpointError, match="damaged: a version-2 checkpoint without its digest"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def half_written_saves(fail):
    """A ``torch.save`` that works the first time, then writes half the file and calls ``fail()`` (which raises)."""
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        fail()

    return save


def _no_space():
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train_set, _ = make_data()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", half_written_saves(_no_space))  # half written, then the disk is full
    with pytest.raises(CheckpointError, match="no space left on device.*previous checkpoint.pt is unchanged"):
        train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # the earlier one, intact
    result = train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path))  # and resumable
    assert result["resumed_from_epoch"] == 1 and result["final"]["epoch"] == 2


@pytest.mark.parametrize("failure", ["disk full", "other"])
def test_torch_save_runtime_errors_become_checkpoint_errors(tmp_path, monkeypatch, failure):
    """A full disk during torch.save surfaces as torch's raw RuntimeError ("[enforce fail at inline_container.cc]
    unexpected pos ..."), its cause an OSError(ENOSPC) at most: it is a CheckpointError naming the file and the
    reason, the temporary file is gone and the previous checkpoint intact; so is any other failure of torch.save."""
    train_set, _ = make_data()
    real_save = torch.save

    def fail():
        if failure == "other":
            raise RuntimeError("Tried to serialize object of an unknown kind")
        try:
            _no_space()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", half_written_saves(fail))
    reason = "no space left on device" if failure == "disk full" else "RuntimeError: Tried to serialize"
    with pytest.raises(CheckpointError, match=f"cannot write .*checkpoint.pt: {reason}.*previous checkpoint.pt is"):
        train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_temporary_files_of_killed_writes_are_removed(tmp_path, capsys):
    """A kill during a checkpoint write leaves .checkpoint.pt.<pid>.*.tmp: the next run removes those of dead
    writers (and of writers that recorded no pid), says so in one plain line, and leaves a live process's."""
    import os
    import subprocess

    train_set, _ = make_data()
    with pytest.raises(Stop):
        train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path), callbacks=[stop_after(1)])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [
        f".checkpoint.pt.{dead.stdout.strip()}.x1y2z3.tmp",
        ".checkpoint.pt.ab12cd34.tmp",
        f".metrics.jsonl.{dead.stdout.strip()}.x.tmp",
    ]
    live = f".checkpoint.pt.{os.getppid()}.q9w8e7.tmp"  # pytest's parent: alive, maybe writing
    for name in [*stale, live]:
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a checkpoint")
    train(make_model(), train_set, None, quiet(epochs=2, out_dir=tmp_path, progress="lines"))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["checkpoint.pt", "config.json", "metrics.jsonl", live])
    out = capsys.readouterr().out
    assert "removed 3 temporary file(s) of an interrupted write" in out
    assert "warning" not in out.lower() and "error" not in out.lower()


def test_half_precision_models_are_refused_with_what_to_do(tmp_path):
    """A model converted with .half() met float32 inputs ("expected m1 and m2 to have the same dtype"): it is
    refused before anything runs or is written, with the way to train in 16 bits (mixed_precision)."""
    train_set, _ = make_data()
    for convert in (lambda m: m.half(), lambda m: m.bfloat16()):
        with pytest.raises(ValueError, match=r"(?i)keep the model in float32 and set TrainConfig\(mixed_precision="):
            train(convert(make_model()), train_set, None, quiet(epochs=1, out_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_resume_is_exact_with_augmentation_in_worker_processes(tmp_path):
    from supermask_fx.data import ImageTensorDataset, dataset_info
    from supermask_fx.training import RandomCropFlip

    g = torch.Generator().manual_seed(0)
    info = dataset_info("cifar10")
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 10, (64,), generator=g)
    train_set = RandomCropFlip(ImageTensorDataset(images, targets, info), padding=2)

    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 36, 10, bias=False))
        return popupify(model, 0.5)

    config = quiet(epochs=3, num_workers=1)
    full = net()
    train(full, train_set, None, config, out_dir=tmp_path / "full")
    with pytest.raises(Stop):
        train(net(), train_set, None, config, out_dir=tmp_path / "cut", callbacks=[stop_after(1)])
    resumed = net()
    train(resumed, train_set, None, config, out_dir=tmp_path / "cut")
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    a, b = RandomCropFlip(ImageTensorDataset(images, targets, info), padding=2), train_set
    assert not torch.equal(a.get_batch(torch.arange(64))[0], b.get_batch(torch.arange(64))[0])  # it does augment


def test_metrics_file_write_failure_is_a_checkpoint_error_naming_the_file(tmp_path):
    from supermask_fx.training.checkpoint import CheckpointError
    from supermask_fx.training.runlog import METRICS_NAME, RunLog

    log = RunLog(True, "none", tmp_path)
    (tmp_path / METRICS_NAME).mkdir()  # cannot be opened for appending: an OSError, as a full disk gives
    with pytest.raises(CheckpointError, match=rf"cannot append to .*{METRICS_NAME}.*run again to resume"):
        log.epoch({"epoch": 1, "train_loss": 0.5})


# ---------------------------------------------------------------------------------------------- resume with other data


def test_resume_with_other_data_is_refused(tmp_path):
    """A checkpoint records each data set's length and a hash of a fixed sample of items: resuming with another
    training set of the same length (other examples) or another length is refused, naming the set and the
    difference, before the model is touched; the same data (a fresh but equal TensorDataset) resumes."""
    train_set, test_set = make_data()
    with pytest.raises(Stop):
        train(make_model(), train_set, test_set, quiet(epochs=2, out_dir=tmp_path), callbacks=[stop_after(1)])
    other_items, _ = make_data(seed=1)  # 96 examples as well, other values
    shorter = TensorDataset(*train_set[:80])
    for data, reason in [
        (other_items, r"the training set: 96 examples both times, but other items"),
        (shorter, r"the training set: 96 examples in the checkpoint, 80 now"),
    ]:
        model = make_model()
        before = scores(model)
        with pytest.raises(CheckpointMismatchError, match=rf"checkpoint.pt was made with other data: {reason}"):
            train(model, data, test_set, quiet(epochs=2, out_dir=tmp_path))
        assert all(torch.equal(before[k], v) for k, v in scores(model).items())
    _, other_test = make_data(seed=2)
    with pytest.raises(CheckpointMismatchError, match=r"the test set: 37 examples both times, but other items"):
        train(make_model(), train_set, other_test, quiet(epochs=2, out_dir=tmp_path))
    same = TensorDataset(train_set.tensors[0].clone(), train_set.tensors[1].clone())
    result = train(make_model(), same, test_set, quiet(epochs=2, out_dir=tmp_path))
    assert result["resumed_from_epoch"] == 1


def test_dataset_fingerprint_is_stable_and_leaves_the_random_streams_alone():
    """The sample is read under fixed seeds: a randomly augmented data set gives one fingerprint every time, and
    the python, numpy and torch streams are where they were. One changed sampled item changes it; items that
    cannot be hashed leave the length alone to compare."""
    import random

    import numpy as np

    from supermask_fx.data import ImageTensorDataset, dataset_info
    from supermask_fx.training import RandomCropFlip, dataset_fingerprint

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    targets = torch.randint(0, 10, (40,), generator=g)
    augmented = RandomCropFlip(ImageTensorDataset(images, targets, dataset_info("cifar10")), padding=2)
    assert not torch.equal(augmented[3][0], augmented[3][0])  # it does draw random crops
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = dataset_fingerprint(augmented)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()
    assert dataset_fingerprint(augmented) == first and first["length"] == 40 and first["sampled"] == 16
    assert first["items"] is not None
    images[39, :, 4, 4] ^= 1  # the last example is always sampled; a central pixel survives every crop
    assert dataset_fingerprint(augmented)["items"] != first["items"]

    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return object(), i

    assert dataset_fingerprint(Opaque()) == {"length": 5, "items": None, "sampled": 0}


# ---------------------------------------------------------------------------------------------- NaN and inf


def nan_on_call(*bad_calls, value=float("nan")):
    """A cross-entropy loss that returns ``value`` on the given calls (0-based, counted over the whole run)."""
    calls = []

    def loss_fn(logits, targets):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        calls.append(len(calls))
        return loss * value if len(calls) - 1 in bad_calls else loss

    loss_fn.calls = calls
    return loss_fn


@pytest.mark.parametrize("where", ["at once", "at the epoch's end", "at a progress line"])
def test_a_non_finite_loss_stops_the_run_naming_the_batch(tmp_path, monkeypatch, where, capsys):
    """96 examples in batches of 16: 6 batches and optimizer steps an epoch. The loss of the 9th batch of the run
    (epoch 2, batch 3, step 9) is NaN: a NonFiniteLossError names them, the checkpoint of epoch 1 is left as it was
    and metrics.jsonl holds epoch 1 only. On the CPU the loss is checked at once, before its backward pass; on an
    accelerator (emulated) a flag on the device is read at the end of the epoch, or at the progress lines that
    read the loss anyway."""
    import supermask_fx.training.engine as engine
    from supermask_fx.training import NonFiniteLossError

    train_set, _ = make_data()
    if where != "at once":
        monkeypatch.setattr(engine, "_loss_on_host", lambda device: False)
    progress = dict(progress="lines", log_every=1) if where == "at a progress line" else {}
    loss_fn = nan_on_call(8)
    model = make_model()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, batch 3 of 6 \(optimizer step 9\)") as error:
        train(model, train_set, None, quiet(epochs=3, out_dir=tmp_path, **progress), loss_fn=loss_fn)
    assert (error.value.epoch, error.value.batch, error.value.step) == (2, 3, 9)
    assert "checkpoint.pt (epoch 1) is unchanged" in str(error.value) and "on_nonfinite='skip'" in str(error.value)
    assert len(loss_fn.calls) == {"at once": 9, "at the epoch's end": 12, "at a progress line": 9}[where]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for k, v in state["model"].items() if "scores" in k)
    assert [m["epoch"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    # the run resumes from there, here skipping that batch
    result = train(make_model(), train_set, None, quiet(epochs=3, out_dir=tmp_path, on_nonfinite="skip"))
    assert result["resumed_from_epoch"] == 1 and result["final"]["epoch"] == 3


def test_skip_drops_the_steps_of_non_finite_batches_and_counts_them(tmp_path):
    """on_nonfinite="skip": one example with NaN inputs lands in exactly one batch per epoch, so each epoch has
    one non-finite batch and (with two micro-batches per step) one skipped optimizer step of its 3; the optimizer
    steps 3 - 1 times an epoch, the scores and the BatchNorm statistics stay finite, the loss and accuracy average
    the other batches."""
    train_set, _ = make_data()
    inputs = train_set.tensors[0].clone()
    inputs[17, 1, 2, 3] = float("nan")
    poisoned = TensorDataset(inputs, train_set.tensors[1])
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = []
    hook = register_optimizer_step_post_hook(lambda *args: steps.append(1))
    try:
        model = make_model()
        config = quiet(epochs=2, batch_size=16, grad_accum_steps=2, on_nonfinite="skip", out_dir=tmp_path)
        result = train(model, poisoned, None, config)
    finally:
        hook.remove()
    for metrics in result["history"]:
        assert metrics["nonfinite_batches"] == 1 and metrics["skipped_steps"] == 1 and metrics["step"] % 3 == 0
        assert math.isfinite(metrics["train_loss"]) and 0 <= metrics["train_top1"] <= 1
    assert len(steps) == 2 * (3 - 1)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["skipped_steps"] == 1


def test_on_nonfinite_is_checked_and_not_a_resume_setting():
    with pytest.raises(ValueError, match="unknown on_nonfinite 'ignore'; choose one of raise, skip"):
        TrainConfig(on_nonfinite="ignore")
    assert "on_nonfinite" not in TrainConfig().result_fields()
