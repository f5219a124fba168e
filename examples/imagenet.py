"""Edge-popup on ImageNet with any torchvision.models network, through Hugging Face accelerate.

Try it on the CPU first, on any small folder in ImageNet's layout (a few images in tiny/train/<class>/ and
tiny/val/<class>/), then on ImageNet: a quick look of 50 optimizer steps, then the full run on every GPU:

    python examples/imagenet.py --data-dir tiny/ --model resnet18 --epochs 1 --image-size 32 --batch-size 4
    accelerate launch examples/imagenet.py --data-dir /data/imagenet --max-steps 50
    accelerate launch examples/imagenet.py --data-dir /data/imagenet
    accelerate launch --num_processes 8 examples/imagenet.py --model resnet50 --data-dir /data/imagenet
    python examples/imagenet.py --dataset ILSVRC/imagenet-1k                       # from the Hugging Face Hub

The paper's recipe (Ramanujan et al. 2020, Section 5 and their configs): k = 0.3, signed-constant weights,
SGD with momentum 0.875, lr 0.256 per 256 images (scaled linearly with the global batch), weight decay
3.0517578125e-05 on the scores, label smoothing 0.1, 5 warm-up epochs then cosine, batch 256, 100 epochs,
random-resized crops and flips. Here also: bf16 on GPUs that support it, channels-last, per-epoch checkpoints.
At the end the found subnetwork is written as a compact file (``subnetwork.safetensors``: about 0.9 bits per
weight at k = 0.3; reload with ``supermask_fx.load_subnetwork``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

try:
    import supermask_fx  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from supermask_fx import INITIALIZERS, PopupConfig, mask_stats, popupify, save_subnetwork
from supermask_fx.data.subset import LIMIT_HELP, subset_indices
from supermask_fx.training import (
    METHOD_SETTINGS,
    CheckpointError,
    CheckpointMismatchError,
    TrainConfig,
    add_method_arguments,
    add_progress_argument,
    make_accelerator,
    popup_options,
    train,
)
from supermask_fx.training.runlog import RESUME_HELP, check_run_folder, write_run_settings
from supermask_fx.training.schedule import capped_warmup

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_SPLITS = ("validation", "val", "test")
TINY = "python examples/imagenet.py --data-dir tiny/ --model resnet18 --epochs 1 --image-size 32 --batch-size 4"
DATA_HELP = """\
data: --data-dir DIR or --dataset ID (one of them is needed)
  --data-dir DIR   an image folder: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (or validation/, test/),
                   one sub-folder per class, read with Hugging Face datasets' "imagefolder" loader
  --dataset ID     a Hugging Face Hub dataset with an image and a class-label column, e.g. ILSVRC/imagenet-1k
                   (accept its terms on the Hub, then `huggingface-cli login`; a download of over 150 GB)

