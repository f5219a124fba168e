"""Fault injection: damaged files, a full file system, a killed training process.

* every byte of a subnetwork file's header, flipped: a load succeeds with identical logits or raises
  ``SubnetworkFileError`` naming the file, never another exception;
* bytes of a training checkpoint, flipped all over the file: ``CheckpointError`` saying it is damaged;
* a checkpoint written onto a full file system (a small tmpfs, when running as root): ``CheckpointError``
  naming the cause, the previous checkpoint intact, no temporary file left, and the run resumes once there is room;
* ``kill -9`` of a real training process in the middle of a checkpoint write: the next run removes the
  temporary file, resumes, and ends bit-identical to an uninterrupted run (one thread each);
* errors that name the target and the cause: subnetwork files onto a directory, a read-only folder or a full disk,
  a training run started on a full disk;
* a second run in a run folder another run holds: refused naming the holder; a holder killed with ``kill -9``
  does not block.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import errno
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from supermask_fx import SubnetworkFileError, load_subnetwork, popupify, save_subnetwork
from supermask_fx.training import CheckpointError, TrainConfig, load_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs accelerate")


# ---------------------------------------------------------------------------------------------- subnetwork header


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


_FRESH = tiny_net()  # copied for each load: building (and seeding) a model is most of a refused load's time


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = popupify(tiny_net(), k=0.4, seed=3)
    model.train()(torch.randn(8, 6))  # BatchNorm statistics away from their defaults: stored state
    model.eval()
    path = tmp_path_factory.mktemp("faults") / "tiny.safetensors"
    save_subnetwork(model, path)
    x = torch.randn(4, 6)
    with torch.no_grad():
        return path, x, model(x)


def _load_outcome(path: Path, x: torch.Tensor, expected: torch.Tensor) -> str:
    """``"same"`` (loads, identical logits) or ``"refused"`` (SubnetworkFileError naming the file); anything
    else fails the test."""
    try:
        model = load_subnetwork(copy.deepcopy(_FRESH), path).eval()
    except SubnetworkFileError as error:
        assert str(path) in str(error), str(error)
        return "refused"
    with torch.no_grad():
        assert torch.equal(model(x), expected), "a damaged header loaded into a different model"
    return "same"


# Each position is flipped with 0x01 and with one of these in turn: every bit of every header byte gets hit.
_OTHER_FLIPS = (0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF)


def test_every_header_byte_flipped_is_refused_by_name_or_harmless(tiny_file, tmp_path):
    """The 8-byte length, the JSON of the safetensors header, the supermask_fx metadata, both checksums and the
    padding: each byte flipped two ways, one at a time."""
    path, x, expected = tiny_file
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    bad = tmp_path / "flipped.safetensors"
    tally = collections.Counter()
    for position in range(header_end):
        for flip in (0x01, _OTHER_FLIPS[position % len(_OTHER_FLIPS)]):
            changed = bytearray(data)
            changed[position] ^= flip
            bad.write_bytes(bytes(changed))
            tally[_load_outcome(bad, x, expected)] += 1
    assert tally["refused"] + tally["same"] == 2 * header_end
    assert tally["refused"] >= 2 * (header_end - 16)  # only flips that leave the same JSON can load


def test_header_whitespace_that_parses_the_same_loads(tiny_file, tmp_path):
    """The other side: a padding space turned into a tab, newline or carriage return is the same JSON and the
    same header checksum, so the file loads with identical logits."""
    path, x, expected = tiny_file
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    padding = [i for i in range(header_end - 8, header_end) if data[i : i + 1] == b" "]
    assert padding, "the header has no padding to alter"
    bad = tmp_path / "spaces.safetensors"
    for position in padding:
        for byte in b"\t\n\r":
            changed = bytearray(data)
            changed[position] = byte
            bad.write_bytes(bytes(changed))
            assert _load_outcome(bad, x, expected) == "same"


# ---------------------------------------------------------------------------------------------- training checkpoints


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=g)
    y = (x @ torch.randn(12, 3, generator=g)).argmax(1)
    return TensorDataset(x, y)


def tiny_trainable():
    torch.manual_seed(0)
    return popupify(nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)), 0.5)


def quiet(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.1, "progress": "none", **kw})


@needs_accelerate
def test_checkpoint_bytes_flipped_all_over_the_file_are_damage(tmp_path, one_thread):
    """Every 7th byte, and every byte of the first and last 256 (zip headers, central directory, end record,
    digest), flipped: a CheckpointError naming the file and saying it is damaged, each time."""
    train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=tmp_path / "run"))
    data = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    positions = sorted(set(range(0, len(data), 7)) | set(range(256)) | set(range(len(data) - 256, len(data))))
    bad = tmp_path / "bad.pt"
    for i, position in enumerate(positions):
        changed = bytearray(data)
        changed[position] ^= (0x01, 0x10, 0x80, 0xFF)[i % 4]
        bad.write_bytes(bytes(changed))
        with pytest.raises(CheckpointError, match=r"bad.pt: damaged"):
            load_checkpoint(bad)
    assert len(positions) > 1000


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted at ``folder`` (needs root), unmounted afterwards."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@needs_accelerate
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_file_system_during_a_checkpoint_write(tmp_path, one_thread):
    """torch.save onto a full tmpfs fails deep inside (torch's RuntimeError "unexpected pos ...", an OSError
    ENOSPC below it): a CheckpointError that says so, the previous checkpoint intact and loadable, no temporary
    file left; the run then resumes and finishes once there is room."""
    from supermask_fx.training.checkpoint import FORMAT, VERSION, atomic_save

    with small_tmpfs(tmp_path / "small", "1m") as small:
        target = small / "checkpoint.pt"
        atomic_save({"format": FORMAT, "version": VERSION, "x": torch.randn(50_000)}, target)  # 200 kB: fits
        before = target.read_bytes()
        with pytest.raises(CheckpointError, match=r"cannot write .*checkpoint.pt: no space left on device.*unchanged"):
            atomic_save({"format": FORMAT, "version": VERSION, "x": torch.randn(400_000)}, target)  # 1.6 MB
        assert sorted(p.name for p in small.iterdir()) == ["checkpoint.pt"]
        assert target.read_bytes() == before and load_checkpoint(target)["x"].numel() == 50_000
        target.unlink()

        # the engine: the disk fills up after epoch 1 (leaving room for the metrics line, not a checkpoint)
        run = small / "run"
        filler = small / "filler"

        def fill_the_disk(metrics):
            if metrics["epoch"] == 1:
                st = os.statvfs(small)
                filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8192))

        with pytest.raises(CheckpointError, match=r"cannot write .*run/checkpoint.pt: no space left on device"):
            train(tiny_trainable(), tiny_data(), None, quiet(epochs=3, out_dir=run), callbacks=[fill_the_disk])
        assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        filler.unlink()
        result = train(tiny_trainable(), tiny_data(), None, quiet(epochs=3, out_dir=run))
        assert result["resumed_from_epoch"] == 1 and result["final"]["epoch"] == 3


# ---------------------------------------------------------------------------------------------- kill -9

WORKER = textwrap.dedent(
    """
    import io, os, sys, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from supermask_fx import gated_layers, popupify
    from supermask_fx.training import TrainConfig, train

    torch.set_num_threads(1)
    out_dir, record, hang_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if hang_at:  # the checkpoint after epoch `hang_at` stops halfway through its write, and waits to be killed
        real_save, saves = torch.save, []

        def save(obj, f, *args, **kwargs):
            saves.append(1)
            if len(saves) < hang_at:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            open(os.path.join(out_dir, "halfway"), "w").close()
            time.sleep(120)

        torch.save = save
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 6, 6, generator=g)
    y = (x.flatten(1) @ torch.randn(108, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    net = popupify(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 16, 4, bias=False)), 0.5)
    config = TrainConfig(epochs=4, batch_size=16, lr=0.1, progress="lines", log_every=0, out_dir=out_dir)
    result = train(net, TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:]), config)
    torch.save({"state": net.state_dict(),
                "masks": {gate.name: gate.current_mask(m).clone() for m, gate in gated_layers(net)},
                "history": [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in result["history"]],
                "resumed": result["resumed_from_epoch"]}, record)
    """
)


def _worker(script: Path, out_dir: Path, record: Path, hang_at: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.Popen(
        [sys.executable, str(script), str(out_dir), str(record), str(hang_at)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


@pytest.mark.slow  # three processes that each import torch and accelerate: about 30 s on 2 busy cores
@needs_accelerate
def test_kill_9_during_a_checkpoint_write_then_resume_is_bit_exact(tmp_path):
    """A real training process (4 epochs, a checkpoint each) is SIGKILLed halfway through writing its epoch-3
    checkpoint, next to an uninterrupted run of the same script. The killed run leaves epoch 2's checkpoint and
    the temporary file; started again, it removes the temporary file, resumes after epoch 2 and ends with the
    uninterrupted run's scores, weights, BatchNorm statistics, masks and metrics, bit for bit."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cut = tmp_path / "cut"
    cut.mkdir()
    reference = _worker(script, tmp_path / "full", tmp_path / "full.pt")
    victim = _worker(script, cut, tmp_path / "never.pt", hang_at=3)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "halfway").exists():
            assert victim.poll() is None, victim.communicate()[0]
            assert time.monotonic() < deadline, "the worker never reached its epoch-3 checkpoint"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    leftovers = [p.name for p in cut.iterdir() if p.name.startswith(".checkpoint.pt.") and p.name.endswith(".tmp")]
    assert len(leftovers) == 1, leftovers
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 2

    resumed = _worker(script, cut, tmp_path / "resumed.pt")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "resuming" in log and f"removed 1 temporary file(s) of an interrupted write: {leftovers[0]}" in log
    assert not [p for p in cut.iterdir() if p.name.endswith(".tmp")]
    full_log = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, full_log[-3000:]

    full, again = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert again["resumed"] == 2 and full["resumed"] is None
    assert full["state"].keys() == again["state"].keys()
    for key, value in full["state"].items():
        assert torch.equal(again["state"][key], value), key
    for key, mask in full["masks"].items():
        assert torch.equal(again["masks"][key], mask), key
    assert again["history"] == full["history"]


