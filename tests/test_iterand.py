"""IteRand against an independent re-implementation, and through files, checkpoints and the global ranking.

The reference below is plain PyTorch: its own seeded draws (the documented generator scheme, ``sha256`` of
``supermask_fx/<seed>/<name>/<role>``), its own top-k (``references.top_k_mask``: ties by lowest index), its own
straight-through score gradient ``g * w * sign(s)`` and its own re-randomization (Chijiwa et al.'s Bernoulli rule:
after every ``freq``-th step, the pruned weights whose U[0, 1) number of role ``rerand<r>/which`` is below
``lambda`` take the draw of role ``rerand<r>``). Nothing of it calls the code under test."""

from __future__ import annotations

import hashlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from references import relu_mlp, top_k_mask
from torch import nn

from supermask_fx import (
    PopupConfig,
    fix_masks,
    gated_layers,
    load_subnetwork,
    materialize,
    popupify,
    restore,
    save_subnetwork,
    supermask_parameters,
)
from supermask_fx.methods import IteRandOptions
from supermask_fx.methods.iterand import rerandomize

# ------------------------------------------------------------------------------------------ the reference


def generator(seed: int, name: str, role: str) -> torch.Generator:
    digest = hashlib.sha256(f"supermask_fx/{seed}/{name}/{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def kaiming_normal(seed: int, name: str, shape, role: str) -> torch.Tensor:
    std = math.sqrt(2.0) / math.sqrt(shape[1])  # ReLU gain, fan_in of an (out, in) matrix
    return torch.randn(shape, generator=generator(seed, name, role)) * std


class Reference:
    """A bias-free ReLU MLP of the given ``(name, (out, in))`` layers trained as IteRand, by hand."""

    def __init__(self, layers, k, seed, freq, fraction, scope="layer", lr=0.5, momentum=0.9):
        self.names = [name for name, _ in layers]
        self.k, self.seed, self.freq, self.fraction, self.scope = k, seed, freq, fraction, scope
        self.weights = [kaiming_normal(seed, name, shape, "weight") for name, shape in layers]
        self.generations = [torch.zeros(shape, dtype=torch.int64) for _, shape in layers]
        self.scores = []
        for name, shape in layers:
            bound = 1.0 / math.sqrt(shape[1])
            drawn = torch.rand(shape, generator=generator(seed, name, "scores")) * 2.0 - 1.0
            self.scores.append((drawn * bound).requires_grad_())
        self.optimizer = torch.optim.SGD(self.scores, lr=lr, momentum=momentum)
        self.steps = 0

    def masks(self):
        if self.scope == "layer":
            return [top_k_mask(s, self.k) for s in self.scores]
        flat = top_k_mask(torch.cat([s.detach().flatten() for s in self.scores]), self.k)
        return [m.view_as(s) for m, s in zip(flat.split([s.numel() for s in self.scores]), self.scores)]

    def forward(self, x):
        effective = [torch.where(m, w, 0.0).requires_grad_() for w, m in zip(self.weights, self.masks())]
        return relu_mlp(x, effective), effective

    def step(self, x, y):
        self.optimizer.zero_grad()
        out, effective = self.forward(x)
        F.cross_entropy(out, y).backward()
        for s, w, w_eff in zip(self.scores, self.weights, effective):
            s.grad = w_eff.grad * w * torch.sign(s.detach())  # straight through the top-k
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.freq == 0:
            self.rerandomize(self.steps // self.freq)

    def rerandomize(self, r):
        for i, (name, mask) in enumerate(zip(self.names, self.masks())):
            shape = self.weights[i].shape
            chosen = torch.rand(shape, generator=generator(self.seed, name, f"rerand{r}/which")) < self.fraction
            redraw = chosen & ~mask
            self.weights[i] = torch.where(redraw, kaiming_normal(self.seed, name, shape, f"rerand{r}"), self.weights[i])
            self.generations[i][redraw] = r


def mlp(*widths):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b, bias=False)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def iterand(model, k=0.5, seed=3, freq=2, fraction=0.5, **kw):
    options = IteRandOptions(rerand_freq=freq, rerand_lambda=fraction)
    return popupify(model, k, method=options, init="kaiming_normal", seed=seed, **kw)


def train(model, batches, lr=0.5, momentum=0.9, optimizer=None):
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr, momentum)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def batches(n, features=12, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, features, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(n)]


def weights(model):
    return [m._parameters[g.param].detach().clone() for m, g in gated_layers(model)]


def generations(model):
    return [m._buffers["generation"].clone() for m, _ in gated_layers(model)]


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_matches(model, ref):
    for (module, gate), w, s, g, m in zip(gated_layers(model), ref.weights, ref.scores, ref.generations, ref.masks()):
        assert torch.equal(module._parameters["scores"].detach(), s.detach()), gate.name
        assert torch.equal(module._parameters["weight"].detach(), w), gate.name
        assert torch.equal(gate.current_mask(module), m), gate.name
        assert torch.equal(module._buffers["generation"].long(), g), gate.name


