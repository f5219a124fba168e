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
    assert results["quick"] and results["edge_popup_test_top1"] > 0.5  # 10 classes: chance is 0.1 (measured 0.688)
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
def test_cifar_script_batch_larger_than_data_and_existing_run(tmp_path, monkeypatch, capsys):
    cifar = script("cifar")
    base = ["--dataset", "mnist", "--model", "fc", "--width", "0.1", "--epochs", "1", "--mixed-precision", "no"]
    base += ["--test-limit", "50", "--out", str(tmp_path / "run")]
    quiet = ["--progress", "none"]
    with pytest.raises(SystemExit, match=r"batch_size=512 is larger than the training set: 100 examples"):
        cifar.main([*base, *quiet, "--limit", "100", "--batch-size", "512"])
    first = cifar.main([*base, "--progress", "lines", "--limit", "100", "--batch-size", "50"])
    assert first["resumed_from_epoch"] is None
    # the epoch's line gives the learning rate of its first step and after its last (cosine over 2 steps: to 0)
    assert re.search(r"^epoch 1  .*  lr 0\.1000->0\.0000  ", capsys.readouterr().out, re.M)
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    again = cifar.main([*base, *quiet, "--limit", "100", "--batch-size", "50"])  # the same command: continues
    assert again["resumed_from_epoch"] == 1 and "is complete (1 epochs)" in capsys.readouterr().out

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the run folder was checked")

    monkeypatch.setattr(cifar, "load_dataset", no_data)
    with pytest.raises(SystemExit) as exit_:  # another setting: refused at once, naming it
        cifar.main([*base, *quiet, "--limit", "100", "--batch-size", "25"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--batch-size 50 there, 25 now" in err and "another --out" in err
    with pytest.raises(SystemExit) as exit_:
        cifar.main([*base, *quiet, "--limit", "100", "--batch-size", "50", "--out", str(tmp_path / "new"), "--resume"])
    assert exit_.value.code == 2 and "holds no checkpoint to continue" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved


def test_every_limit_is_the_same_seeded_random_subset_in_every_help_and_the_docs():
    from supermask_fx.data.subset import LIMIT_HELP

    flat = lambda text: " ".join(text.split())  # noqa: E731
    for name in ("cifar", "fashion_mnist", "imagenet"):
        helped = flat(script(name).parser().format_help())
        assert f"--limit LIMIT {LIMIT_HELP}" in helped, name
        assert "first N" not in helped, name
    assert f"--limit N`: {LIMIT_HELP}" in flat((REPO / "docs" / "training.md").read_text())


def test_fashion_mnist_help_names_only_flags_that_exist():
    fm = script("fashion_mnist")
    p = fm.parser()
    helped = p.format_help()
    flags = {option for action in p._actions for option in action.option_strings}
    assert "--progress" in flags and "train-limit" not in helped and "test-limit" not in helped
    assert set(re.findall(r"--[a-z][a-z-]+", helped)) <= flags
    assert fm.parse_args(["--quick", "--progress", "lines"]).progress == "lines"


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
    args += ["--batch-size", "4", "--workers", "0", "--out", out, "--progress", "lines"]
    done = run([EXAMPLES / "imagenet.py", *args], cwd=tmp_path, HF_DATASETS_CACHE=str(tmp_path / "hf"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "8 train / 6 eval images, 2 classes" in done.stdout
    assert "fp32 on cpu" in done.stdout and "no precision" not in done.stdout
    assert "1 epoch(s) (0.2 of warm-up)" in done.stdout  # at most a fifth of the run
    assert re.search(r"^epoch 1  .*  lr \d\.\d{4}->0\.0000  ", done.stdout, re.M)  # first step's rate -> the end's
    # a local folder: no download or progress chatter from datasets
    assert "Downloading" not in done.stderr and "Generating" not in done.stderr and "%|" not in done.stderr
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


def test_imagenet_without_data_says_what_is_missing_in_a_few_lines(monkeypatch, capsys):
    imagenet = script("imagenet")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    with pytest.raises(SystemExit) as exit_:
        imagenet.main([])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    lines = err.strip().splitlines()
    assert 3 <= len(lines) <= 8 and "usage:" not in err and lines[0].startswith("imagenet.py: error: no data")
    assert "--data-dir DIR/train/<class>/" not in err and "DIR/train/<class>/*.JPEG" in err
    assert "--dataset ILSVRC/imagenet-1k" in err and imagenet.TINY in err and "--help" in err
    # under `accelerate launch`, which repeats a child's stderr in its own traceback: said once, on stdout
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")
    with pytest.raises(SystemExit) as exit_:
        imagenet.main([])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and err == "" and out.count("no data") == 1 and "accelerate launch -q" in out


def test_imagenet_help_shows_how_to_start():
    from supermask_fx.training.runlog import RESUME_HELP

    imagenet = script("imagenet")
    helped = imagenet.parser().format_help()
    flat = " ".join(helped.split())
    assert imagenet.TINY in helped and "ILSVRC2012_img_train.tar" in helped and "ILSVRC/imagenet-1k" in helped
    assert "--max-steps" in helped and "--workers WORKERS DataLoader workers per process (default" in flat
    assert RESUME_HELP in flat


def test_imagenet_warmup_is_at_most_a_fifth_of_the_run():
    imagenet = script("imagenet")
    for argv, epochs, warmup in (
        ([], 100, 5.0),
        (["--epochs", "5"], 5, 1.0),
        (["--epochs", "1"], 1, 0.2),
        (["--epochs", "5", "--warmup-epochs", "3"], 5, 3.0),  # given: as given
        (["--max-steps", "10"], 1, 0.2),
    ):
        args = imagenet.parser().parse_args(["--data-dir", "x", *argv])
        imagenet.plan(args)
        assert (args.epochs, args.warmup_epochs) == (epochs, warmup), argv


def make_sorted_folder(root: Path, classes: int = 4, per_class: int = 6) -> None:
    """An image folder whose classes come one after another, as every image folder's files do."""
    from PIL import Image

    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (c, i, 0)).save(root / split / f"class{c}" / f"{i:03d}.png")


def test_imagenet_limit_draws_from_several_classes_the_same_every_time(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("torchvision")
    import contextlib
    import types

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    make_sorted_folder(tmp_path / "images")
    imagenet = script("imagenet")
    args = imagenet.parser().parse_args(["--data-dir", str(tmp_path / "images"), "--limit", "8"])
    accelerator = types.SimpleNamespace(main_process_first=contextlib.nullcontext)

    def drawn(seed):
        args.seed = seed
        train_set, _, classes = imagenet.load_splits(args, accelerator, args.limit)
        assert len(train_set) == 8 and len(classes) == 4
        return [(row["label"], row["image"].getpixel((0, 0))) for row in train_set.ds]

    first = drawn(0)
    assert len({label for label, _ in first}) >= 3  # the first 8 files would be 6 of class 0 and 2 of class 1
    assert drawn(0) == first and drawn(1) != first  # the same 8 with the same seed


def test_imagenet_refuses_a_folder_of_other_settings_before_loading_data(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    imagenet = script("imagenet")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a checkpoint")  # only its presence matters here
    from supermask_fx.training.runlog import write_run_settings

    args = imagenet.parser().parse_args(["--data-dir", str(tmp_path), "--model", "resnet18", "--batch-size", "4"])
    imagenet.plan(args)
    args.lr = 0.004
    write_run_settings(out, {**{key: getattr(args, key) for key in imagenet.RESULT_SETTINGS}, "k": 0.5})

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the run folder was checked")

    monkeypatch.setattr(imagenet, "load_splits", no_data)
    argv = ["--data-dir", str(tmp_path), "--model", "resnet18", "--batch-size", "4", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        imagenet.main([*argv, "--progress", "none"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--k 0.5 there, 0.3 now" in err and "another --out" in err
    assert err.count("there,") == 1  # only the setting that differs


def test_imagenet_max_steps_is_a_quick_look(tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("torchvision")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    make_sorted_folder(tmp_path / "images", classes=2, per_class=8)
    imagenet = script("imagenet")
    argv = ["--data-dir", str(tmp_path / "images"), "--model", "resnet18", "--image-size", "16", "--batch-size", "2"]
    argv += ["--workers", "0", "--mixed-precision", "no", "--progress", "none", "--out", str(tmp_path / "run")]
    summary = imagenet.main([*argv, "--max-steps", "3"])
    assert summary["final_step"] == 3 and summary["final_epoch"] == 1  # 3 steps of 2 images: 6 of the 16
    assert "6 train / 2 eval images" in capsys.readouterr().out
    again = imagenet.main([*argv, "--max-steps", "3"])  # the same command again: the finished run, reported
    assert again["final_step"] == 3 and "is complete (1 epoch(s))" in capsys.readouterr().out


def test_fashion_mnist_gets_the_data_itself_or_says_what_to_run(monkeypatch, capsys):
    fm = script("fashion_mnist")
    calls, installed = [], []

    def fake_load(name, split, root=None, download=True):
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


# ---------------------------------------------------------------------------------------------- the LLM example

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llm_masks(folder: Path) -> dict:
    from safetensors import safe_open

    (path,) = folder.glob("*.safetensors")
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys() if key.startswith("mask/")}


def test_llm_example_learns_and_writes_a_loadable_subnetwork(tmp_path):
    pytest.importorskip("transformers")
    out = run([EXAMPLES / "llm.py", "--steps", "40", "--out", tmp_path], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    before = float(re.search(r"held-out loss before: ([\d.]+)", out.stdout).group(1))
    after = float(re.search(r"held-out loss after: ([\d.]+)", out.stdout).group(1))
    assert after < before - 1.0  # bytes of text: far below the untrained model's loss
    llm = script("llm")
    (path,) = tmp_path.glob("*.safetensors")
    fresh = llm.build(llm.parse_args([]))  # popupified: load_subnetwork checks it has the file's config
    model = load_subnetwork(fresh, path)
    assert mask_stats(model).fraction == pytest.approx(0.5, abs=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="needs torchrun")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "fsdp_global", "ddp_dense", "fsdp_dense"])
def test_llm_example_on_two_ranks_finds_the_masks_of_one_process(tmp_path, parallel):
    """Two CPU ranks (gloo) on the halves of each batch: the same subnetwork file as one process on whole batches
    (5 steps: few enough that float rounding of the averaged gradient flips no mask bit here); with the default
    sign-bit weights and with ``--weight-storage dense`` (float weights) on both sides."""
    pytest.importorskip("transformers")
    scope = ["--scope", "global"] if parallel.endswith("global") else []
    scope += ["--weight-storage", "dense"] if parallel.endswith("dense") else []
    parallel = parallel.removesuffix("_global").removesuffix("_dense")
    single = run([EXAMPLES / "llm.py", "--steps", "5", *scope, "--out", tmp_path / "one"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    two = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(EXAMPLES / "llm.py"),
         "--parallel", parallel, "--steps", "5", *scope, "--out", str(tmp_path / "two")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _llm_masks(tmp_path / "one"), _llm_masks(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_examples_take_every_method_with_its_options():
    from supermask_fx import PopupConfig
    from supermask_fx.methods import registered_methods
    from supermask_fx.training import popup_options

    cifar = script("cifar")
    args = cifar.parser().parse_args(
        ["--method", "iterand", "--option", "rerand_freq=50", "--option", "rerand_lambda=0.2", "--scope", "global"]
    )
    options = popup_options(args)
    assert options == {
        "method": "iterand",
        "method_options": {"rerand_freq": 50, "rerand_lambda": 0.2},
        "scope": "global",
    }
    assert PopupConfig(0.5, **options).make_method().options.rerand_freq == 50
    for method in registered_methods():
        assert cifar.parser().parse_args(["--method", method]).method == method
    with pytest.raises(ValueError, match="NAME=VALUE"):
        popup_options(cifar.parser().parse_args(["--option", "coats"]))
    assert popup_options(cifar.parser().parse_args(["--weight-storage", "bits"]))["weight_storage"] == "bits"
    assert "option" in cifar.RESULT_SETTINGS and "k_warmup_epochs" in script("imagenet").RESULT_SETTINGS