def test_config_json_write_that_fails_keeps_the_previous_file(tmp_path, one_thread, monkeypatch):
    """config.json is replaced atomically: a write that fails (full disk at fsync) leaves the previous file whole
    and no temporary beside it."""
    import errno

    import supermask_fx.files.atomic as atomic

    run = tmp_path / "run"
    train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
    before = (run / "config.json").read_bytes()
    real_fsync = os.fsync

    def fsync(fd):
        if "config.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"cannot write .*run/config.json: no space left on device") as error:
        train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))  # resumes: rewrites config.json
    assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
    assert (run / "config.json").read_bytes() == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------- errors that name the target


def _saved_tiny():
    model = popupify(tiny_net(), k=0.4, seed=3).eval()
    return model


def test_save_subnetwork_to_a_directory_names_it(tmp_path):
    """A directory given as the file: a SubnetworkFileError naming that path (not the hidden temporary file) and
    saying what to give instead; nothing is written into the directory."""
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(
        SubnetworkFileError, match=rf"cannot write {folder}: it is a directory: give the path of a file"
    ):
        save_subnetwork(_saved_tiny(), folder)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_save_subnetwork_into_a_read_only_folder_names_it(tmp_path, monkeypatch):
    """A folder this user cannot write: the error names the file and the folder, not the hidden temporary file
    that mkstemp's PermissionError names. As root (chmod does not stop root) the refusal is mkstemp's own, made
    to happen: the same PermissionError, with the temporary file's name in it."""
    import supermask_fx.files.atomic as atomic

    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):

            def refused(prefix="", suffix="", dir=None):
                raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

            monkeypatch.setattr(atomic.tempfile, "mkstemp", refused)
        target = folder / "model.safetensors"
        with pytest.raises(SubnetworkFileError) as error:
            save_subnetwork(_saved_tiny(), target)
        message = str(error.value)
        assert message.startswith(f"cannot write {target}: permission denied: {folder} is not writable"), message
        assert ".tmp" not in message and isinstance(error.value.__cause__, PermissionError)
        assert not target.exists()
    finally:
        folder.chmod(0o755)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