# ------------------------------------------------------------------------------------------ (a), (e)


def test_sgd_steps_match_an_independent_re_implementation():
    model = iterand(mlp(12, 10), k=0.3, seed=7, freq=2, fraction=0.5)
    ref = Reference([("0.weight", (10, 12))], k=0.3, seed=7, freq=2, fraction=0.5)
    assert_matches(model, ref)
    optimizer = torch.optim.SGD([model[0].scores], lr=0.5, momentum=0.9)
    for x, y in batches(7, features=12, classes=10):
        train(model, [(x, y)], optimizer=optimizer)
        ref.step(x, y)
        assert_matches(model, ref)
    assert int(model[0].rerand_steps) == 7
    assert int(ref.generations[0].max()) == 3  # three re-randomizations, each redrew something
    assert set(torch.unique(ref.generations[0]).tolist()) == {0, 1, 2, 3}


def test_global_scope_matches_the_re_implementation():
    model = iterand(mlp(12, 16, 5), k=0.4, seed=2, freq=1, fraction=0.3, scope="global")
    ref = Reference(
        [("0.weight", (16, 12)), ("2.weight", (5, 16))], k=0.4, seed=2, freq=1, fraction=0.3, scope="global"
    )
    optimizer = torch.optim.SGD([m.scores for m, _ in gated_layers(model)], lr=0.5, momentum=0.9)
    for x, y in batches(5):
        train(model, [(x, y)], optimizer=optimizer)
        ref.step(x, y)
        assert_matches(model, ref)
    kept = [int(m.sum()) for m in ref.masks()]
    assert kept[0] / (16 * 12) != kept[1] / (5 * 16)  # the layers are ranked together: fractions differ


# ------------------------------------------------------------------------------------------ (b)


def test_the_same_seed_gives_the_same_weights_another_seed_others():
    runs = []
    for seed in (4, 4, 5):
        model = iterand(mlp(12, 16, 5), seed=seed)
        train(model, batches(6))
        runs.append((weights(model), generations(model)))
    (w1, g1), (w2, g2), (w3, g3) = runs
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert any(int(g.max()) > 0 for g in g1)
    assert not all(torch.equal(a, b) for a, b in zip(w1, w3))


# ------------------------------------------------------------------------------------------ (c)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5, bias=False),
    )


def image_batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_subnetwork_file_rebuilds_the_redrawn_weights(kind, tmp_path):
    build = (lambda: mlp(784, 300, 100, 10)) if kind == "mlp" else conv_net  # the paper's FC; a small conv net
    data = batches(9, features=784, classes=10) if kind == "mlp" else image_batches(9)
    model = iterand(build(), k=0.5, freq=2, fraction=0.3)
    train(model, data)
    x = data[0][0]
    expected = logits(model, x)
    kept_redrawn = sum(
        int((g[gate.current_mask(m)] > 0).sum()) for (m, gate), g in zip(gated_layers(model), generations(model))
    )
    assert kept_redrawn > 0  # the file must carry redrawn kept weights, else the test proves nothing

    path = tmp_path / f"{kind}.safetensors"
    size = save_subnetwork(model, path)
    gated = sum(w.numel() for w in weights(model))
    print(f"\n{kind}: {size} bytes for {gated} gated weights: {8 * size / gated:.2f} bits per weight")
    loaded = load_subnetwork(build(), path)
    assert torch.equal(logits(loaded, x), expected)
    for (module, gate), w in zip(gated_layers(loaded), weights(model)):
        keep = gate.current_mask(module)
        assert torch.equal(module._parameters["weight"][keep], w[keep])
    again = load_subnetwork(iterand(build(), k=0.5, freq=2, fraction=0.3), path)  # popupified already
    assert torch.equal(logits(again, x), expected)
    if kind == "mlp":  # a mask bit per weight, a "redrawn" bit per kept weight, a byte per redrawn kept weight
        kept = gated // 2
        assert 8 * size <= gated + kept + 8 * kept_redrawn + 8 * 8192  # (and the header)


def test_file_generations_take_the_smallest_unsigned_type(tmp_path):
    model = iterand(mlp(8, 8), k=0.5, freq=1, fraction=0.5)
    module, gate = next(iter(gated_layers(model)))
    with torch.no_grad():
        rerandomize(gate, module, 300, 1.0)  # the 300th re-randomization: every pruned weight redrawn
    train(model, batches(3, features=8, classes=8), lr=5.0)  # masks move: some of them now kept
    assert int(module._buffers["generation"][gate.current_mask(module)].max()) == 300
    save_subnetwork(model, tmp_path / "wide.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "wide.safetensors", framework="pt") as f:
        assert f.get_tensor("extra/0.weight/generation").dtype == torch.uint16
    x = batches(1, features=8, classes=8)[0][0]
    assert torch.equal(logits(load_subnetwork(mlp(8, 8), tmp_path / "wide.safetensors"), x), logits(model, x))


# ------------------------------------------------------------------------------------------ (d)


def test_a_checkpoint_resumes_bit_for_bit():
    data = batches(14)
    uninterrupted = iterand(mlp(12, 16, 5), freq=3)
    train(uninterrupted, data)

    first = iterand(mlp(12, 16, 5), freq=3)
    optimizer = train(first, data[:7])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed = iterand(mlp(12, 16, 5), freq=3)
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], 0.5, 0.9)
    optimizer.load_state_dict(saved["optimizer"])
    train(resumed, data[7:], optimizer=optimizer)

    for a, b in zip(weights(uninterrupted) + generations(uninterrupted), weights(resumed) + generations(resumed)):
        assert torch.equal(a, b)
    for (m1, _), (m2, _) in zip(gated_layers(uninterrupted), gated_layers(resumed)):
        assert torch.equal(m1.scores, m2.scores) and int(m2.rerand_steps) == 14
    x = data[0][0]
    assert torch.equal(logits(resumed, x), logits(uninterrupted, x))
    assert torch.equal(logits(restore(mlp(12, 16, 5), uninterrupted.state_dict()), x), logits(uninterrupted, x))


