"""Find a subnetwork hidden in a randomly weighted network, on Fashion-MNIST, in under 5 minutes on 2 CPU cores.

    python examples/fashion_mnist.py            # the full run (3 to 4 minutes on 2 idle CPU cores; it says)
    python examples/fashion_mnist.py --quick    # a smoke run on a small subset (under a minute)

What it does:

1. gets Fashion-MNIST (the Debian package ``dataset-fashion-mnist``, installed with apt-get when running as root;
   else a torchvision download; else it says what to run);
2. builds a small convolutional network, draws its weights at random (signed constant) and freezes them, then
   learns which half of the weights to keep in every layer (edge-popup, k = 0.5): no weight ever changes;
3. trains the same architecture the usual way (learned dense weights) as the reference;
4. prints both test accuracies, saves the found subnetwork as a compact file (masks at most 1 bit per weight),
   checks that the file reloads to the same accuracy, and draws accuracy per epoch into a PNG.

Every epoch is checkpointed: if the run is interrupted, the same command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

try:
    import supermask_fx  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from supermask_fx import load_subnetwork, mask_stats, popupify, save_subnetwork
from supermask_fx.data import DatasetNotFoundError, load_dataset, random_subset
from supermask_fx.data.subset import LIMIT_HELP
from supermask_fx.models import build_model
from supermask_fx.training import (
    CheckpointMismatchError,
    TrainConfig,
    batched,
    evaluate,
    make_accelerator,
    read_metrics,
    train,
)
from supermask_fx.training.config import PROGRESS_CHOICES
from supermask_fx.training.runlog import RESUME_HELP, check_run_folder

# The full run: Conv4 at width 0.25 (16-16-32-32 channels, FC 64-64-10), edge-popup 4 epochs, dense 2 epochs:
# about 5.6 minutes of one core's CPU time (measured), so 3 to 4 minutes with the two threads an idle 2-core machine
# gets, and within a point of the dense weights (docs/training.md, "The examples").
FULL = {"model": "conv4", "width": 0.25, "epochs": 4, "dense_epochs": 2, "train_limit": None, "test_limit": None}
QUICK = {"model": "conv4", "width": 0.25, "epochs": 2, "dense_epochs": 1, "train_limit": 6000, "test_limit": 1000}
_ALL_THREADS = torch.get_num_threads()  # torch's default: one per core
APT = ["apt-get", "install", "-y", "dataset-fashion-mnist"]
TIMED_STEPS = 6  # optimizer steps timed per part for the expected duration


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"resuming: {RESUME_HELP} Each setting gets its own run folder under --out, so other settings never "
        "meet a run's folder; --fresh retrains.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a 1-minute smoke run: {QUICK['train_limit']:,} training and {QUICK['test_limit']:,} test images drawn "
        f"at random with --seed, {QUICK['epochs']} edge-popup and {QUICK['dense_epochs']} dense epochs (flags given "
        "with it win)",
    )
    p.add_argument(
        "--model", choices=("fc", "conv2", "conv4", "conv6", "conv8", "resnet18"), default=FULL["model"], help="network"
    )
    p.add_argument("--width", type=float, default=FULL["width"], help="width multiplier of the network")
    p.add_argument("--k", type=float, default=0.5, help="fraction of weights kept per layer")
    p.add_argument("--epochs", type=int, default=FULL["epochs"], help="edge-popup epochs")
    p.add_argument(
        "--dense-epochs",
        type=int,
        default=FULL["dense_epochs"],
        help="epochs of the learned-dense reference (0: skip it)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights, the data order and the random subsets"
    )
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files; none: search the usual places")
    p.add_argument(
        "--install-data",
        action="store_true",
        help="if the data is missing and you are root on Debian/Ubuntu, install the package "
        "dataset-fashion-mnist with apt-get (never done without this flag)",
    )
    p.add_argument(
        "--out",
        default="runs/fashion_mnist",
        help="parent folder; each setting (model, width, k, epochs, seed, ...) gets its own run folder",
    )
    p.add_argument("--fresh", action="store_true", help="discard an earlier run of the same settings and retrain")
    p.add_argument("--limit", type=int, help=LIMIT_HELP)
    p.add_argument("--threads", type=int, help="CPU threads; none: all, or 1 if the machine is busy (measured)")
    p.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_CHOICES,
        help="auto: a progress bar with elapsed time and ETA when stdout is a terminal, else log lines with the ETA "
        "(every 100 steps and per epoch); bar, lines, or none",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit} must be positive")
    if args.quick:  # the preset overrides only what was not given on the command line
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in QUICK.items():
            if key in ("model", "width", "epochs", "dense_epochs") and f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
    return args


def run_folders(args, out: Path) -> dict[str, Path]:
    """One folder per setting that changes a result, so runs with other options sit side by side."""
    data = ("-quick" if args.quick else "") + (f"-limit{args.limit}" if args.limit else "")
    base = f"{args.model}-w{args.width:g}{data}-seed{args.seed}"
    return {
        "edge_popup": out / f"{base}-k{args.k:g}-e{args.epochs}",
        "dense": out / f"{base}-dense-e{args.dense_epochs}",
    }


# ----------------------------------------------------------------------------------------------- data


def get_data(data_dir, allow_install: bool):
    """Fashion-MNIST train and test splits: local files, else apt-get (as root), else a torchvision download."""

    def load(download: bool):
        return (
            load_dataset("fashion_mnist", "train", root=data_dir, download=download),
            load_dataset("fashion_mnist", "test", root=data_dir, download=download),
        )

    try:
        return load(download=False)
    except DatasetNotFoundError:
        pass
    if allow_install and data_dir is None and _can_apt():  # only with --install-data
        print("Fashion-MNIST is not installed; installing it: apt-get update && " + " ".join(APT), flush=True)
        ok = subprocess.run(["apt-get", "update"], check=False).returncode == 0
        ok = ok and subprocess.run(APT, check=False).returncode == 0
        if ok:
            try:
                return load(download=False)
            except DatasetNotFoundError:
                pass
        print("apt-get did not provide Fashion-MNIST; trying a torchvision download", flush=True)
    else:
        hint = " (or rerun with --install-data to install Debian's package)" if _can_apt() else ""
        print(f"Fashion-MNIST not found locally; trying a torchvision download{hint}", flush=True)
    try:
        return load(download=True)
    except DatasetNotFoundError as error:
        raise SystemExit(
            "Fashion-MNIST is not on this machine and could not be fetched. Do one of:\n"
            "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist   (Debian/Ubuntu)\n"
            "  pip install torchvision, then run this again while online   (downloads to ~/.cache/supermask_fx/data)\n"
            "  python examples/fashion_mnist.py --data-dir DIR   (DIR holding train-images-idx3-ubyte.gz,\n"
            "      train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)\n\n"
            f"Details:\n{error}"
        ) from None


def _can_apt() -> bool:
    return os.name == "posix" and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def pick_threads(requested: int | None, reset: bool = False) -> str:
    """Set torch's intra-op threads: ``requested``, or whichever of all / one runs a small convolution faster.

    On an idle machine all cores win (about 1.8x on 2 cores). On a busy one (other jobs on every core) threads
    wait for each other: steps of these small networks then run 4 to 20 times slower with 2 threads than with 1.
    """
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} (--threads)"
    if os.environ.get("OMP_NUM_THREADS") or _ALL_THREADS == 1 or (torch.get_num_threads() == 1 and not reset):
        return f"{torch.get_num_threads()}"
    g = torch.Generator().manual_seed(0)  # not the global stream: a resumed run must see the same random numbers
    x, w = torch.randn(64, 16, 28, 28, generator=g), torch.randn(16, 16, 3, 3, generator=g)

    def timed(threads: int) -> float:
        torch.set_num_threads(threads)
        with torch.no_grad():
            torch.nn.functional.conv2d(x, w, padding=1)
            start = time.perf_counter()
            for _ in range(6):
                torch.nn.functional.conv2d(x, w, padding=1)
            return time.perf_counter() - start

    most = _ALL_THREADS
    t_most, t_one = timed(most), timed(1)
    if t_one < 0.8 * t_most:
        torch.set_num_threads(1)
        return f"1 (the machine is busy: one thread ran a test convolution {t_most / t_one:.1f}x faster than {most})"
    torch.set_num_threads(most)
    return f"{most}"


# ----------------------------------------------------------------------------------------------- runs


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def say(message: str) -> None:
    """Print a line; above the progress bar if one is drawn."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def build(args, method: str) -> torch.nn.Module:
    model = build_model(args.model, dataset="fashion_mnist", width=args.width)  # 1x28x28 inputs, 10 classes
    if method == "dense":  # the reference: same architecture, usual initialisation, weights learned
        return popupify(model, 1.0, method="dense", init="kaiming_normal", seed=args.seed)
    return popupify(model, args.k, method="edge_popup", init="signed_constant", seed=args.seed)


