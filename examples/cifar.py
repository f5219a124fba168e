"""The paper's CIFAR-10 experiments (and the same on Fashion-MNIST / MNIST), one run per call.

    python examples/cifar.py --model conv4 --k 0.5 --init signed_constant --scaled
    python examples/cifar.py --model resnet18 --width 0.5 --epochs 100
    python examples/cifar.py --model conv2 --method dense --optimizer adam          # the paper's Adam baseline
    accelerate launch examples/cifar.py --model resnet18                            # several GPUs
    torchrun --nproc_per_node 2 examples/cifar.py --model conv2 --limit 2000 --epochs 2   # two CPU processes

Recipe (Ramanujan et al. 2020, Section 4 and their code): SGD, lr 0.1, momentum 0.9, weight decay 1e-4
(5e-4 for ResNet-18, as in the authors' configs), batch 128, cosine schedule over 100 epochs, random crop
(padding 4) and horizontal flip on CIFAR-10. ``--optimizer adam``: the Adam baselines of Frankle & Carbin that the
paper compares with: batch 60, lr 2e-4 for Conv2, 3e-4 otherwise, no weight decay. The learned dense baseline
(``--method dense``) of these normalisation-free networks diverges at lr 0.1: with SGD it defaults to lr 0.01.
Every explicit flag overrides the recipe. A run writes into ``--out`` (checkpoint.pt after every epoch,
metrics.jsonl, config.json, settings.json) and, at the end, the compact subnetwork file. The same command run
again continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

try:
    import supermask_fx  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from supermask_fx import INITIALIZERS, PopupConfig, mask_stats, popupify, save_subnetwork
from supermask_fx.data import DatasetFormatError, DatasetNotFoundError, load_dataset, random_subset
from supermask_fx.data.subset import LIMIT_HELP, TEST_LIMIT_HELP
from supermask_fx.models import MODEL_NAMES, build_model
from supermask_fx.training import (
    METHOD_SETTINGS,
    CheckpointError,
    CheckpointMismatchError,
    RandomCropFlip,
    TrainConfig,
    add_method_arguments,
    add_progress_argument,
    make_accelerator,
    popup_options,
    train,
)
from supermask_fx.training.runlog import RESUME_HELP, check_run_folder, write_run_settings

DATASETS = ("cifar10", "fashion_mnist", "mnist")
# The flags that change what a run computes: a run folder continues only with the same ones.
RESULT_SETTINGS = (
    "dataset",
    "model",
    "width",
    *METHOD_SETTINGS,
    "init",
    "scaled",
    "k",
    "seed",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "label_smoothing",
    "warmup_epochs",
    "epochs",
    "no_augment",
    "limit",
    "test_limit",
    "mixed_precision",
)


def parser() -> argparse.ArgumentParser:
    epilog = "resuming:\n" + textwrap.fill(RESUME_HELP, 116, initial_indent="  ", subsequent_indent="  ")
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=epilog, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--model", default="conv4", choices=MODEL_NAMES, help="network (default conv4)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier (default 1)")
    add_method_arguments(p)
    p.add_argument(
        "--init",
        choices=tuple(INITIALIZERS),
        help="weight distribution (default signed_constant; kaiming_normal for dense)",
    )
    p.add_argument("--scaled", action="store_true", help="scale the weight std by sqrt(1/k) (the paper's Sec. 4.5)")
    p.add_argument("--k", type=float, default=0.5, help="fraction of weights kept per layer (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, scores and data order (default 0)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="default sgd")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, help="default 1e-4 (5e-4 resnet18; 0 with adam)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 128; 60 with adam)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="default 0")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up epochs (default 0)")
    p.add_argument("--epochs", type=int, default=100, help="default 100")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help="default cifar10")
    p.add_argument(
        "--data-dir", help="folder with the data set files (default: search the usual places, then download)"
    )
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing data set")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip on CIFAR-10")
    p.add_argument("--limit", type=int, help=LIMIT_HELP)
    p.add_argument("--test-limit", type=int, help=TEST_LIMIT_HELP)
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"), help="default auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0: data is in memory)")
    p.add_argument("--out", help="run folder (default runs/cifar/<dataset>-<model>-...)")
    p.add_argument("--resume", action="store_true", help="only continue: stop if --out holds no checkpoint")
    add_progress_argument(p)
    return p


def recipe(args) -> dict:
    """The paper's hyper-parameters for these arguments (explicit flags win)."""
    if args.optimizer == "adam":
        lr = 2e-4 if args.model == "conv2" else 3e-4
        batch, wd = 60, 0.0
    else:
        lr = 0.01 if args.method == "dense" else 0.1
        batch, wd = 128, 5e-4 if args.model == "resnet18" else 1e-4
    return {
        "lr": args.lr if args.lr is not None else lr,
        "batch_size": args.batch_size if args.batch_size is not None else batch,
        "weight_decay": args.weight_decay if args.weight_decay is not None else wd,
    }


