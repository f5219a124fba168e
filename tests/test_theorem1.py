"""The paper's Theorem 1, empirically, for the gradient this library computes.

Theorem 1 (Ramanujan et al. 2020, Section 3): when an edge swaps into the subnetwork in place of another, the
mini-batch loss decreases, "provided the loss is sufficiently smooth". The proof is first order: an entering edge e
overtakes a leaving edge l only if its score moved more, which with the straight-through update means
``w_e * G_e - w_l * G_l < 0`` (``G = dL/dW_eff`` at the old point). So the first-order loss change of the step,
``sum(G * (W_eff_after - W_eff_before))``, is negative whenever masks change: an exact consequence checked at every
such step below, with ``G`` from a plain re-implementation of the network (not from the library). The actual loss
also contains the second-order term (the swap changes a neuron's input by a finite amount that a small learning rate
does not shrink), so the measured loss decreases on most, not all, swap steps; we require 80 % (measured here:
85-99 % over seeds) and steps without swaps must leave the loss exactly unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from supermask_fx import popupify, supermask_parameters


def plain_loss(weights, x, t):
    """The same network written out by hand: relu(x W1^T) W2^T, squared error."""
    return F.mse_loss((F.relu(x @ weights[0].T) @ weights[1].T).squeeze(1), t)


def test_swaps_descend_to_first_order_and_lower_the_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 32, bias=False), nn.ReLU(), nn.Linear(32, 1, bias=False))
    model = popupify(net, k=0.5, seed=0)
    layers = [model[0], model[2]]
    opt = torch.optim.SGD(supermask_parameters(model), lr=0.002)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    t = 3 * torch.tanh(x @ torch.randn(256, generator=g) / 16)  # a target the random subnetwork cannot fit exactly
    swap_steps = lowered = unchanged = 0
    for _ in range(200):
        before = [m.weight.detach().clone().requires_grad_(True) for m in layers]
        loss = plain_loss(before, x, t)
        grads = torch.autograd.grad(loss, before)
        opt.zero_grad()
        F.mse_loss(model(x).squeeze(1), t).backward()
        opt.step()
        deltas = [m.weight.detach() - w.detach() for m, w in zip(layers, before)]
        with torch.no_grad():
            after = F.mse_loss(model(x).squeeze(1), t)
        if all(d.abs().sum() == 0 for d in deltas):
            unchanged += 1
            assert after == loss.detach()
            continue
        swap_steps += 1
        first_order = sum((gr * d).sum() for gr, d in zip(grads, deltas))
        assert first_order < 0, f"a swap step predicted a first-order loss increase of {first_order.item()}"
        lowered += int(after < loss.detach())
    assert swap_steps >= 50 and unchanged >= 10, (swap_steps, unchanged)
    assert lowered >= 0.8 * swap_steps, f"loss lowered on only {lowered} of {swap_steps} swap steps"