def recheck_threads(args):
    """After each epoch: measure again (other jobs may have started or stopped) unless --threads was given."""
    last = [torch.get_num_threads()]

    def callback(metrics) -> None:
        if args.threads:
            return
        choice = pick_threads(None, reset=True)
        if torch.get_num_threads() != last[0]:
            say(f"threads: {choice}")
            last[0] = torch.get_num_threads()

    return callback


def make_config(args, method: str, epochs: int, folder: Path) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=128,
        lr=0.1 if method == "edge_popup" else 0.01,  # the dense net has no normalisation: 0.1 diverges
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        seed=args.seed,
        out_dir=folder,
        resume="auto",
        progress=args.progress,
        log_every=100,
    )


def run(args, train_set, test_set, accelerator, method: str, epochs: int, folder: Path) -> dict:
    model = build(args, method)
    config = make_config(args, method, epochs, folder)
    try:
        result = train(model, train_set, test_set, config, accelerator, callbacks=[recheck_threads(args)])
    except CheckpointMismatchError as error:
        raise SystemExit(
            f"error: {error}\nTo keep that run and start this one elsewhere: "
            f"python examples/fashion_mnist.py {' '.join(sys.argv[1:])} --out runs/fashion_mnist_2"
        ) from None
    if result["resumed_from_epoch"] == epochs:
        print(f"(this part was already complete in {config.out_dir}; pass --fresh to train again)")
    result["model"] = model
    return result


