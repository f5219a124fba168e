"""The core on CUDA: exact masks (ties included), the same masks as on the CPU, Algorithm 1's gradient, and a
training step without host synchronisation. Skipped where CUDA is absent.

Speed is not tested here: performance figures live in ``benchmarks/speed.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from benchmarks.algorithm1 import GetSubnet, algorithm1  # the paper's reference (path set in conftest.py)
from supermask_fx import popupify, supermask_parameters
from supermask_fx.core.masks import gated_layers
from supermask_fx.models import build_model
from supermask_fx.selection.topk import select_topk, topk_mask_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 and deterministic cuDNN: gradients are compared between two implementations."""
    backends = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = backends[0].allow_tf32, backends[1].allow_tf32, backends[1].deterministic
    backends[0].allow_tf32 = backends[1].allow_tf32 = False
    backends[1].deterministic = True
    yield
    backends[0].allow_tf32, backends[1].allow_tf32, backends[1].deterministic = saved


def tied(n: int, levels: int, seed: int) -> torch.Tensor:
    """Scores on a coarse grid: many exact ties in |s| (``+x`` and ``-x`` tie too), zeros included."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels


def select(parts: list[torch.Tensor], kept: int, strategy: str) -> torch.Tensor:
    masks = [torch.empty(p.numel(), dtype=torch.bool, device=p.device) for p in parts]
    select_topk(parts, kept, masks, None, strategy)
    return torch.cat(masks).cpu()


@pytest.mark.parametrize("n, levels", [(1, 3), (1000, 3), (1000, 1000), (37_000, 16), (300_001, 1 << 20)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_select_matches_reference_and_cpu(n, levels, fraction):
    a = tied(n, levels, seed=n + levels).abs()
    kept = min(n, max(1, round(fraction * n)))
    expected = topk_mask_reference(a, kept)
    assert torch.equal(select([a.to(CUDA)], kept, "auto"), expected)  # "select" on CUDA
    assert torch.equal(select([a.to(CUDA)], kept, "band"), expected)
    assert torch.equal(select([a], kept, "auto"), expected)  # "band" on the CPU


def test_select_global_parts_match_reference():
    a = tied(50_000, 8, seed=3).abs()
    sizes = [1, 9_999, 25_000, 15_000]
    kept = 20_001
    expected = topk_mask_reference(a, kept)
    parts = list(a.to(CUDA).split(sizes))
    assert torch.equal(select(parts, kept, "auto"), expected)
    assert torch.equal(select(list(a.split(sizes)), kept, "auto"), expected)


def popup_pair(scope: str, coarse: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same popupified ResNet-18 on the CPU and on CUDA; ``coarse`` scores have many ties."""
    cpu = popupify(build_model("resnet18"), 0.3, seed=7, scope=scope)
    if coarse:
        with torch.no_grad():
            for module, gate in gated_layers(cpu):
                s = module._parameters[gate.scores]
                s.copy_((s * 256).round() / 256)
    return cpu, copy.deepcopy(cpu).to(CUDA)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("coarse", [False, True])
def test_model_masks_equal_on_cpu_and_cuda(scope, coarse):
    cpu, cuda = popup_pair(scope, coarse)
    cpu_masks = [g.current_mask(m).cpu() for m, g in gated_layers(cpu)]
    cuda_masks = [g.current_mask(m) for m, g in gated_layers(cuda)]
    assert all(m.device.type == "cuda" for m in cuda_masks)
    for a, b in zip(cpu_masks, cuda_masks):
        assert torch.equal(a, b.cpu())
    selectors = {id(g.selector): g.selector for _, g in gated_layers(cpu)}.values()
    assert len(selectors) == (1 if scope == "global" else len(cpu_masks))
    for selector in selectors:  # the members of a selector are ranked as one vector, in their order
        magnitudes = torch.cat([m._parameters[g.scores].detach().abs().view(-1) for m, g in selector.members])
        masks = torch.cat([g.current_mask(m).view(-1) for m, g in selector.members])
        assert torch.equal(masks, topk_mask_reference(magnitudes, selector.kept))


def test_gradient_equals_algorithm1():
    torch.manual_seed(0)
    ours = popupify(build_model("resnet18"), 0.5, seed=1).to(CUDA)
    paper = algorithm1(build_model("resnet18"), 0.5).to(CUDA)
    theirs = dict(paper.named_modules())
    with torch.no_grad():
        for module, gate in gated_layers(ours):
            twin = theirs[gate.layer]
            twin.weight.copy_(module._parameters[gate.param])
            twin.scores.copy_(module._parameters[gate.scores])
            assert torch.equal(GetSubnet.apply(twin.scores.abs(), 0.5).bool(), gate.current_mask(module))
    x = torch.randn(16, 3, 32, 32, device=CUDA)
    y = torch.randint(0, 10, (16,), device=CUDA)
    for model in (ours, paper):
        F.cross_entropy(model(x), y).backward()
    for module, gate in gated_layers(ours):
        got, want = module._parameters[gate.scores].grad, theirs[gate.layer].scores.grad
        # sign(s) * w * g either way; only the convolutions' summation order may differ
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_training_step_and_eval_do_not_synchronise():
    model = popupify(build_model("resnet18"), 0.5).to(CUDA).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(32, 3, 32, 32, device=CUDA).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=CUDA)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # the first step also allocates the caches
            step()
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in supermask_parameters(model))
