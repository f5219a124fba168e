"""The example scripts end to end (small), and their answers to bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from supermask_fx import load_subnetwork, mask_stats  # noqa: E402
from supermask_fx.data import DatasetNotFoundError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args, cwd, timeout=300, **env):
    environment = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    environment.update(OMP_NUM_THREADS="1", **env)  # predictable on a busy machine
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------------------------------------- the main job


@pytest.mark.needs_data("fashion_mnist")
def test_fashion_mnist_quick_finds_saves_and_plots(tmp_path):
    parent = tmp_path / "fm"
    done = run([EXAMPLES / "fashion_mnist.py", "--quick", "--out", parent], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = parent / "conv4-w0.25-quick-seed0-k0.5-e2"  # a folder per setting
    text = done.stdout
    assert "subnetwork of random weights" in text and "learned dense weights" in text
    assert re.search(r"^expected duration: about \d+\.\d min \(edge-popup 2 epochs x 47 steps at", text, re.M)
    # not a terminal: plain progress lines with the time left, no bar
    assert re.search(r"^epoch 1  train_loss .*\(elapsed \d+:\d\d, ETA \d+:\d\d\)$", text, re.M)
    assert "\r" not in text and "%|" not in text
    assert re.search(r"dense weights \(1 epoch, trained in this run\): +\d+\.\d\d %", text)
    bits = r"masks 1\.00 bits per weight; the file 1\.\d\d bits per weight\n +with [\d,]+ bytes of header"
    assert re.search(bits, text)  # k = 0.5: one bit per weight for the masks, the header on top
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] and results["edge_popup_test_top1"] > 0.5  # 10 classes: chance is 0.1 (measured 0.695)
    assert results["reloaded_subnetwork_test_top1"] == results["edge_popup_test_top1"]
    assert results["dense_test_top1"] > 0.5
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "subnetwork.safetensors").stat().st_size == results["subnetwork_bytes"]
    assert str(out / "subnetwork.safetensors") in text and str(out / "accuracy.png") in text

    # another k: a run of its own beside the first, the dense reference reused, nothing refused or deleted
    again = run([EXAMPLES / "fashion_mnist.py", "--quick", "--k", "0.3", "--out", parent], cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    other = json.loads((parent / "conv4-w0.25-quick-seed0-k0.3-e2" / "results.json").read_text())
    assert other["k"] == 0.3 and other["dense_test_top1"] == results["dense_test_top1"]
    assert json.loads((out / "results.json").read_text()) == results


# ---------------------------------------------------------------------------------------------- cifar.py


@pytest.mark.needs_data("mnist")
def test_cifar_script_small_run_in_bf16(tmp_path):
    out = tmp_path / "run"
    args = ["--dataset", "mnist", "--model", "conv2", "--width", "0.25", "--epochs", "1", "--limit", "256"]
    args += [
        "--test-limit",
        "100",
        "--batch-size",
        "64",
        "--mixed-precision",
        "bf16",
        "--out",
        out,
        "--progress",
        "none",
    ]
    done = run([EXAMPLES / "cifar.py", *args], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test top-1" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_examples"] == 100
    assert summary["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    from supermask_fx.models import build_model

    model = load_subnetwork(
        build_model("conv2", in_channels=1, image_size=28, width=0.25), out / "subnetwork.safetensors"
    )
    assert mask_stats(model).fraction == pytest.approx(0.5, abs=0.01)


def test_cifar_recipe_defaults():
    cifar = script("cifar")
    recipe = lambda *a: cifar.recipe(cifar.parser().parse_args(list(a)))  # noqa: E731
    assert recipe("--model", "conv4") == {"lr": 0.1, "batch_size": 128, "weight_decay": 1e-4}
    assert recipe("--model", "resnet18")["weight_decay"] == 5e-4
    assert recipe("--model", "conv2", "--optimizer", "adam") == {"lr": 2e-4, "batch_size": 60, "weight_decay": 0.0}
    assert recipe("--model", "conv6", "--optimizer", "adam")["lr"] == 3e-4
    assert recipe("--model", "conv6", "--lr", "0.05")["lr"] == 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1.5"], "k=1.5 is not a fraction in (0, 1]"),
        (["--k", "0"], "is not a fraction in (0, 1]"),
        (["--model", "conv3"], "invalid choice: 'conv3'"),
        (["--init", "gaussian"], "invalid choice: 'gaussian'"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    ],
)
def test_cifar_script_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script("cifar").main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.needs_data("mnist")
def test_cifar_script_batch_larger_than_data_and_existing_run(tmp_path):
    cifar = script("cifar")
    base = ["--dataset", "mnist", "--model", "fc", "--width", "0.1", "--epochs", "1", "--mixed-precision", "no"]
    base += ["--progress", "none", "--test-limit", "50", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"batch_size=512 is larger than the training set: 100 examples"):
        cifar.main([*base, "--limit", "100", "--batch-size", "512"])
    cifar.main([*base, "--limit", "100", "--batch-size", "50"])
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already exists: pass resume=True \\(or --resume\\)"):
        cifar.main([*base, "--limit", "100", "--batch-size", "50"])
    with pytest.raises(SystemExit, match="batch_size: checkpoint 50, now 25"):  # another setting: refused
        cifar.main([*base, "--limit", "100", "--batch-size", "25", "--resume"])
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved
    again = cifar.main([*base, "--limit", "100", "--batch-size", "50", "--resume"])  # the same one: resumes
    assert again["resumed_from_epoch"] == 1


# ---------------------------------------------------------------------------------------------- imagenet.py


def make_image_folder(root: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 3)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_imagenet_script_end_to_end_on_a_tiny_image_folder(tmp_path):
    pytest.importorskip("datasets")
    pytest.importorskip("torchvision")
    make_image_folder(tmp_path / "images")
    out = tmp_path / "run"
    args = ["--data-dir", tmp_path / "images", "--model", "resnet18", "--epochs", "1", "--image-size", "32"]
    args += ["--batch-size", "4", "--workers", "0", "--out", out, "--progress", "none"]
    done = run([EXAMPLES / "imagenet.py", *args], cwd=tmp_path, HF_DATASETS_CACHE=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "8 train / 6 eval images, 2 classes" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_examples"] == 6 and summary["kept_fraction"] == pytest.approx(0.3, abs=0.01)
    import torchvision

    model = load_subnetwork(torchvision.models.resnet18(num_classes=2), out / "subnetwork.safetensors").eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)
    assert (out / "subnetwork.safetensors").stat().st_size < (out / "checkpoint.pt").stat().st_size / 50


def test_imagenet_script_rejects_unknown_model(tmp_path, capsys):
    pytest.importorskip("torchvision")
    with pytest.raises(SystemExit) as exit_:
        script("imagenet").main(["--model", "resnet1000", "--data-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "unknown torchvision model 'resnet1000'" in capsys.readouterr().err


def test_fashion_mnist_gets_the_data_itself_or_says_what_to_run(monkeypatch, capsys):
    fm = script("fashion_mnist")
    calls, installed = [], []

    def fake_load(name, split, root=None, download=True, limit=None):
        if installed or (download and "download works" in calls):
            return f"{split} split"
        raise DatasetNotFoundError("not found")

    def fake_run(cmd, check=False):
        calls.append(" ".join(cmd))
        if cmd[:2] == ["apt-get", "install"]:
            installed.append(True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fm, "load_dataset", fake_load)
    monkeypatch.setattr(fm.subprocess, "run", fake_run)
    monkeypatch.setattr(fm, "_can_apt", lambda: True)
    with pytest.raises(SystemExit):
        fm.get_data(None, allow_install=False)  # no --install-data: nothing is installed, whoever runs it
    assert calls == []
    assert fm.get_data(None, allow_install=True) == ("train split", "test split")  # --install-data as root: installs
    assert calls == ["apt-get update", "apt-get install -y dataset-fashion-mnist"]

    installed.clear()
    calls.clear()
    monkeypatch.setattr(fm, "_can_apt", lambda: False)  # not root: no apt-get; the download fails too
    with pytest.raises(SystemExit) as exit_:
        fm.get_data(None, allow_install=True)
    message = str(exit_.value)
    assert calls == []
    assert "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" in message
    assert "pip install torchvision" in message and "--data-dir DIR" in message