def estimate(args, train_set, test_set, parts: dict[str, tuple[int, Path]]) -> str | None:
    """The expected duration of what is left to train, from a few optimizer steps of each part timed now.

    Throwaway copies of the networks run ``TIMED_STEPS`` steps on real batches (after two to warm up) and one
    evaluation batch; the runs themselves are untouched. Epochs already in a run folder are not counted. A machine
    busy with other jobs makes the estimate, and the run, slower; an idle one can make the start slower than the rest.
    """
    batch = 128
    steps_per_epoch = math.ceil(len(train_set) / batch)
    x, y = train_set.get_batch(slice(0, batch))
    xe, _ = test_set.get_batch(slice(0, 2 * batch))
    total, words = 0.0, []
    for method, (epochs, folder) in parts.items():
        done = len(read_metrics(folder / "metrics.jsonl")) if (folder / "checkpoint.pt").is_file() else 0
        left = max(0, epochs - done)
        if left == 0:
            continue
        model = build(args, method)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for i in range(2 + TIMED_STEPS):
            if i == 2:
                start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        step = (time.perf_counter() - start) / TIMED_STEPS
        model.eval()
        with torch.no_grad():
            start = time.perf_counter()
            model(xe)
            per_test_image = (time.perf_counter() - start) / len(xe)
        seconds = left * (steps_per_epoch * step + len(test_set) * per_test_image)
        total += seconds
        name = "edge-popup" if method == "edge_popup" else "dense"
        words.append(f"{name} {plural(left, 'epoch')} x {steps_per_epoch} steps at {1000 * step:.0f} ms")
    if not words:
        return None
    total += 2 * len(test_set) * per_test_image + 5  # the reload check, the plot, saving
    return (
        f"expected duration: about {total / 60:.1f} min ({'; '.join(words)}, evaluation included; "
        f"timed on {TIMED_STEPS} steps each, {plural(torch.get_num_threads(), 'thread')})"
    )