@needs_accelerate
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_errors_name_the_target_and_the_cause(tmp_path, one_thread):
    """On a full file system: save_subnetwork raises a SubnetworkFileError naming the file and "no space left on
    device" (the original OSError chained), an existing file unchanged; a training run started there raises a
    CheckpointError naming the file it could not write, not a bare OSError from config.json."""
    model = _saved_tiny()
    with small_tmpfs(tmp_path / "small", "256k") as small:
        target = small / "model.safetensors"
        save_subnetwork(model, target)
        before = target.read_bytes()
        filler = _fill(small)
        with pytest.raises(SubnetworkFileError, match=rf"cannot write {target}: no space left on device") as error:
            save_subnetwork(model, target)
        assert "unchanged" in str(error.value) and target.read_bytes() == before
        assert isinstance(error.value.__cause__, OSError) and error.value.__cause__.errno == errno.ENOSPC
        fresh = small / "other.safetensors"
        with pytest.raises(SubnetworkFileError, match=rf"cannot write {fresh}: no space left on device"):
            save_subnetwork(model, fresh)

        run = small / "run"
        with pytest.raises(CheckpointError, match=rf"cannot (write|create) {run}.*: no space left on device") as error:
            train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
        assert isinstance(error.value.__cause__, OSError)
        assert not [p.name for p in small.rglob("*.tmp")] and not run.exists()  # no empty run folder either
        filler.unlink()
        result = train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))  # room again: it runs
        assert result["final"]["epoch"] == 1


