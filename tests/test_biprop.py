"""biprop against an independent re-implementation on small layers: the forward ``alpha * sign(w) * m`` with ``m`` the
top-k of ``|s|`` (ties by lowest index) and ``alpha`` the mean kept ``|w|``; the score gradient
``g * alpha * sign(w) * sign(s)``; the gain following ``k``; files, restore and materialize reproduce the outputs."""

from __future__ import annotations

import torch
from torch import nn

from supermask_fx import gated_layers, kept_count, load_subnetwork, materialize, popupify, restore, save_subnetwork


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Conv1d(1, 3, 5, bias=False))


def reference(weight, scores, k):
    flat = scores.detach().abs().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[: kept_count(flat.numel(), k)]] = True
    keep = keep.view_as(scores)
    alpha = weight.detach().abs()[keep].mean()
    return alpha * torch.sign(weight.detach()) * keep, alpha, keep


def test_forward_and_score_gradient_match_a_re_implementation():
    model = nn.Sequential(nn.Linear(12, 16, bias=False))
    torch.manual_seed(0)
    popupify(model, k=0.3, method="biprop", init="kaiming_normal", seed=5)
    layer = model[0]
    w, s = layer._parameters["weight"], layer._parameters["scores"]
    expected, alpha, keep = reference(w, s, 0.3)
    x = torch.randn(4, 12)
    out = model(x)
    assert torch.allclose(layer.weight, expected)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    g_w = g.t() @ x  # dL/dw_eff of a linear layer, by hand
    assert torch.allclose(s.grad, g_w * alpha * torch.sign(w.detach()) * torch.sign(s.detach()), atol=1e-6)


def test_the_gain_follows_k():
    alphas = []
    for k in (0.1, 0.5, 1.0):
        model = popupify(nn.Sequential(nn.Linear(64, 64, bias=False)), k=k, method="biprop", init="kaiming_normal")
        layer = model[0]
        _, alpha, keep = reference(layer._parameters["weight"], layer._parameters["scores"], k)
        values = layer.weight[keep].abs()
        assert torch.allclose(values, torch.full_like(values, float(alpha)))
        alphas.append(float(alpha))
    assert len(set(alphas)) == 3  # a different kept set, a different gain


def test_files_restore_and_materialize_reproduce_the_outputs(tmp_path):
    model = popupify(net(), k=0.5, method="biprop", init="kaiming_normal", seed=1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(2, 1, 12)
    for _ in range(3):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for module, gate in gated_layers(model):
            reference_weight, _, _ = reference(module._parameters["weight"], module._parameters["scores"], 0.5)
            assert torch.allclose(getattr(module, gate.param), reference_weight)
        save_subnetwork(model, tmp_path / "b.safetensors")
        assert torch.equal(load_subnetwork(net(), tmp_path / "b.safetensors").eval()(x), expected)
        assert torch.equal(restore(net(), model.state_dict()).eval()(x), expected)
        assert torch.equal(materialize(model).eval()(x), expected)
