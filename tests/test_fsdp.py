"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a popupified model, two real CPU ranks (torchrun, gloo).

Popupify first, then shard per block and at the root: scores are sharded like the weights; each layer's mask is the
exact top-k of the whole layer, computed when FSDP has gathered the layer for its forward (every rank the same).
After a few SGD steps on the two halves of each global batch, the scores equal a single process's on the whole
batches (to float rounding: the gradient is averaged across ranks), and so do the masks, except where a score lies
within rounding of its layer's threshold. ``scope="global"`` (one top-k over every layer) takes its threshold from
histograms summed across the ranks (``selection.sharded``) and equals one process's too. An MLP, a small Llama and a
CIFAR ResNet-18 (width 0.125) with
BatchNorm: each rank normalizes its half of the batch by the half's statistics, so the single process it is compared
with averages the losses of the two halves.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    from supermask_fx import gated_layers, popupify, supermask_parameters

    out, which, sharded = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp"

    def build():
        torch.manual_seed(0)
        if which.startswith("mlp"):
            net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
            scope = "global" if which == "mlp_global" else "layer"
            options = dict(method="iterand", method_options={"rerand_freq": 1}) if which == "mlp_iterand" else {}
            if which in ("mlp_bits", "mlp_dense"):
                options["weight_storage"] = which.removeprefix("mlp_")
            return popupify(net, k=0.5, scope=scope, **options), [net[0], net[2], net[4]]
        if which == "resnet":
            from supermask_fx.models import resnet18_cifar
            net = popupify(resnet18_cifar(num_classes=4, width=0.125), k=0.5)
            return net, [block for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for block in stage]
        from transformers import LlamaConfig, LlamaForCausalLM, logging
        logging.set_verbosity_error()
        config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64, max_position_embeddings=32)
        net = popupify(LlamaForCausalLM(config), k=0.5)
        return net, list(net.model.layers)

    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        if which == "resnet":
            return (torch.randn(8, 3, 16, 16, generator=g),), torch.randint(0, 4, (8,), generator=g)
        if which.startswith("mlp"):
            x = torch.randn(8, 16, generator=g)
            return (x,), torch.randint(0, 4, (8,), generator=g)
        ids = torch.randint(0, 64, (4, 12), generator=g)
        return (ids,), ids

    def loss_of(model, inputs, target):
        if which == "resnet" and not sharded:  # BatchNorm normalizes each rank's half by its own statistics
            half = target.shape[0] // 2
            parts = [slice(h * half, (h + 1) * half) for h in range(2)]
            return sum(nn.functional.cross_entropy(model(inputs[0][p]), target[p]) for p in parts) / 2
        if which.startswith("mlp") or which == "resnet":
            return nn.functional.cross_entropy(model(*inputs), target)
        return model(input_ids=inputs[0], labels=target).loss

    model, blocks = build()
    rank, world = 0, 1
    if sharded:
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    model.train()
    for step in range(3):
        inputs, target = batch(step)
        n = target.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        loss_of(model, tuple(t[part] for t in inputs), target[part]).backward()
        optimizer.step()
        optimizer.zero_grad()
    full = {}
    if which == "mlp_global":  # the masks each layer uses in evaluation, read while FSDP has it gathered
        from supermask_fx.core.gate import gates_of
        def record(module, args):
            for gate in gates_of(module).values():
                full["mask:" + gate.name] = gate.current_mask(module).clone()
        hooks = [m.register_forward_pre_hook(record) for m in model.modules() if gates_of(m)]
        model.eval()
        with torch.no_grad():
            inputs, _ = batch(99)
            model(*(t[rank * 4 : (rank + 1) * 4] for t in inputs))
        for hook in hooks:
            hook.remove()
    for name, p in model.named_parameters():
        if name.endswith("scores"):
            full[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
    if rank == 0:
        torch.save(full, out)
    print(f"rank {rank}: trained and saved", flush=True)  # where a crash came, should one come
    if sharded:
        dist.barrier()  # every rank done with its collectives before the group goes
        dist.destroy_process_group()
    print(f"rank {rank}: process group destroyed", flush=True)
    if sharded:  # every result is written; skip interpreter teardown, where torch's gloo threads have aborted a
        import os  # rank after all of the above had printed (seen twice: "terminate called without an active
        os._exit(0)  # exception", exit -6)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, which: str, mode: str, expect_failure: bool = False, stderr: list | None = None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"{which}-{mode}.pt"
    if mode == "fsdp":
        command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script), str(out)]
    else:
        command = [sys.executable, str(script), str(out)]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([*command, which, mode], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    if expect_failure:
        assert result.returncode != 0
        return result.stderr
    assert result.returncode == 0, "stdout:\n" + result.stdout[-2000:] + "\nstderr:\n" + result.stderr[-4000:]
    if stderr is not None:
        stderr.append(result.stderr)
    return torch.load(out)


def top_k(scores: torch.Tensor, k: float) -> torch.Tensor:
    flat = scores.abs().flatten()
    kept = flat.numel() - int((1 - k) * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:kept]] = True
    return mask.view_as(scores), torch.sort(flat, descending=True).values[kept - 1]


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
@pytest.mark.parametrize("which", ["mlp", "llama", "resnet"])
def test_two_sharded_ranks_train_the_masks_of_one_process(tmp_path, which):
    if which == "llama":
        pytest.importorskip("transformers")
    sharded, single = run(tmp_path, which, "fsdp"), run(tmp_path, which, "single")
    assert sharded.keys() == single.keys() and sharded
    for name, ours in single.items():
        theirs = sharded[name]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6, msg=name)
        mask_a, threshold = top_k(ours, 0.5)
        mask_b, _ = top_k(theirs, 0.5)
        near = (ours.abs() - threshold).abs() <= 1e-5 * threshold.abs().clamp_min(1e-12) + 1e-6
        assert torch.equal(mask_a[~near], mask_b[~near]), name


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
def test_a_global_top_k_under_fsdp_is_the_one_of_one_process(tmp_path):
    """scope="global": the threshold over every layer comes from histograms summed across the two ranks, no score
    gathered; the scores train as one process's, and each layer's evaluation mask is the global top-k."""
    sharded, single = run(tmp_path, "mlp_global", "fsdp"), run(tmp_path, "mlp_global", "single")
    names = [name for name in single if not name.startswith("mask:")]
    assert sharded.keys() == single.keys() and len(names) == 3
    for name in names:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    scores = torch.cat([single[name].flatten() for name in names])
    reference, threshold = top_k(scores, 0.5)  # the global top-k, written independently
    near = (scores.abs() - threshold).abs() <= 1e-5 * threshold.abs() + 1e-6
    masks = {kind: torch.cat([run[f"mask:{n[: -len('scores')]}weight"].flatten() for n in names]) for kind, run in
             (("single", single), ("sharded", sharded))}  # fmt: skip
    assert torch.equal(masks["single"], reference)
    assert torch.equal(masks["sharded"][~near], reference[~near])
    assert int(masks["sharded"].sum()) == int(reference.sum())