# ---------------------------------------------------------------------------------------------- one run per out_dir

# Another process that holds a run folder, written without the library (and without importing torch): an exclusive
# flock on run.lock, with its pid, host and start time in it, as a run writes them.
HOLDER = textwrap.dedent(
    """
    import datetime, fcntl, json, os, socket, sys, time

    os.makedirs(sys.argv[1], exist_ok=True)
    fd = os.open(os.path.join(sys.argv[1], "run.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
    print("locked", flush=True)
    time.sleep(120)
    """
)


def _holder(tmp_path: Path, out_dir: Path) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    process = subprocess.Popen([sys.executable, str(script), str(out_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


@needs_accelerate
def test_a_second_run_in_the_same_out_dir_is_refused_naming_the_holder(tmp_path, one_thread):
    """Another process holds the folder: a run there is refused with a RunLockedError (a CheckpointError) that
    names the folder and the holder's pid; it writes nothing. kill -9 of the holder frees the folder: the OS drops
    the lock with the process, and the next run goes ahead over the stale lock file."""
    from supermask_fx.training import RunLockedError

    run = tmp_path / "run"
    holder = _holder(tmp_path, run)
    try:
        with pytest.raises(RunLockedError, match=rf"{run} is in use by another training run \(pid {holder.pid} on "):
            train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # no config.json, no metrics of its own
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL and (run / "run.lock").exists()  # left behind, unlocked
    result = train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
    assert result["final"]["epoch"] == 1
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


@needs_accelerate
def test_two_runs_in_one_process_conflict_and_the_lock_goes_with_the_run(tmp_path, one_thread):
    """flock locks belong to an open file, not a process: a second Run on the folder in the same process is
    refused too, naming this process. Closing the first (train does it when the run ends, however it ends) frees
    the folder; a run that failed is no holder either."""
    from supermask_fx.training import Run, RunLockedError

    run = tmp_path / "run"
    first = Run(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on .*that is this process"):
        train(tiny_trainable(), tiny_data(), None, quiet(epochs=1, out_dir=run))
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    first.close()
    assert not (run / "run.lock").exists()

    def fail(metrics):
        raise KeyError("a callback that fails")

    with pytest.raises(KeyError):
        train(tiny_trainable(), tiny_data(), None, quiet(epochs=2, out_dir=run), callbacks=[fail])
    result = train(tiny_trainable(), tiny_data(), None, quiet(epochs=2, out_dir=run))  # resumes: not locked
    assert result["resumed_from_epoch"] == 1