getting ImageNet (ILSVRC-2012: 1.28M training, 50,000 validation images, 1000 classes):
  register at https://image-net.org, download ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
  ILSVRC2012_devkit_t12.tar.gz into DIR, then let torchvision (with scipy installed) sort them into that layout:
    python -c "import torchvision; [torchvision.datasets.ImageNet('DIR', split=s) for s in ('train', 'val')]"
  and pass --data-dir DIR."""
EPILOG = f"{DATA_HELP}\n\nresuming:\n{textwrap.fill(RESUME_HELP, 116, initial_indent='  ', subsequent_indent='  ')}"

# The settings that change what a run computes: a run folder continues only with the same ones.
RESULT_SETTINGS = (
    "model",
    *METHOD_SETTINGS,
    "k",
    "init",
    "scaled",
    "seed",
    "epochs",
    "warmup_epochs",
    "batch_size",
    "grad_accum",
    "lr",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "image_size",
    "mixed_precision",
    "no_channels_last",
    "limit",
    "max_steps",
)


def _launched_by_accelerate() -> bool:
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by `accelerate launch` for the processes it starts


def fail(message: str, code: int = 2):
    """End with one short message and ``code`` (2: a usage error, as argparse; 1: the run failed).

    Under ``accelerate launch`` the message goes to stdout: the launcher repeats the child's stderr in its own
    traceback, so a message there would be printed twice. Only the first process of a launch says it."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        launched = _launched_by_accelerate()
        stream = sys.stdout if launched else sys.stderr
        print(f"imagenet.py: error: {message}", file=stream, flush=True)
        if launched:
            print("(accelerate launch adds its own traceback below; `accelerate launch -q` leaves it out)", flush=True)
    raise SystemExit(code)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and a pointer to --help, not the whole usage
        fail(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\nThe paper's recipe")[0]
    p = _Parser(description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wide_resnet50_2", help="any torchvision.models name (default wide_resnet50_2)")
    p.add_argument("--data-dir", help="image folder with train/<class>/ and val/<class>/ (or validation/, test/)")
    p.add_argument("--dataset", help="a Hugging Face Hub dataset id with an image and a class-label column")
    add_method_arguments(p)
    p.add_argument("--k", type=float, default=0.3, help="fraction of weights kept per layer (default 0.3)")
    p.add_argument("--init", default="signed_constant", choices=tuple(INITIALIZERS), help="default signed_constant")
    p.add_argument("--scaled", action="store_true", help="scale the weight std by sqrt(1/k)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of weights, scores, data order and --limit's subset (default 0)"
    )
    p.add_argument("--epochs", type=int, help="default 100 (1 with --max-steps)")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear warm-up before the cosine (default 5, but at most a fifth of --epochs: 1 of 5 epochs, none for "
        "a 1-epoch run; an explicit value is used as given)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="a quick look: at most N optimizer steps in all, each epoch cut to N / epochs steps by training on "
        "that many batches of images drawn at random (with --seed); the schedule, checkpoint, evaluation on the "
        "whole evaluation split and subnetwork file as in a full run",
    )
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.256 * global batch / 256)")
    p.add_argument("--momentum", type=float, default=0.875, help="SGD momentum (default 0.875)")
    p.add_argument(
        "--weight-decay", type=float, default=3.0517578125e-05, help="on the scores (default 3.0517578125e-05)"
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="default 0.1")
    p.add_argument("--image-size", type=int, default=224, help="training crop size (default 224)")
    p.add_argument(
        "--mixed-precision",
        default="auto",
        choices=("auto", "no", "bf16", "fp16"),
        help="default auto: bf16 on a GPU that supports it",
    )
    p.add_argument("--no-channels-last", action="store_true", help="keep the contiguous memory format")
    workers = min(8, os.cpu_count() or 1)
    p.add_argument(
        "--workers",
        type=int,
        default=workers,
        help=f"DataLoader workers per process (default min(8, CPU cores): {workers} here)",
    )
    p.add_argument("--limit", type=int, help=LIMIT_HELP)
    p.add_argument("--out", help="run folder (default runs/imagenet/<model>-<method>-k<k>)")
    p.add_argument("--resume", action="store_true", help="only continue: stop if --out holds no checkpoint")
    add_progress_argument(p)
    return p


def no_data_message() -> str:
    return (
        "no data: pass --data-dir DIR (an image folder) or --dataset ID (a Hugging Face Hub dataset).\n"
        "  --data-dir DIR: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (or validation/, test/)\n"
        "  --dataset ILSVRC/imagenet-1k: ImageNet from the Hub (accept its terms there, then `huggingface-cli login`)\n"
        "  how to get ImageNet in that layout: python examples/imagenet.py --help\n"
        "Try it on the CPU first, on any small folder in that layout:\n"
        f"  {TINY}"
    )


class HFImages(torch.utils.data.Dataset):
    """A Hugging Face image dataset as ``(transformed image tensor, label)`` pairs."""

    def __init__(self, ds, transform, image_key: str, label_key: str) -> None:
        self.ds, self.transform, self.image_key, self.label_key = ds, transform, image_key, label_key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index):
        row = self.ds[int(index)]
        return self.transform(row[self.image_key].convert("RGB")), int(row[self.label_key])


def _load(args):
    """The ``DatasetDict`` of ``--data-dir`` or ``--dataset``; a local folder loads without progress bars or
    "Downloading data" lines (nothing is downloaded)."""
    import datasets

    if args.data_dir is None:
        return datasets.load_dataset(args.dataset)
    if not Path(args.data_dir).is_dir():
        fail(f"--data-dir {args.data_dir}: no such folder")
    verbosity = datasets.utils.logging.get_verbosity()
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.disable_progress_bars()
    try:
        return datasets.load_dataset("imagefolder", data_dir=args.data_dir)
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if not bars:
            datasets.utils.enable_progress_bars()


def load_splits(args, accelerator, train_images: int | None = None):
    """(train, eval, class names) from an image folder or a Hub id, with the paper's transforms. ``train_images``:
    keep that many training images, drawn at random with ``args.seed`` (the same ones every run)."""
    import datasets
    from torchvision import transforms as T

    with accelerator.main_process_first():  # the first process builds the Arrow cache, the others reuse it
        dd = _load(args)
    if "train" not in dd:
        fail(f"the dataset has no 'train' split (splits: {', '.join(dd)})")
    eval_split = next((s for s in EVAL_SPLITS if s in dd), None)
    if eval_split is None:
        fail(f"the dataset has no evaluation split ({'/'.join(EVAL_SPLITS)}; it has {', '.join(dd)})")
    features = dd["train"].features
    image_key = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label_key = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_key is None or label_key is None:
        fail(f"need an Image and a ClassLabel column; the dataset has {dict(features)}")
    classes = features[label_key].names
    size = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    train_ds = dd["train"]
    if train_images is not None and train_images < len(train_ds):
        train_ds = train_ds.select(subset_indices(len(train_ds), train_images, args.seed).tolist())
    return (
        HFImages(train_ds, train_tf, image_key, label_key),
        HFImages(dd[eval_split], eval_tf, image_key, label_key),
        classes,
    )


