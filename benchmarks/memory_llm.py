"""Memory per parameter of a training step at LLM size, and what popupify costs, side by side in one run.

Each case runs in its own process (peak resident memory, ``ru_maxrss``, is per process), one torch thread, on the
CPU, batch 1 x 128 tokens, random weights built from a config (no download):

* ``dense_adamw``: the model's own weights trained with AdamW (fp32: weights, gradients, two moments);
* ``popup_sgd``: ``popupify(k=0.5, weight_storage="dense")`` (float32 frozen weights) and SGD with momentum on the
  scores (the paper's optimizer; fp32 scores);
* ``popup_bits``: the same with ``weight_storage="bits"`` (the frozen weights as one sign bit each) and
  ``rebuild_effective=True`` (``w * mask`` rebuilt in the backward: the least memory);
* ``popup_bits_kept``: sign bits and ``w * mask`` kept from the forward (``popupify``'s defaults for this init);
* ``popup_bf16``: ``popup_sgd`` (float weights) with ``score_dtype="bfloat16"`` (scores, gradients and momentum in
  bf16);
* ``popup_bf16_adamw``: bf16 scores trained with AdamW (what a fine-tuning script would pass);
* ``popup_bf16_bits``: bf16 scores and ``weight_storage="bits"`` (the frozen weights as one sign bit each),
  ``w * mask`` rebuilt, SGD with momentum;
* ``popup_bf16_bits_kept``: bf16 scores, sign bits and ``w * mask`` kept (with bf16 scores the default rebuilds
  it: this case measures why), SGD.

For each it prints the peak RSS of the step over the RSS of the bare process (Python + torch + transformers
imported), divided by the parameter count: bytes per parameter, and each case's ratio to ``dense_adamw``. For the
popupified cases also: the time to build the model and the time of ``popupify``, and the peak RSS during ``popupify``
over the model's size after it.

    python benchmarks/memory_llm.py                 # GPT-2 124M and a 0.39B Qwen2-style config (~10 min)
    python benchmarks/memory_llm.py --models gpt2   # one model
    python benchmarks/memory_llm.py --small         # 2-layer configs, a quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = (
    "dense_adamw",
    "popup_sgd",
    "popup_bits",
    "popup_bits_kept",
    "popup_bf16",
    "popup_bf16_adamw",
    "popup_bf16_bits",
    "popup_bf16_bits_kept",
)
MODELS = ("gpt2", "qwen2_0.39b")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    """The peak RSS since the last ``_reset_peak`` (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _config(model: str, small: bool):
    from transformers import GPT2Config, Qwen2Config

    if model == "gpt2":  # GPT-2 124M: 12 layers, 768 wide, 50,257 tokens, tied embeddings
        return GPT2Config(n_layer=2 if small else 12)
    return Qwen2Config(  # 0.39B: 24 layers of 1024, MLP 2816, 32,000 tokens, untied
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2 if small else 24,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )


def case(model_name: str, name: str, small: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, logging

    from supermask_fx import popupify, supermask_parameters

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = _rss()
    _reset_peak()
    config = _config(model_name, small)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    out = {"model": model_name, "case": name, "params": params, "build_s": build_s}
    if name == "dense_adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        before = _rss()
        start = time.perf_counter()
        popupify(
            model,
            k=0.5,
            score_dtype="bfloat16" if "bf16" in name else None,
            weight_storage="bits" if "bits" in name else "dense",
            rebuild_effective=not name.endswith("kept"),
        )
        out["popupify_s"] = time.perf_counter() - start
        out["popupify_peak_over_base"] = _peak() - base
        out["model_bytes_after"] = _rss() - base
        out["model_bytes_before"] = before - base
        trained = list(supermask_parameters(model))
        if name.endswith("adamw"):
            optimizer = torch.optim.AdamW(trained, lr=1e-4)
        else:
            optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    ids = torch.randint(0, config.vocab_size, (1, 128))
    _reset_peak()  # the step's own peak, not popupify's
    model.train()
    for _ in range(2):  # the second step holds the optimizer state
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out["step_peak_over_base"] = _peak() - base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models (default both)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="cases (default all)")
    parser.add_argument("--small", action="store_true", help="2-layer configs (a quick look)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(*args.case, args.small)))
        return
    results = []
    for model in args.models:
        for name in args.cases:
            command = [sys.executable, __file__, "--case", model, name] + (["--small"] if args.small else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:  # say why, then stop
                sys.exit(f"{model} {name} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{model:12s} {name:17s} {r['step_peak_over_base'] / r['params']:6.2f} bytes/param", flush=True)
    print()
    print(f"{'model':12s} {'case':17s} {'bytes/param':>11s} {'vs dense AdamW':>14s} {'popupify':>9s} "
          f"{'build':>7s} {'popupify peak / model':>22s}")  # fmt: skip
    for model in args.models:
        rows = [r for r in results if r["model"] == model]
        dense = next((r for r in rows if r["case"] == "dense_adamw"), None)
        for r in rows:
            per = r["step_peak_over_base"] / r["params"]
            ratio = f"{r['step_peak_over_base'] / dense['step_peak_over_base']:.2f}" if dense else "-"
            pop = f"{r['popupify_s']:.1f} s" if "popupify_s" in r else "-"
            peak = (
                f"{r['popupify_peak_over_base'] / r['model_bytes_after']:.2f}"
                if "popupify_peak_over_base" in r
                else "-"
            )
            print(f"{model:12s} {r['case']:17s} {per:11.2f} {ratio:>14s} {pop:>9s} {r['build_s']:6.1f}s {peak:>22s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
