"""Mask selection back-ends behind one seam: the same masks on every back-end (the rule, checked against an
independent stable sort), the device back-end's fixed operation count and absence of host synchronisation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from supermask_fx import gated_layers, popupify, supermask_parameters
from supermask_fx.selection import BACKENDS, backend_for, set_backend
from supermask_fx.selection.device import Segments, order_keys, segmented_topk


def reference_mask(a: torch.Tensor, kept: int) -> torch.Tensor:
    """The rule written independently: NaN below every number, then a stable descending sort, keep the first K."""
    key = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
    order = sorted(range(a.numel()), key=lambda i: (-float(key[i]), i))
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[order[:kept]] = True
    return mask


@pytest.mark.parametrize("trial", range(40))
def test_segmented_topk_is_the_rule(trial):
    g = torch.Generator().manual_seed(trial)
    count = int(torch.randint(1, 6, (), generator=g))
    sizes = torch.randint(1, 50, (count,), generator=g).tolist()
    kept = [int(torch.randint(1, n + 1, (), generator=g)) for n in sizes]
    parts = []
    for n in sizes:
        a = torch.randint(0, 5, (n,), generator=g).float() * 0.25  # many ties
        a[torch.rand(n, generator=g) < 0.15 * (trial % 3)] = float("nan")
        a[torch.rand(n, generator=g) < 0.1 * (trial % 2)] = float("inf")
        parts.append(a)
    mask = segmented_topk(order_keys(torch.cat(parts)), Segments.build(sizes, kept, torch.device("cpu")))
    assert torch.equal(mask, torch.cat([reference_mask(a, k) for a, k in zip(parts, kept)]))


class Net(nn.Module):
    def __init__(self, depth=2):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.hidden = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth - 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.fc(h)


X = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(0))
Y = torch.arange(6) % 5


def trained_scores(backend, **options):
    set_backend(backend)
    try:
        torch.manual_seed(0)
        model = popupify(Net(3), **{"k": 0.3, **options})
        optimizer = torch.optim.SGD(supermask_parameters(model), lr=5.0, momentum=0.9)
        masks = []
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            optimizer.step()
            masks.append([gate.current_mask(m).clone() for m, gate in gated_layers(model)])
        return [p.detach().clone() for p in supermask_parameters(model)], masks
    finally:
        set_backend(None)


@pytest.mark.parametrize("options", [{}, {"scope": "global"}, {"scope": "global", "layer_k": {"fc": 0.5}}])
def test_every_backend_gives_the_same_masks_and_training_steps(options):
    scores, masks = trained_scores("reference", **options)
    for backend in ("cpu", "device"):
        other_scores, other_masks = trained_scores(backend, **options)
        assert all(torch.equal(a, b) for step_a, step_b in zip(masks, other_masks) for a, b in zip(step_a, step_b))
        assert all(torch.equal(a, b) for a, b in zip(scores, other_scores)), backend


def test_backend_choice_environment_and_errors(monkeypatch):
    monkeypatch.delenv("SUPERMASK_FX_SELECT", raising=False)
    assert backend_for(torch.device("cpu")) == "cpu" and backend_for(torch.device("meta")) == "device"
    monkeypatch.setenv("SUPERMASK_FX_SELECT", "reference")
    assert backend_for(torch.device("cpu")) == "reference"
    monkeypatch.setenv("SUPERMASK_FX_SELECT", "fast")
    with pytest.raises(ValueError, match="SUPERMASK_FX_SELECT='fast' is not a back-end"):
        backend_for(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown selection back-end"):
        set_backend("gpu")
    assert set(BACKENDS) == {"reference", "cpu", "device"}


class Ops(TorchDispatchMode):
    """Counts the operations that compute (views and detaches are metadata only) and refuses host syncs."""

    SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCS:
            raise AssertionError(f"host synchronisation: aten.{name}")
        if not func.is_view and name not in ("detach", "alias"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def refresh_ops(depth: int, **options) -> int:
    set_backend("device")
    try:
        model = popupify(Net(depth), k=0.3, **options)
        optimizer = torch.optim.SGD(supermask_parameters(model), lr=1.0)
        for _ in range(2):  # the second step runs on the plan built by the first
            optimizer.zero_grad()
            model(X).sum().backward()
            optimizer.step()
        first = next(gate for _, gate in gated_layers(model))
        with Ops() as ops, torch.no_grad():
            first.selector.refresh(effective=False)  # stale after the step: selects every layer
        assert all(gate.selector.key == gate.selector.current_key() for _, gate in gated_layers(model))
        return ops.count
    finally:
        set_backend(None)


@pytest.mark.parametrize("options", [{}, {"scope": "global"}])
def test_device_backend_op_count_does_not_grow_with_layers_and_never_syncs(options):
    assert refresh_ops(2, **options) == refresh_ops(9, **options)