def plan(args) -> dict:
    """Resolve the defaults that depend on other flags (epochs, warm-up, training images); no data is read."""
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max-steps {args.max_steps} must be positive")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit {args.limit} must be positive")
    if args.epochs is None:
        args.epochs = 1 if args.max_steps is not None else 100
    if args.epochs < 1:
        fail(f"--epochs {args.epochs} must be positive")
    train_images = args.limit
    if args.max_steps is not None:
        if args.max_steps < args.epochs:
            args.epochs = args.max_steps  # one step per epoch
        steps = args.max_steps // args.epochs
        train_images = min(train_images or steps * args.batch_size, steps * args.batch_size)
    warmup = capped_warmup(args.epochs) if args.warmup_epochs is None else args.warmup_epochs
    if not 0 <= warmup <= args.epochs:
        fail(f"--warmup-epochs {warmup:g} must lie in [0, --epochs {args.epochs}]")
    args.warmup_epochs = warmup
    return {"train_images": train_images}


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.data_dir is None and args.dataset is None:
        fail(no_data_message())
    if args.data_dir is not None and args.dataset is not None:
        fail("pass --data-dir or --dataset, not both")
    import torchvision

    if args.model not in torchvision.models.list_models(module=torchvision.models):
        fail(
            f"unknown torchvision model {args.model!r}; e.g. resnet50, resnet101, wide_resnet50_2 "
            "(see torchvision.models.list_models())"
        )
    try:
        popup = PopupConfig(
            k=1.0 if args.method == "dense" else args.k,
            init=args.init,
            scaled=args.scaled,
            seed=args.seed,
            **popup_options(args),
        )
    except ValueError as error:
        fail(str(error))
    extent = plan(args)

    accelerator = make_accelerator(TrainConfig(mixed_precision=args.mixed_precision))
    world = accelerator.num_processes
    per_process, rest = divmod(args.batch_size, world * args.grad_accum)
    if per_process < 1 or rest:
        fail(
            f"--batch-size {args.batch_size} must be a multiple of processes x --grad-accum = {world * args.grad_accum}"
        )
    if args.lr is None:
        args.lr = 0.256 * args.batch_size / 256
    out = Path(args.out) if args.out else Path("runs/imagenet") / f"{args.model}-{args.method}-k{args.k:g}"
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=per_process,
        grad_accum_steps=args.grad_accum,
        optimizer="sgd",
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        warmup_epochs=args.warmup_epochs,
        k_warmup_epochs=args.k_warmup_epochs,
        mixed_precision=args.mixed_precision,
        channels_last=not args.no_channels_last,
        seed=args.seed,
        num_workers=args.workers,
        out_dir=out,
        resume=True if args.resume else "auto",
        progress=args.progress,
    )
    settings = {key: getattr(args, key) for key in RESULT_SETTINGS}
    try:  # before any data is read: a folder holding a run of other settings is refused at once
        done = check_run_folder(out, settings, config, require=args.resume)
    except (CheckpointError, CheckpointMismatchError) as error:
        fail(str(error))
    train_set, eval_set, classes = load_splits(args, accelerator, extent["train_images"])

    model = torchvision.models.get_model(args.model, weights=None, num_classes=len(classes))
    popupify(model, popup)
    if accelerator.is_main_process:
        precision = "fp32" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} mixed precision"
        print(
            f"{args.model} ({args.method}, k={args.k:g}, {args.init}{', scaled' if args.scaled else ''}): "
            f"{len(train_set)} train / {len(eval_set)} eval images, {len(classes)} classes; global batch "
            f"{args.batch_size} = {world} process(es) x {per_process} x {args.grad_accum}, lr {args.lr:g}, "
            f"{args.epochs} epoch(s) ({args.warmup_epochs:g} of warm-up), {precision} on {accelerator.device}"
        )
        if done is not None and done >= args.epochs:
            print(f"the run in {out} is complete ({done} epoch(s)): reporting it again (another --out trains anew)")
        elif done is not None:
            print(f"continuing the run in {out} from its checkpoint: {done} of {args.epochs} epoch(s) done")

    def remember_settings(metrics) -> None:  # after each checkpoint: what a later command is compared with
        if accelerator.is_main_process:
            write_run_settings(out, settings)

    try:
        result = train(model, train_set, eval_set, config, accelerator, callbacks=[remember_settings])
    except (ValueError, FileExistsError, CheckpointError, CheckpointMismatchError) as error:
        fail(str(error), code=1)

    summary = {"model": args.model, "args": vars(args), **{f"final_{k}": v for k, v in result["final"].items()}}
    if accelerator.is_main_process:
        if args.method == "dense":
            path = out / "model.pt"
            torch.save(model.state_dict(), path)
        else:
            path = out / "subnetwork.safetensors"
            summary["subnetwork_bytes"] = save_subnetwork(model, path)
            summary["kept_fraction"] = mask_stats(model).fraction
        summary["saved"] = str(path)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        final = result["final"]
        print(
            f"eval top-1 {100 * final['test_top1']:.2f} %, top-5 {100 * final['test_top5']:.2f} % "
            f"after {final['epoch']} epoch(s); subnetwork saved to {path}"
        )
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