def test_the_sharded_radix_select_is_the_top_k_of_its_keys(tmp_path):
    """``selection.sharded``'s threshold and tie allowances (one process: its collectives are identities) give the
    exact top-k with ties by lowest index, on magnitudes with many ties, NaN and infinity."""
    import torch.distributed as dist

    from supermask_fx.selection import sharded
    from supermask_fx.selection.device import order_keys

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(0)
        for trial in range(20):
            parts = [torch.randint(0, 6, (n,), generator=g).float() / 4 for n in (37, 50, 13)]
            parts[0][:3] = torch.tensor([float("nan"), float("inf"), 0.0])
            kept = int(torch.randint(1, 100, (1,), generator=g))
            keys = [order_keys(p).to(torch.int64) for p in parts]
            threshold, need = sharded.threshold_of(torch.cat(keys), kept)
            ties = torch.tensor([int((k == threshold).sum()) for k in keys])
            allowed = sharded.allowances(ties, need)
            got = torch.cat(
                [
                    (k > threshold) | ((k == threshold) & ((k == threshold).cumsum(0) <= a))
                    for k, a in zip(keys, allowed)
                ]
            )
            flat = torch.cat(parts)
            order = torch.sort(torch.nan_to_num(flat, nan=-1.0), descending=True, stable=True).indices
            want = torch.zeros(flat.numel(), dtype=torch.bool)
            want[order[:kept]] = True
            assert torch.equal(got, want), trial
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
def test_iterand_under_fsdp_is_refused_with_the_reason(tmp_path):
    """FSDP replaces the score Parameters IteRand follows, so its redraws never ran and it trained as edge-popup
    (measured: after 3 steps no weight redrawn, against 740 in one process): refused at the first forward."""
    stderr = run(tmp_path, "mlp_iterand", "fsdp", expect_failure=True)
    assert "method='iterand' changes 0.weight after every optimizer step" in stderr and "DDP" in stderr


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
def test_packed_sign_weights_under_fsdp_train_as_dense_ones_and_say_what_they_hold(tmp_path):
    """weight_storage="bits": FSDP shards the frozen weights as float tensors of their values (not the bits): the
    scores train as one process's with plain weights, and a warning says the memory is FSDP's, not one bit each."""
    stderr = []
    sharded, single = run(tmp_path, "mlp_bits", "fsdp", stderr=stderr), run(tmp_path, "mlp_dense", "single")
    assert sharded.keys() == single.keys() and sharded
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "not as the sign bits of weight_storage='bits'" in stderr[0]
