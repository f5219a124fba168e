"""Two real processes on the CPU (torchrun, gloo) through the training engine.

* both ranks hold identical scores, weights, BatchNorm statistics and masks after training;
* the test metrics are gathered over the whole test set exactly once (53 examples, not a multiple of the
  2 x 8 evaluation batch, so the last batch is padded and the padding must be dropped);
* a run killed (SIGKILL on rank 0) after its epoch-2 checkpoint and started again ends with the same masks, state
  and metrics as an uninterrupted run.

Two launches: [the run that gets killed], then [its resumption + the uninterrupted reference run].
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

WORKER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from supermask_fx import gated_layers, popupify
    from supermask_fx.training import TrainConfig, load_checkpoint, make_accelerator, train

    out, mode = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, 3, 8, 8, generator=g)
    y = (x.flatten(1) @ torch.randn(3 * 8 * 8, 4, generator=g)).argmax(1)
    train_set, test_set = TensorDataset(x[:150], y[:150]), TensorDataset(x[150:], y[150:])

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                            nn.Linear(8 * 64, 4, bias=False))
        return popupify(net, 0.5)

    acc = make_accelerator()
    assert acc.num_processes == 2, acc.num_processes
    config = TrainConfig(epochs=3, batch_size=16, lr=0.1, eval_batch_size=8, progress="lines", log_every=0)

    def kill(metrics):
        if metrics["epoch"] == 2 and acc.is_main_process:
            os.kill(os.getpid(), signal.SIGKILL)

    def record(name, net, result):
        torch.save({"state": net.state_dict(),
                    "masks": {gate.name: gate.current_mask(m).clone() for m, gate in gated_layers(net)},
                    "history": result["history"], "resumed": result["resumed_from_epoch"]},
                   os.path.join(out, f"{name}-rank{acc.process_index}.pt"))

    if mode == "kill":
        train(model(), train_set, test_set, config, acc, out_dir=os.path.join(out, "cut"), callbacks=[kill])
        raise SystemExit("not killed")
    assert load_checkpoint(os.path.join(out, "cut", "checkpoint.pt"))["epoch"] == 2
    net = model()
    record("resumed", net, train(net, train_set, test_set, config, acc, out_dir=os.path.join(out, "cut")))
    net = model()
    record("full", net, train(net, train_set, test_set, config, acc, out_dir=os.path.join(out, "full")))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even where a GPU exists
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(
        [*cmd, str(script), str(out), mode], env=env, capture_output=True, text=True, timeout=150, cwd=out
    )


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_cpu_processes_agree_count_once_and_resume_after_a_kill(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    killed = torchrun(script, tmp_path, "kill")
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert "not killed" not in killed.stderr
    log = killed.stdout
    assert log.count("epoch 2 ") == 1, log  # only rank 0 prints; the run died after epoch 2's checkpoint
    assert "epoch 3 " not in log

    finished = torchrun(script, tmp_path, "finish")
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resuming" in finished.stdout

    runs = {(name, r): torch.load(tmp_path / f"{name}-rank{r}.pt") for name in ("full", "resumed") for r in (0, 1)}
    reference = runs["full", 0]
    for (name, rank), got in runs.items():
        for key, value in reference["state"].items():  # scores, weights, BatchNorm statistics
            assert torch.equal(got["state"][key], value), (name, rank, key)
        for key, mask in reference["masks"].items():
            assert torch.equal(got["masks"][key], mask), (name, rank, key)
        assert got["history"][-1]["test_examples"] == 53  # every test example counted exactly once
        strip = [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in got["history"]]
        assert strip == [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in reference["history"]]
    assert runs["resumed", 0]["resumed"] == 2 and runs["full", 0]["resumed"] is None
    assert [m["step"] for m in reference["history"]] == [5, 10, 15]  # 150 examples / 2 ranks / 16 per batch
