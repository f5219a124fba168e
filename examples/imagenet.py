"""Edge-popup on ImageNet with any ``torchvision.models`` network, through Hugging Face accelerate.

    accelerate launch examples/imagenet.py --data-dir /data/imagenet                 # all GPUs of the machine
    accelerate launch --num_processes 8 examples/imagenet.py --model resnet50 --data-dir /data/imagenet
    python examples/imagenet.py --dataset ILSVRC/imagenet-1k                         # a Hub dataset (online)
    python examples/imagenet.py --data-dir tiny/ --model resnet18 --epochs 1 --image-size 32 --batch-size 4

The paper's recipe (Ramanujan et al. 2020, Section 5 and their configs): k = 0.3, signed-constant weights,
SGD with momentum 0.875, lr 0.256 per 256 images (scaled linearly with the global batch), weight decay
3.0517578125e-05 on the scores, label smoothing 0.1, 5 warm-up epochs then cosine, batch 256, 100 epochs,
random-resized crops and flips. Here also: bf16 on GPUs that support it, channels-last, per-epoch checkpoints
(rerun with ``--resume`` after an interruption). At the end the found subnetwork is written as a compact file
(``subnetwork.safetensors``: about 0.9 bits per weight at k = 0.3; reload with ``supermask_fx.load_subnetwork``).

Data comes through Hugging Face ``datasets``: ``--data-dir`` is an image folder (``train/<class>/*.JPEG`` and
``val/<class>/*.JPEG``, loaded with ``load_dataset("imagefolder", data_dir=...)``) or ``--dataset`` a Hub id.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import supermask_fx  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from supermask_fx import INITIALIZERS, PopupConfig, mask_stats, popupify, save_subnetwork
from supermask_fx.training import (
    CheckpointError,
    CheckpointMismatchError,
    TrainConfig,
    add_progress_argument,
    make_accelerator,
    train,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_SPLITS = ("validation", "val", "test")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="wide_resnet50_2", help="any torchvision.models name (default wide_resnet50_2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="image folder with train/<class>/ and val/<class>/ (or validation/, test/)")
    src.add_argument("--dataset", help="a Hugging Face Hub dataset id with an image and a class-label column")
    p.add_argument(
        "--method",
        default="edge_popup",
        choices=("edge_popup", "sampled", "random", "dense"),
        help="default edge_popup",
    )
    p.add_argument("--k", type=float, default=0.3, help="fraction of weights kept per layer (default 0.3)")
    p.add_argument("--init", default="signed_constant", choices=tuple(INITIALIZERS), help="default signed_constant")
    p.add_argument("--scaled", action="store_true", help="scale the weight std by sqrt(1/k)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, scores and data order (default 0)")
    p.add_argument("--epochs", type=int, default=100, help="default 100")
    p.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warm-up before the cosine (default 5)")
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
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers per process")
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--out", help="run folder (default runs/imagenet/<model>-<method>-k<k>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_progress_argument(p)
    return p


class HFImages(torch.utils.data.Dataset):
    """A Hugging Face image dataset as ``(transformed image tensor, label)`` pairs."""

    def __init__(self, ds, transform, image_key: str, label_key: str) -> None:
        self.ds, self.transform, self.image_key, self.label_key = ds, transform, image_key, label_key

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index):
        row = self.ds[int(index)]
        return self.transform(row[self.image_key].convert("RGB")), int(row[self.label_key])


def load_splits(args, accelerator):
    """(train, eval, class names) from an image folder or a Hub id, with the paper's transforms."""
    import datasets
    from torchvision import transforms as T

    with accelerator.main_process_first():  # the first process builds the Arrow cache, the others reuse it
        if args.data_dir is not None:
            if not Path(args.data_dir).is_dir():
                raise SystemExit(f"error: --data-dir {args.data_dir}: no such folder")
            dd = datasets.load_dataset("imagefolder", data_dir=args.data_dir)
        else:
            dd = datasets.load_dataset(args.dataset)
    if "train" not in dd:
        raise SystemExit(f"error: the dataset has no 'train' split (splits: {', '.join(dd)})")
    eval_split = next((s for s in EVAL_SPLITS if s in dd), None)
    if eval_split is None:
        raise SystemExit(
            f"error: the dataset has no evaluation split ({'/'.join(EVAL_SPLITS)}; it has {', '.join(dd)})"
        )
    features = dd["train"].features
    image_key = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label_key = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_key is None or label_key is None:
        raise SystemExit(f"error: need an Image and a ClassLabel column; the dataset has {dict(features)}")
    classes = features[label_key].names
    size = args.image_size
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    train_ds = dd["train"]
    if args.limit is not None:
        train_ds = train_ds.select(range(min(args.limit, len(train_ds))))
    return (
        HFImages(train_ds, train_tf, image_key, label_key),
        HFImages(dd[eval_split], eval_tf, image_key, label_key),
        classes,
    )


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    import torchvision

    if args.model not in torchvision.models.list_models(module=torchvision.models):
        p.error(
            f"unknown torchvision model {args.model!r}; e.g. resnet50, resnet101, wide_resnet50_2 "
            "(see torchvision.models.list_models())"
        )
    try:
        popup = PopupConfig(
            k=1.0 if args.method == "dense" else args.k,
            method=args.method,
            init=args.init,
            scaled=args.scaled,
            seed=args.seed,
        )
    except ValueError as error:
        p.error(str(error))

    accelerator = make_accelerator(TrainConfig(mixed_precision=args.mixed_precision))
    world = accelerator.num_processes
    per_process, rest = divmod(args.batch_size, world * args.grad_accum)
    if per_process < 1 or rest:
        p.error(
            f"--batch-size {args.batch_size} must be a multiple of processes x --grad-accum = {world * args.grad_accum}"
        )
    lr = args.lr if args.lr is not None else 0.256 * args.batch_size / 256
    train_set, eval_set, classes = load_splits(args, accelerator)

    model = torchvision.models.get_model(args.model, weights=None, num_classes=len(classes))
    popupify(model, popup)
    out = Path(args.out) if args.out else Path("runs/imagenet") / f"{args.model}-{args.method}-k{args.k:g}"
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=per_process,
        grad_accum_steps=args.grad_accum,
        optimizer="sgd",
        lr=lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        warmup_epochs=min(args.warmup_epochs, args.epochs),
        mixed_precision=args.mixed_precision,
        channels_last=not args.no_channels_last,
        seed=args.seed,
        num_workers=args.workers,
        out_dir=out,
        resume=True if args.resume else False,
        progress=args.progress,
    )
    if accelerator.is_main_process:
        print(
            f"{args.model} ({args.method}, k={args.k:g}, {args.init}{', scaled' if args.scaled else ''}): "
            f"{len(train_set)} train / {len(eval_set)} eval images, {len(classes)} classes; global batch "
            f"{args.batch_size} = {world} process(es) x {per_process} x {args.grad_accum}, lr {lr:g}, "
            f"{accelerator.mixed_precision} precision on {accelerator.device}"
        )
    try:
        result = train(model, train_set, eval_set, config, accelerator)
    except (ValueError, FileExistsError, CheckpointError, CheckpointMismatchError) as error:
        raise SystemExit(f"error: {error}") from None

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
            f"after {final['epoch']} "
            f"epochs; subnetwork saved to {path}"
        )
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
