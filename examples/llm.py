"""A subnetwork of a random causal language model (edge-popup on a Llama-style decoder), on one process, with DDP,
or sharded with FSDP2.

    python examples/llm.py                                   # CPU, one process: a tiny model, ~1 minute
    torchrun --nproc_per_node 2 examples/llm.py --parallel ddp
    torchrun --nproc_per_node 2 examples/llm.py --parallel fsdp
    accelerate launch examples/llm.py --parallel fsdp --size small --steps 2000   # every GPU of the machine

The weights are drawn from the seed and frozen; only the scores train (SGD lr 0.1, momentum 0.9, cosine, as the
paper). Text is read as bytes (a vocabulary of 256), by default the repository's own documentation (nothing to
download); ``--text FILE`` reads another file and ``--dataset NAME`` a Hugging Face Hub data set's ``text`` column
(online). With ``--parallel fsdp`` the model is popupified first, then each decoder layer and the root are sharded
(``fully_shard``): scores are sharded like the weights, and each layer's mask is the exact top-k of the whole layer
(docs/plugging-in.md). Prints the held-out loss before and after, and writes the subnetwork file
(``save_subnetwork``: the seed and ~1 bit per weight) to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (64, 2, 4, 128),
    "small": (256, 4, 8, 688),
    "base": (768, 12, 12, 2048),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default tiny: 0.1M weights)")
    p.add_argument("--k", type=float, default=0.5, help="fraction of each layer's weights kept (default 0.5)")
    p.add_argument("--init", default="signed_constant", help="weight distribution (default signed_constant)")
    p.add_argument(
        "--scope", choices=("layer", "global"), default="layer", help="top-k per layer (default) or over all layers"
    )
    p.add_argument("--score-dtype", choices=("float32", "bfloat16"), default=None, help="default: the weights'")
    p.add_argument(
        "--weight-storage",
        choices=("dense", "bits"),
        default=None,
        help="frozen weights as one sign bit each (the default for the signed-constant inits) or float tensors",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, all processes together")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default 128)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the scores (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, scores and batches (default 0)")
    p.add_argument(
        "--parallel",
        choices=("none", "ddp", "fsdp"),
        default=None,
        help="none (one process), ddp or fsdp; default: ddp when launched with several processes, else none",
    )
    p.add_argument("--text", type=Path, default=None, help="a text file to train on (default: the repo's docs)")
    p.add_argument("--dataset", default=None, help="a Hugging Face Hub data set with a 'text' column (online)")
    p.add_argument("--out", type=Path, default=Path("runs/llm"), help="folder of the subnetwork file")
    return p.parse_args(argv)


def corpus(args) -> torch.Tensor:
    """The training text as a uint8 tensor of bytes."""
    if args.dataset:
        from datasets import load_dataset

        text = "\n\n".join(load_dataset(args.dataset, split="train")["text"])
    elif args.text:
        text = args.text.read_text(errors="replace")
    else:
        pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        text = "\n\n".join(page.read_text() for page in pages)
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM, logging

    from supermask_fx import popupify

    logging.set_verbosity_error()
    hidden, layers, heads, intermediate = SIZES[args.size]
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return popupify(
        LlamaForCausalLM(config),
        k=args.k,
        init=args.init,
        seed=args.seed,
        scope=args.scope,
        score_dtype=args.score_dtype,
        weight_storage=args.weight_storage,
    )


def batch(data: torch.Tensor, step: int, size: int, seq_len: int, seed: int) -> torch.Tensor:
    """``size`` random windows of ``seq_len`` bytes (the same on every process: each takes its own rows)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (size,), generator=g)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()


@torch.no_grad()
def held_out_loss(model, data, args, device, rank, world) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(4):
        ids = batch(data, 10_000_000 + i, args.batch_size, args.seq_len, args.seed)
        rows = ids.chunk(world)[rank].to(device)
        total += model(input_ids=rows, labels=rows).loss
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total) / (4 * world)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = args.parallel or ("ddp" if world > 1 else "none")
    if parallel != "none" and world == 1:
        raise SystemExit(f"--parallel {parallel} needs several processes: torchrun --nproc_per_node 2 examples/llm.py")
    rank = 0
    device = torch.device("cpu")
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")

    from supermask_fx import mask_stats, save_subnetwork, supermask_parameters

    text = corpus(args)
    cut = int(0.9 * text.numel())
    train_text, test_text = text[:cut], text[cut:]
    model = build(args).to(device)
    stats = mask_stats(model)  # before sharding: the statistics read whole layers
    if parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(
        f"{args.size} Llama, {stats.numel:,} gated weights, k = {args.k}, {parallel} on {world} process(es), "
        f"{train_text.numel():,} training bytes"
    )
    before = held_out_loss(model, test_text, args, device, rank, world)
    say(f"held-out loss before: {before:.3f} (uniform over bytes: ln 256 = 5.545)")
    start = time.perf_counter()
    for step in range(args.steps):
        ids = batch(train_text, step, args.batch_size, args.seq_len, args.seed).chunk(world)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            say(f"step {step + 1}/{args.steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    say(f"held-out loss after: {held_out_loss(model, test_text, args, device, rank, world):.3f}")
    save(model, args, parallel, rank, save_subnetwork)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def save(model, args, parallel, rank, save_subnetwork) -> None:
    """The subnetwork file on rank 0. Under FSDP the scores are gathered (every rank takes part) into a fresh
    popupified model of the same seed, whose weights are the same draw."""
    path = args.out / f"llm-{args.size}-k{args.k:g}-seed{args.seed}.safetensors"
    if parallel == "fsdp":
        # a sharded DTensor, or the whole tensor where FSDP left a module unsharded (the root, after a forward)
        full = {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).cpu()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        if rank != 0:
            return
        model = build(args)
        with torch.no_grad():
            own = dict(model.named_parameters())
            for name, value in full.items():
                own[name].copy_(value)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        size = save_subnetwork(getattr(model, "module", model).cpu(), path)
        print(f"wrote {path} ({size:,} bytes)")


if __name__ == "__main__":
    raise SystemExit(main())
