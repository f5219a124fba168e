"""Gated Linear/Conv layers rebuild w * mask in the backward instead of keeping it (supermask_fx/core/recompute.py)."""

import gc
import os
import weakref

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from supermask_fx import popupify, supermask_parameters
from supermask_fx.core.recompute import RecomputeEffective


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 5)  # F.linear saves w_eff.t(): a view of w_eff
        self.tied = nn.Linear(5, 5, bias=False)  # called twice per forward

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.tied(torch.tanh(self.tied(self.fc(h))))


def _pair(memory_format=torch.contiguous_format, storage=None):
    """Two equal models that rebuild ``w * mask`` in the backward (``rebuild_effective=True``; the default with
    dense weights, which ``storage=None`` leaves to the forced options of a test run)."""
    torch.manual_seed(0)
    a = popupify(Net(), k=0.4, rebuild_effective=True, weight_storage=storage).to(memory_format=memory_format)
    torch.manual_seed(0)
    b = popupify(Net(), k=0.4, rebuild_effective=True, weight_storage=storage).to(memory_format=memory_format)
    return a, b


def _grads(model):
    return [p.grad for p in supermask_parameters(model)]


@pytest.mark.parametrize("storage", ["dense", "bits"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_same_gradients_as_keeping_the_effective_weight(memory_format, storage):
    a, b = _pair(memory_format, storage)
    x = torch.randn(4, 3, 4, 4).to(memory_format=memory_format)
    for _ in range(2):  # also after the masks' first refresh
        a(x).square().sum().backward()
        with saved_tensors_hooks(lambda t: t, lambda t: t):  # another pair of hooks: ours stand aside
            b(x).square().sum().backward()
        for ga, gb in zip(_grads(a), _grads(b)):
            assert torch.equal(ga, gb)


def test_effective_weights_are_rebuilt_not_kept(monkeypatch):
    model, _ = _pair()
    alive, recipes = [], []
    real_register, real_pack = RecomputeEffective.register, RecomputeEffective.pack

    def register(self, effective, weight, mask, name):
        alive.append(weakref.ref(effective))
        real_register(self, effective, weight, mask, name)

    def pack(self, t):
        packed = real_pack(self, t)
        recipes.append(not isinstance(packed, tuple))
        return packed

    monkeypatch.setattr(RecomputeEffective, "register", register)
    monkeypatch.setattr(RecomputeEffective, "pack", pack)
    loss = model(torch.randn(4, 3, 4, 4)).sum()
    gc.collect()
    assert len(alive) == 4 and all(ref() is None for ref in alive)  # conv, fc, tied twice: all freed
    assert sum(recipes) == 4  # each layer's saved weight is a recipe; x and the scores are kept as they are
    loss.backward()
    assert all(p.grad is not None for p in supermask_parameters(model))


def test_an_input_modified_in_place_is_still_caught():
    model, _ = _pair()
    h = torch.randn(4, 96)
    out = model.fc(h)
    h.add_(1)  # the linear layer saved h for its weight gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_masks_changed_before_the_backward_are_caught():
    model, _ = _pair()
    opt = torch.optim.SGD(supermask_parameters(model), lr=10.0)
    x = torch.randn(4, 3, 4, 4)
    stale = model(x).sum()
    model(x).sum().backward()
    opt.step()
    model(x)  # new masks
    with pytest.raises(RuntimeError, match="changed between a forward and its backward"):
        stale.backward()


def test_under_activation_checkpointing():
    a, b = _pair()
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    checkpoint(a, x, use_reentrant=False).sum().backward()
    b(x).sum().backward()
    for ga, gb in zip(_grads(a), _grads(b)):
        assert torch.allclose(ga, gb, rtol=1e-6, atol=1e-7)


def test_rebuild_effective_false_keeps_w_mask_and_trains_the_same(monkeypatch, tmp_path):
    """``PopupConfig(rebuild_effective=False)``: each layer's saved weight is the ``w * mask`` of the forward (no
    recipe, no rebuild in the backward), and two training steps give the same scores bit for bit. It is a way of
    holding the same values: a file of one loads into the other."""
    from supermask_fx import PopupConfig, load_subnetwork, save_subnetwork
    from supermask_fx.selection.layer_mask import LayerMask

    torch.manual_seed(0)
    rebuilt = popupify(Net(), k=0.4, rebuild_effective=True)
    torch.manual_seed(0)
    kept = popupify(Net(), k=0.4, rebuild_effective=False)
    recipes, applies = [], []
    real_pack, real_apply = RecomputeEffective.pack, LayerMask.apply
    monkeypatch.setattr(RecomputeEffective, "pack", lambda self, t: recipes.append(t) or real_pack(self, t))
    monkeypatch.setattr(LayerMask, "apply", lambda self, *a, **k: applies.append(1) or real_apply(self, *a, **k))
    x = torch.randn(4, 3, 4, 4)
    for model in (rebuilt, kept):
        optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5, momentum=0.9)
        recipes.clear(), applies.clear()
        for _ in range(2):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        if model is kept:
            assert recipes == [] and len(applies) == 2 * 4  # one w * mask per layer read, none rebuilt
        else:
            assert recipes and len(applies) == 2 * 8  # each read's w * mask built again in the backward
    for a, b in zip(supermask_parameters(rebuilt), supermask_parameters(kept)):
        assert torch.equal(a, b)
    save_subnetwork(kept, tmp_path / "kept.sfx")
    loaded = load_subnetwork(Net(), tmp_path / "kept.sfx").eval()
    assert torch.equal(loaded(x), rebuilt.eval()(x))
    with pytest.raises(ValueError, match="rebuild_effective"):
        PopupConfig(k=0.4, rebuild_effective="no")


@pytest.mark.skipif("SUPERMASK_FX_TEST_FORCE" in os.environ, reason="asserts the defaults a forced option replaces")
@pytest.mark.parametrize("storage, rebuilds", [("dense", True), ("bits", False)])
def test_by_default_float_weights_rebuild_and_sign_bits_keep(monkeypatch, storage, rebuilds):
    """``rebuild_effective=None`` (the default) rebuilds ``w * mask`` in the backward over float weights and keeps
    it over sign-bit weights (whose bits free more than the kept copies hold)."""
    recipes = []
    real_pack = RecomputeEffective.pack
    monkeypatch.setattr(RecomputeEffective, "pack", lambda self, t: recipes.append(t) or real_pack(self, t))
    model = popupify(Net(), k=0.4, weight_storage=storage)
    model(torch.randn(4, 3, 4, 4)).sum().backward()
    assert bool(recipes) == rebuilds
    assert all(p.grad is not None for p in supermask_parameters(model))