def run_name(args) -> str:
    parts = [args.dataset, args.model + (f"w{args.width:g}" if args.width != 1 else ""), args.method]
    if args.method != "dense":
        parts += [f"k{args.k:g}", args.init + ("-scaled" if args.scaled else "")]
    parts += [args.optimizer, f"s{args.seed}"]
    return "-".join(parts)


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.init is None:
        args.init = "kaiming_normal" if args.method == "dense" else "signed_constant"
    try:  # validate k / init / seed before anything slow
        PopupConfig(
            k=args.k if args.method != "dense" else 1.0,
            init=args.init,
            scaled=args.scaled,
            seed=args.seed,
            **popup_options(args),
        )
    except ValueError as error:
        p.error(str(error))
    if args.width <= 0:
        p.error(f"--width {args.width:g} must be positive")
    for flag, value in (("--limit", args.limit), ("--test-limit", args.test_limit)):
        if value is not None and value < 1:
            p.error(f"{flag} {value} must be positive")
    hyper = recipe(args)
    out = Path(args.out) if args.out else Path("runs/cifar") / run_name(args)

    accelerator = make_accelerator(TrainConfig(mixed_precision=args.mixed_precision))
    per_process = max(1, hyper["batch_size"] // accelerator.num_processes)
    if per_process * accelerator.num_processes != hyper["batch_size"]:
        p.error(f"--batch-size {hyper['batch_size']} is not divisible by the {accelerator.num_processes} processes")
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=per_process,
        optimizer=args.optimizer,
        lr=hyper["lr"],
        momentum=args.momentum,
        weight_decay=hyper["weight_decay"],
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        k_warmup_epochs=args.k_warmup_epochs,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        num_workers=args.workers,
        out_dir=out,
        resume=True if args.resume else "auto",
        progress=args.progress,
    )
    settings = {key: getattr(args, key) for key in RESULT_SETTINGS} | hyper
    try:  # before any data is read: a folder holding a run of other settings is refused at once
        done = check_run_folder(out, settings, config, require=args.resume)
    except (CheckpointError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with accelerator.main_process_first():  # one process downloads, the others then read
            train_set = load_dataset(args.dataset, "train", root=args.data_dir, download=not args.no_download)
            test_set = load_dataset(args.dataset, "test", root=args.data_dir, download=not args.no_download)
    except (DatasetNotFoundError, DatasetFormatError) as error:
        raise SystemExit(f"error: {error}") from None
    train_set = random_subset(train_set, args.limit, args.seed)
    test_set = random_subset(test_set, args.test_limit, args.seed)
    if args.dataset == "cifar10" and not args.no_augment:
        train_set = RandomCropFlip(train_set, padding=4, flip=True)

    try:
        model = build_model(args.model, dataset=args.dataset, width=args.width)
    except ValueError as error:
        p.error(str(error))
    try:
        popupify(
            model,
            1.0 if args.method == "dense" else args.k,
            init=args.init,
            scaled=args.scaled,
            seed=args.seed,
            **popup_options(args),
        )
    except ValueError as error:
        p.error(str(error))
    if accelerator.is_main_process:
        print(
            f"{getattr(train_set, 'display_name', args.dataset)}: {len(train_set)} train / "
            f"{len(test_set)} test; {args.model} width {args.width:g}, {args.method}"
            + (f" k={args.k:g} init={args.init}{' scaled' if args.scaled else ''}" if args.method != "dense" else "")
            + f"; {args.optimizer} lr {hyper['lr']:g} batch {hyper['batch_size']} wd {hyper['weight_decay']:g}, "
            f"{args.epochs} epochs, {accelerator.num_processes} process(es) on {accelerator.device}"
        )
        if done is not None and done >= args.epochs:
            print(f"the run in {out} is complete ({done} epochs): reporting it again (another --out trains anew)")
        elif done is not None:
            print(f"continuing the run in {out} from its checkpoint: {done} of {args.epochs} epochs done")

    def remember_settings(metrics) -> None:  # after each checkpoint: what a later command is compared with
        if accelerator.is_main_process:
            write_run_settings(out, settings)

    try:
        result = train(model, train_set, test_set, config, accelerator, callbacks=[remember_settings])
    except (ValueError, FileExistsError, CheckpointError, CheckpointMismatchError) as error:
        raise SystemExit(f"error: {error}") from None

    summary = {"run": out.name, "args": vars(args), **{f"final_{k}": v for k, v in result["final"].items()}}
    summary["resumed_from_epoch"] = result["resumed_from_epoch"]
    if accelerator.is_main_process:
        if args.method == "dense":
            path = out / "model.pt"
            torch.save(model.state_dict(), path)
        else:
            path = out / "subnetwork.safetensors"
            save_subnetwork(model, path)
            summary["kept_fraction"] = mask_stats(model).fraction
        summary["saved"] = str(path)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        final = result["final"]
        print(
            f"test top-1 {100 * final['test_top1']:.2f} %, top-5 {100 * final['test_top5']:.2f} % "
            f"after {final.get('epoch')} epochs; saved {path}; logs in {out}"
        )
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