def test_state_dict_round_trip_and_a_wider_generation_buffer():
    model = iterand(mlp(12, 16, 5), freq=2)
    train(model, batches(4))
    module, gate = next(iter(gated_layers(model)))
    rerandomize(gate, module, 40_000, 0.5)  # past int16: the buffer widens
    assert module._buffers["generation"].dtype == torch.int32
    other = iterand(mlp(12, 16, 5), freq=2)
    other.load_state_dict(model.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(weights(model) + generations(model), weights(other) + generations(other))
    )
    x = batches(1)[0][0]
    assert torch.equal(logits(other, x), logits(model, x))


def test_a_damaged_generation_is_refused_by_the_weight_check():
    model = iterand(mlp(12, 16, 5), freq=2)
    train(model, batches(6))
    module, gate = next(iter(gated_layers(model)))
    assert int(module.generation[gate.current_mask(module)].max()) > 0  # a kept weight was redrawn
    state = model.state_dict()
    state["0.generation"] = torch.zeros_like(state["0.generation"])  # as if never redrawn: other kept weights
    with pytest.raises(RuntimeError, match="0.weight: not this model's random weight"):
        iterand(mlp(12, 16, 5), freq=2).load_state_dict(state)


# ------------------------------------------------------------------------------------------ materialize, fix_masks


def test_materialize_and_fix_masks(tmp_path):
    model = iterand(mlp(12, 16, 5), freq=2)
    train(model, batches(6))
    x = batches(1)[0][0]
    expected = logits(model, x)
    plain = materialize(model)
    assert "0.generation" not in plain.state_dict()
    fresh = mlp(12, 16, 5)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(logits(fresh, x), expected)

    fix_masks(model)
    before = weights(model)
    for _ in range(4):  # as if optimizer steps still reached it: no redraw under a fixed mask
        for module, gate in gated_layers(model):
            gate.method.after_step(gate, module)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    save_subnetwork(model, tmp_path / "fixed.safetensors")
    assert torch.equal(logits(load_subnetwork(mlp(12, 16, 5), tmp_path / "fixed.safetensors"), x), expected)


# ------------------------------------------------------------------------------------------ (f)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rerand_freq": 0}, "rerand_freq=0 must be a positive integer"),
        ({"rerand_freq": 2.5}, "rerand_freq=2.5 must be a positive integer"),
        ({"rerand_freq": True}, "rerand_freq=True must be a positive integer"),
        ({"rerand_lambda": 1.5}, r"rerand_lambda=1.5 is not in \[0, 1\]"),
        ({"rerand_lambda": -0.1}, r"rerand_lambda=-0.1 is not in \[0, 1\]"),
        ({"rerand_lambda": float("nan")}, "rerand_lambda=nan must be a number"),
        ({"rerand_lambda": "often"}, "rerand_lambda='often' must be a number"),
        ({"rerand_rate": 0.5}, "no option 'rerand_rate'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        PopupConfig(k=0.5, method="iterand", method_options=options)


def test_kept_weights_are_refused():
    with pytest.raises(ValueError, match="init='keep' has none"):
        popupify(mlp(12, 5), 0.5, method="iterand", init="keep")


def test_defaults_are_the_authors():
    assert IteRandOptions() == IteRandOptions(rerand_freq=300, rerand_lambda=0.1)


def test_a_model_that_is_gone_is_freed():
    """The registry that runs the redraws after optimizer steps holds nothing strongly: a deleted IteRand model is
    freed (it once kept every such model alive: the entry held the gate, whose selection holds the module)."""
    import gc
    import weakref

    model = popupify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), k=0.5, method="iterand",
                     method_options={"rerand_freq": 1})  # fmt: skip
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    before = model[0]._buffers["generation"].clone()
    optimizer.step()
    assert not torch.equal(model[0]._buffers["generation"], before)  # the redraw ran after the step
    gone = [weakref.ref(m) for m in model.modules()]  # the gated layers too, not only the container
    del model, optimizer
    gc.collect()
    assert all(ref() is None for ref in gone)