def plot(path: Path, runs: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {
        "edge_popup": ("tab:blue", "edge-popup: random weights, learned mask"),
        "dense": ("tab:gray", "learned dense weights"),
    }
    counts = {method: len(result["history"]) for method, result in runs.items()}
    for method, result in runs.items():
        color, label = styles[method]
        label += f", {plural(counts[method], 'epoch')}"
        if method == "dense" and counts[method] < counts.get("edge_popup", 0):
            label += f" (fewer than edge-popup's {counts['edge_popup']})"
        epochs = [m["epoch"] for m in result["history"]]
        ax.plot(epochs, [100 * m["test_top1"] for m in result["history"]], "o-", color=color, label=f"{label} (test)")
        ax.plot(epochs, [100 * m["train_top1"] for m in result["history"]], ":", color=color, label=f"{label} (train)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    preset = QUICK if args.quick else FULL
    folders = run_folders(args, Path(args.out))
    out = folders["edge_popup"]  # the summary, plot and subnetwork file go with the edge-popup run
    if args.fresh:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    parts = {"edge_popup": (args.epochs, folders["edge_popup"])}
    if args.dense_epochs > 0:
        parts["dense"] = (args.dense_epochs, folders["dense"])
    for method, (epochs, folder) in parts.items():  # before any data is read
        try:
            check_run_folder(folder, config=make_config(args, method, epochs, folder))
        except CheckpointMismatchError as error:
            raise SystemExit(f"error: {error}") from None
    t_start = time.perf_counter()
    threads = pick_threads(args.threads)

    train_set, test_set = get_data(args.data_dir, args.install_data)
    full = len(train_set), len(test_set)
    train_set = random_subset(train_set, args.limit or preset["train_limit"], args.seed)
    test_set = random_subset(test_set, preset["test_limit"], args.seed)
    subset = "" if (len(train_set), len(test_set)) == full else " (drawn at random with --seed)"
    print(
        f"data: {train_set.display_name}, {len(train_set)} training / {len(test_set)} test images{subset}, "
        f"from {train_set.source}"
    )
    print(f"threads: {threads}")
    expected = estimate(args, train_set, test_set, parts)
    print(expected or "both parts are already trained in their run folders: reporting them (--fresh retrains)")
    accelerator = make_accelerator()
    name = f"{args.model}" + (f" (width {args.width:g})" if args.width != 1 else "")

    runs = {}
    print(
        f"\n[1/2] edge-popup on {name}: weights random and frozen (signed constant), "
        f"learning which {args.k:.0%} to keep"
    )
    runs["edge_popup"] = run(args, train_set, test_set, accelerator, "edge_popup", args.epochs, folders["edge_popup"])
    if args.dense_epochs > 0:
        print(f"\n[2/2] reference: the same {name} with learned dense weights")
        runs["dense"] = run(args, train_set, test_set, accelerator, "dense", args.dense_epochs, folders["dense"])

    model = runs["edge_popup"]["model"]
    subnet_path = out / "subnetwork.safetensors"
    size = save_subnetwork(model, subnet_path)
    stats = mask_stats(model)
    # reload the file into a freshly built network: the same random weights come back from the seed
    fresh = build_model(args.model, dataset="fashion_mnist", width=args.width)
    reloaded = load_subnetwork(fresh, subnet_path).eval()
    loader = accelerator.prepare_data_loader(
        torch.utils.data.DataLoader(batched(test_set), batch_size=1000, collate_fn=_collate)
    )
    reloaded_top1 = evaluate(reloaded, loader, accelerator, (1,))["test_top1"]

    png = out / "accuracy.png"
    plot(png, runs, f"Fashion-MNIST, {name}, k = {args.k:g}")
    elapsed = time.perf_counter() - t_start

    found = runs["edge_popup"]["final"]["test_top1"]
    summary = {
        "model": args.model,
        "width": args.width,
        "k": args.k,
        "edge_popup_epochs": args.epochs,
        "edge_popup_test_top1": found,
        "reloaded_subnetwork_test_top1": reloaded_top1,
        "dense_epochs": args.dense_epochs,
        "dense_test_top1": runs["dense"]["final"]["test_top1"] if "dense" in runs else None,
        "kept_weights": stats.kept,
        "total_weights": stats.numel,
        "subnetwork_file": str(subnet_path),
        "subnetwork_bytes": size,
        "subnetwork_mask_bytes": file_parts(subnet_path)["mask"],
        "accuracy_png": str(png),
        "wall_time_s": round(elapsed, 1),
        "quick": bool(args.quick),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n" + "=" * 78)
    print(f"Fashion-MNIST test accuracy, {name}, {stats.numel:,} weights:")
    rows = [
        (
            f"subnetwork of random weights (edge-popup, {plural(args.epochs, 'epoch')}, "
            f"{stats.kept:,} kept = {stats.fraction:.0%})",
            found,
        )
    ]
    if "dense" in runs:
        rows.append(
            (
                f"same network, learned dense weights ({plural(args.dense_epochs, 'epoch')}, trained in this run)",
                runs["dense"]["final"]["test_top1"],
            )
        )
    rows.append(("the subnetwork file reloaded into a fresh network", reloaded_top1))
    width = max(len(label) for label, _ in rows) + 1
    for label, accuracy in rows:
        print(f"  {label + ':':<{width}} {100 * accuracy:6.2f} %")
    parts = file_parts(subnet_path)
    rest = [f"{parts['header']:,} bytes of header (layer names, shapes, checksums)"]
    if parts["state"]:
        rest.append(f"{parts['state']:,} bytes of BatchNorm statistics and other stored state")
    print(f"subnetwork file:  {subnet_path}  ({size:,} bytes)")
    print(
        f"                  masks {8 * parts['mask'] / stats.numel:.2f} bits per weight; the file "
        f"{8 * size / stats.numel:.2f} bits per weight\n                  with {' and '.join(rest)}\n"
        "                  (a fixed cost: negligible on a large network)"
    )
    print(f"accuracy plot:    {png}")
    print(
        f"per-epoch logs:   {folders['edge_popup'] / 'metrics.jsonl'}"
        + (f", {folders['dense'] / 'metrics.jsonl'}" if "dense" in runs else "")
    )
    print(f"checkpoints:      {folders['edge_popup'] / 'checkpoint.pt'} (the same command continues; --fresh retrains)")
    print(f"summary:          {out / 'results.json'}")
    print(f"wall time:        {elapsed / 60:.1f} min")
    if args.quick:
        print(
            f"(--quick: {len(train_set):,} training images, {args.epochs} + {args.dense_epochs} epochs: "
            "accuracies far below the full run's)"
        )
    return summary


def file_parts(path: Path) -> dict[str, int]:
    """Bytes of a subnetwork file: ``mask`` (the masks), ``state`` (stored tensors such as BatchNorm statistics)
    and ``header`` (the safetensors header: JSON with the layer list, the config and the checksums)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    parts = {"mask": 0, "state": 0, "header": 8 + length}
    for key, entry in header.items():
        if key != "__metadata__":
            begin, end = entry["data_offsets"]
            parts["mask" if key.startswith("mask/") else "state"] += end - begin
    return parts


def _collate(batch):
    from supermask_fx.training.data import collate

    return collate(batch)


if __name__ == "__main__":
    main()
