"""Memory of masks: what N named masks cost beside the base, and the peak memory of one training step.

Each case runs in its own process (peak resident memory, ``ru_maxrss``, is per process), side by side in one run:

* ``plain``: GPT-2 124M (random weights, built from its config) and one AdamW step of its dense weights;
* ``popupify``: the same model popupified (k = 0.5) and one SGD step of its scores (the paper's optimizer);
* ``masks``: popupified, 4 named masks added (``add_mask``), one SGD step of the active one's scores.

It prints each case's peak RSS, the bytes the inactive masks hold, and the ratios. CPU, one thread, batch 1 x 64
tokens; ``--small`` uses a 2-layer model for a quick look.

    python benchmarks/memory_masks.py [--small]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def case(name: str, small: bool) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, logging

    from supermask_fx import add_mask, popupify, set_mask, supermask_parameters

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2 if small else 12)  # GPT-2 124M: 12 layers, 768 wide, 50,257 tokens
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    extra = gated = 0
    if name == "plain":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        popupify(model, k=0.5, init="signed_constant")
        if name == "masks":
            for i in range(4):
                add_mask(model, f"task{i}")
            set_mask(model, "task0")
            extra = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "mask_bits_" in n)
        optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9)
        gated = sum(p.numel() for n, p in model.named_parameters() if n.endswith("scores"))
    ids = torch.randint(0, config.vocab_size, (1, 64))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": name, "params": params, "peak_bytes": peak, "mask_bits_bytes": extra, "gated": gated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a 2-layer model (a quick look)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.small)))
        return
    rows = {}
    for name in ("plain", "popupify", "masks"):
        command = [sys.executable, __file__, "--case", name] + (["--small"] if args.small else [])
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
    params = rows["plain"]["params"]
    for name, row in rows.items():
        print(
            f"{name:9s} peak RSS {row['peak_bytes'] / 2**20:8.0f} MiB = {row['peak_bytes'] / params:5.1f} bytes/param"
        )
    bits, gated = rows["masks"]["mask_bits_bytes"], rows["masks"]["gated"]
    print(f"4 inactive masks: {bits / 2**20:.1f} MiB, {bits * 8 / (4 * gated):.3f} bits per gated weight per mask")
    print(f"popupify / plain AdamW step: {rows['popupify']['peak_bytes'] / rows['plain']['peak_bytes']:.2f}")
    print(f"4 more masks / popupify: {rows['masks']['peak_bytes'] / rows['popupify']['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
