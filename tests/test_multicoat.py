"""Multicoated supermasks (``method="multicoat"``) against an independent re-implementation, and through files,
checkpoints, ``materialize``, ``fix_masks``, ``set_k`` and the global ranking.

The reference below is plain PyTorch: its own top-k (a stable descending sort of ``|s|``, NaN lowest: ties by
lowest flat index), its own coats (the outer one of ``K_1 = numel - int((1 - k) * numel)`` entries, per layer or
the layer's share of one global ranking; coat ``c`` the top ``max(1, int(r_c * K_1))`` of the layer), its own
``L = sum_c alpha_c * m_c`` and its own gradient ``sign(s) * w * dL/dw_eff * sum_c alpha_c``. It starts from the
model's drawn weights and scores and calls nothing else of the code under test."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from references import relu_mlp
from safetensors import safe_open
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
    set_k,
)
from supermask_fx.methods import MulticoatOptions
from supermask_fx.methods.multicoat import inner_levels
from supermask_fx.selection import set_backend

BACKENDS = ("reference", "cpu", "device")

# ------------------------------------------------------------------------------------------ the reference


def ref_top_k(values: torch.Tensor, kept: int) -> torch.Tensor:
    """The ``kept`` largest ``|values|`` (NaN below every number), ties by lowest flat index."""
    flat = values.detach().abs().flatten()
    flat = torch.where(torch.isnan(flat), torch.full_like(flat, -1.0), flat)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:kept]] = True
    return mask.view(values.shape)


def ref_kept(numel: int, k: float) -> int:
    return max(1, numel - int((1 - k) * numel))


def ref_coats(scores: list[torch.Tensor], k: float, ratios, scope: str = "layer") -> list[list[torch.Tensor]]:
    """Per layer, its coats ``[m_1, ..., m_C]`` (bool, shaped like the scores)."""
    if scope == "layer":
        outer = [ref_top_k(s, ref_kept(s.numel(), k)) for s in scores]
    else:
        flat = torch.cat([s.detach().flatten() for s in scores])
        joint = ref_top_k(flat, ref_kept(flat.numel(), k))
        outer = [m.view(s.shape) for m, s in zip(joint.split([s.numel() for s in scores]), scores)]
    out = []
    for s, m in zip(scores, outer):
        kept = int(m.sum())
        inner = [ref_top_k(s, max(1, int(r * kept))) if kept else torch.zeros_like(m) for r in ratios]
        out.append([m, *inner])
    return out


class Reference:
    """A bias-free ReLU MLP trained as multicoat, by hand, from the given weights and scores."""

    def __init__(self, weights, scores, k, ratios, scales, scope="layer", lr=0.5, momentum=0.9):
        self.weights = [w.detach().clone() for w in weights]
        self.scores = [s.detach().clone().requires_grad_() for s in scores]
        self.k, self.ratios, self.scales, self.scope = k, ratios, scales, scope
        self.optimizer = torch.optim.SGD(self.scores, lr=lr, momentum=momentum)

    def levels(self):
        return [
            sum(alpha * m.float() for alpha, m in zip(self.scales, coats))
            for coats in ref_coats(self.scores, self.k, self.ratios, self.scope)
        ]

    def forward(self, x):
        effective = [(w * L).requires_grad_() for w, L in zip(self.weights, self.levels())]
        return relu_mlp(x, effective), effective

    def step(self, x, y):
        self.optimizer.zero_grad()
        out, effective = self.forward(x)
        F.cross_entropy(out, y).backward()
        total = sum(self.scales)
        for s, w, w_eff in zip(self.scores, self.weights, effective):
            s.grad = torch.sign(s.detach()) * w * w_eff.grad * total  # straight through every coat
        self.optimizer.step()
        return out


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend(None)


def mlp(*widths):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers += [nn.Linear(a, b, bias=False)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5, bias=False),
    )


def multicoat(model, k=0.3, coats=2, seed=3, **kw):
    options = {name: kw.pop(name) for name in ("ratios", "scales") if name in kw}
    return popupify(model, k, method=MulticoatOptions(coats=coats, **options), seed=seed, **kw)


def batches(n, features=12, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, features, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(n)]


def image_batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def train(model, data, lr=0.5, momentum=0.9):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr, momentum)
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def levels_of(model):
    return [gate.method.levels(gate, module).clone() for module, gate in gated_layers(model)]


def tensors(model, name):
    return [module._parameters[name].detach().clone() for module, _ in gated_layers(model)]


# ------------------------------------------------------------------------------------------ (a), (f)


CASES = [
    (2, (), (1.0, 1.0)),  # the defaults: ratio 1/4
    (3, (), (1.0, 1.0, 1.0)),  # ratios 1/4, 1/9
    (3, (0.5, 0.125), (1.0, 0.5, 0.25)),  # own ratios and scales (dyadic: the reference's sums are exact)
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("coats, ratios, scales", CASES)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_forward_gradient_and_sgd_steps_match_the_re_implementation(backend, coats, ratios, scales, scope):
    options = {"ratios": ratios} if ratios else {}
    options.update({"scales": scales} if scales != (1.0,) * coats else {})
    model = multicoat(mlp(12, 16, 5), k=0.3, coats=coats, seed=7, scope=scope, **options)
    ratios = ratios or tuple(1.0 / c**2 for c in range(2, coats + 1))
    ref = Reference(tensors(model, "weight"), tensors(model, "scores"), 0.3, ratios, scales, scope)
    optimizer = torch.optim.SGD([m.scores for m, _ in gated_layers(model)], lr=0.5, momentum=0.9)
    for x, y in batches(5):
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        expected = ref.step(x, y)
        assert torch.equal(out, expected)
        for (module, gate), s in zip(gated_layers(model), ref.scores):
            assert torch.equal(module.scores.grad, s.grad), gate.name
        optimizer.step()
        for (module, gate), s, L, w in zip(gated_layers(model), ref.scores, ref.levels(), ref.weights):
            assert torch.equal(module.scores.detach(), s.detach()), gate.name
            with torch.no_grad():
                assert torch.equal(module.weight, w * L), gate.name  # a training read after the step
    kept = [int(coats[0].sum()) for coats in ref_coats(ref.scores, 0.3, ratios, scope)]
    if scope == "global":
        assert kept[0] / (16 * 12) != kept[1] / (5 * 16)  # ranked together: the layers' fractions differ
    x = batches(1, seed=9)[0][0]
    assert torch.equal(logits(model, x), ref.forward(x)[0])


def test_the_gradient_passes_every_coat_and_the_weights_get_theirs():
    model = multicoat(nn.Sequential(nn.Linear(10, 6, bias=False)), k=0.5, coats=3, scales=(2.0, 1.0, 0.5))
    layer = model[0]
    layer._parameters["weight"].requires_grad_(True)  # trainable weights too: dL/dw = dL/dw_eff * L
    x = torch.randn(4, 10)
    out = model(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    g_eff = g.t() @ x
    L = sum(a * m.float() for a, m in zip((2.0, 1.0, 0.5), ref_coats([layer.scores], 0.5, (1 / 4, 1 / 9))[0]))
    w, s = layer._parameters["weight"].detach(), layer.scores.detach()
    assert torch.allclose(layer.scores.grad, torch.sign(s) * w * g_eff * 3.5, atol=1e-6)
    assert torch.allclose(layer._parameters["weight"].grad, g_eff * L, atol=1e-6)


# ------------------------------------------------------------------------------------------ (b)


def test_one_coat_is_edge_popup_bit_for_bit(tmp_path):
    models = [popupify(mlp(12, 16, 5), 0.3, method="edge_popup", seed=4), multicoat(mlp(12, 16, 5), coats=1, seed=4)]
    data, x = batches(4), batches(1, seed=9)[0][0]
    for model in models:
        train(model, data)
    edge, coat = models
    assert all(torch.equal(a, b) for a, b in zip(tensors(edge, "scores"), tensors(coat, "scores")))
    assert torch.equal(logits(edge, x), logits(coat, x))
    one, two = edge.state_dict(), coat.state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one if not key.startswith("supermask_fx."))
    for model in models:
        fix_masks(model)
    assert not any(name.endswith("coat_levels") for name, _ in coat.named_buffers())
    assert torch.equal(logits(edge, x), logits(coat, x))
    module, gate = next(iter(gated_layers(coat)))
    assert gate.method.buffer_names(gate) == () and gate.method.file_tensors(gate, module, module.mask) == {}


# ------------------------------------------------------------------------------------------ (c)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("k", [0.05, 0.3, 0.7])
def test_coats_are_nested_top_k_with_exact_counts(backend, k):
    ratios = (0.4, 0.15, 0.05)
    model = multicoat(conv_net(), k=k, coats=4, ratios=ratios)
    train(model, image_batches(2))
    for module, _ in gated_layers(model):
        with torch.no_grad():  # ties at every magnitude, a NaN and an infinity: the rule decides
            module.scores.copy_(torch.round(module.scores * 20) / 20)
            module.scores.view(-1)[[3, 11]] = torch.tensor([float("nan"), float("inf")])
    for (module, gate), (scores, levels) in zip(gated_layers(model), zip(tensors(model, "scores"), levels_of(model))):
        kept = ref_kept(scores.numel(), k)
        assert torch.equal(levels >= 1, gate.current_mask(module)), gate.name
        for c, ratio in enumerate(ratios, start=2):
            coat = levels >= c
            assert int(coat.sum()) == max(1, int(ratio * kept)), (gate.name, c)
            assert torch.equal(coat, ref_top_k(scores, max(1, int(ratio * kept)))), (gate.name, c)
            assert not (coat & (levels < c - 1)).any()  # inside coat c - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_levels_of_independent_rows_every_back_end(backend):
    g = torch.Generator().manual_seed(5)
    magnitudes = (torch.randint(0, 6, (4, 50), generator=g) / 5.0).abs()  # many ties
    magnitudes[1, [0, 7]] = float("nan")
    kept = torch.tensor([20, 0, 1, 50])  # a row whose outer coat is empty keeps no inner coat
    ratios = (0.5, 0.2)
    counts = inner_levels(magnitudes, kept, ratios, backend)
    for row, outer in enumerate(kept.tolist()):
        expected = sum(
            (ref_top_k(magnitudes[row], max(1, int(r * outer))) if outer else torch.zeros(50, dtype=torch.bool)).to(
                torch.uint8
            )
            for r in ratios
        )
        assert torch.equal(counts[row], expected), row


def test_the_default_ratios_keep_close_to_the_authors_fractions():
    model = multicoat(nn.Sequential(nn.Linear(1000, 100, bias=False)), k=0.3, coats=3)
    levels = levels_of(model)[0]
    fractions = [float((levels >= c).float().mean()) for c in (1, 2, 3)]
    assert fractions == pytest.approx([0.3, 0.075, 0.0333], abs=1e-4)  # the authors: 0.3, 0.0788, 0.0315


def test_set_k_moves_every_coat():
    model = multicoat(mlp(12, 16, 5), k=0.3, coats=3)
    set_k(model, 0.6)
    for (module, gate), levels in zip(gated_layers(model), levels_of(model)):
        kept = ref_kept(module.scores.numel(), 0.6)
        assert [int((levels >= c).sum()) for c in (1, 2, 3)] == [kept, kept // 4, max(1, kept // 9)], gate.name


# ------------------------------------------------------------------------------------------ (d)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("coats", [2, 3])
def test_a_subnetwork_file_keeps_every_coat(kind, coats, tmp_path):
    build = (lambda: mlp(784, 300, 100, 10)) if kind == "mlp" else conv_net  # the paper's FC; a small conv net
    data = batches(3, features=784, classes=10) if kind == "mlp" else image_batches(3)
    model = multicoat(build(), k=0.3, coats=coats)
    train(model, data)
    x = data[0][0]
    expected = logits(model, x)
    path = tmp_path / f"{kind}.safetensors"
    size = save_subnetwork(model, path)
    gated = sum(w.numel() for w in tensors(model, "weight"))
    parts = {"mask": 0, "extra": 0}
    with safe_open(path, "pt") as file:
        for name in file.keys():
            if name.split("/")[0] in parts:
                parts[name.split("/")[0]] += 8 * file.get_tensor(name).numel()  # uint8: bits
    planes = sum((int((levels >= c).sum()) + 7) // 8 * 8 for levels in levels_of(model) for c in range(1, coats))
    assert parts["extra"] == planes  # one bit per weight of coat c - 1, for c = 2..C (padded to bytes per layer)
    print(
        f"\n{kind}, {coats} coats, k=0.3: {size} bytes for {gated} gated weights: {8 * size / gated:.3f} bits per "
        f"weight (the masks {parts['mask'] / gated:.3f}, the inner coats' planes {planes / gated:.3f}, the header "
        f"and state the rest)"
    )
    loaded = load_subnetwork(build(), path)
    assert torch.equal(logits(loaded, x), expected)
    assert all(torch.equal(a, b) for a, b in zip(levels_of(loaded), levels_of(model)))
    again = load_subnetwork(multicoat(build(), k=0.3, coats=coats), path)  # popupified already
    assert torch.equal(logits(again, x), expected)
    assert torch.equal(logits(materialize(loaded), x), expected)
    if kind == "mlp":  # the mask (Rice-coded, about H(0.3) = 0.88 bits), K_1 + K_2 + ... bits, a header of 0.08
        expected_planes = 0.3 + (0.3 / 4 if coats == 3 else 0.0)
        assert abs(planes / gated - expected_planes) < 1e-3
        assert parts["mask"] / gated < 0.89
        assert 8 * size / gated < 0.89 + expected_planes + 0.1


def test_a_file_with_missing_or_misshapen_planes_is_refused():
    model = multicoat(mlp(12, 16, 5), coats=3)
    module, gate = next(iter(gated_layers(model)))
    mask = gate.current_mask(module)
    planes = gate.method.file_tensors(gate, module, mask)
    assert sorted(planes) == ["coat2", "coat3"]
    with pytest.raises(ValueError, match="coat2.*coat3.*the file has \\['coat2'\\]"):
        gate.method.load_file_tensors(gate, module, {"coat2": planes["coat2"]}, mask)
    with pytest.raises(ValueError, match="coat 1 keeps 58 weights"):
        gate.method.load_file_tensors(gate, module, {**planes, "coat2": planes["coat2"][:-1]}, mask)


# ------------------------------------------------------------------------------------------ (e)


def test_state_dict_round_trip_restore_and_materialize():
    model = multicoat(conv_net(), k=0.3, coats=3)
    train(model, image_batches(3))
    x = image_batches(1)[0][0]
    expected = logits(model, x)
    state = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    for (module, _), levels in zip(gated_layers(model), levels_of(model)):
        name = f"{names[id(module)]}.weight"
        assert torch.equal(state[name], torch.where(levels > 0, module._parameters["weight"] * levels, 0.0))
        assert set(torch.unique(levels).tolist()) == {0, 1, 2, 3}
    fresh = multicoat(conv_net(), k=0.3, coats=3)
    fresh.load_state_dict(state)
    assert torch.equal(logits(fresh, x), expected)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.equal(logits(restore(conv_net(), torch.load(buffer)), x), expected)
    plain = materialize(model)
    assert not any("coat_levels" in name or "scores" in name for name in plain.state_dict())
    assert torch.equal(logits(plain, x), expected)
    damaged = dict(state)
    damaged["0.weight"] = damaged["0.weight"] * 1.5
    with pytest.raises(RuntimeError, match="not this model's random weight"):
        multicoat(conv_net(), k=0.3, coats=3).load_state_dict(damaged)


def test_fix_masks_keeps_the_levels_through_state_dicts_files_and_retraining(tmp_path):
    model = multicoat(conv_net(), k=0.3, coats=3)
    train(model, image_batches(3))
    x = image_batches(1)[0][0]
    expected, levels = logits(model, x), levels_of(model)
    fix_masks(model)
    assert torch.equal(logits(model, x), expected)
    assert all(torch.equal(module.coat_levels, lv) for (module, _), lv in zip(gated_layers(model), levels))
    assert not any(p.requires_grad for p in model.parameters())  # the scores no longer train
    state = model.state_dict()
    assert state["0.coat_levels"].dtype == torch.uint8 and "0.mask" in state
    other = fix_masks(multicoat(conv_net(), k=0.3, coats=3))  # other levels, replaced by the load
    other.load_state_dict(state)
    assert torch.equal(logits(other, x), expected)
    assert torch.equal(logits(materialize(model), x), expected)
    path = tmp_path / "fixed.safetensors"
    save_subnetwork(model, path)
    assert torch.equal(logits(load_subnetwork(conv_net(), path), x), expected)
    fix_masks(model, train_weights=True)  # retraining the weights under the fixed levels: dL/dw = dL/dw_eff * L
    model.train()
    layer = model[7]
    out = model(x)
    out.sum().backward()
    assert layer.weight.requires_grad and layer._parameters["weight"].grad is not None
    dropped = layer.coat_levels == 0
    assert (layer._parameters["weight"].grad[dropped] == 0).all()


def test_custom_ratios_and_scales_files_and_restore(tmp_path):
    model = multicoat(mlp(12, 16, 5), k=0.4, coats=3, ratios=(0.5, 0.2), scales=(1.0, 0.5, 0.25))
    train(model, batches(3))
    x = batches(1, seed=9)[0][0]
    expected = logits(model, x)
    path = tmp_path / "custom.safetensors"
    save_subnetwork(model, path)
    assert torch.equal(logits(load_subnetwork(mlp(12, 16, 5), path), x), expected)
    assert torch.equal(logits(restore(mlp(12, 16, 5), model.state_dict()), x), expected)


def test_custom_ratios_load_into_a_popupified_model():
    def build():
        return multicoat(mlp(12, 16, 5), k=0.4, coats=3, ratios=(0.5, 0.2))

    model = build()
    train(model, batches(2))
    x = batches(1, seed=9)[0][0]
    fresh = build()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, x), logits(model, x))


# ------------------------------------------------------------------------------------------ (g)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"coats": 0}, "coats=0 must be an integer from 1"),
        ({"coats": 2.0}, "coats=2.0 must be an integer"),
        ({"coats": True}, "coats=True must be an integer"),
        ({"coats": 3, "ratios": (0.25,)}, "has 1 values and coats=3 needs 2"),
        ({"coats": 3, "ratios": (0.1, 0.2)}, "strictly decreasing"),
        ({"coats": 2, "ratios": (1.0,)}, "strictly decreasing fractions in \\(0, 1\\)"),
        ({"coats": 2, "ratios": (0.0,)}, "strictly decreasing fractions in \\(0, 1\\)"),
        ({"coats": 2, "ratios": 0.25}, "must be a tuple of numbers"),
        ({"coats": 2, "ratios": (float("nan"),)}, "finite numbers"),
        ({"coats": 2, "scales": (1.0,)}, "has 1 values and coats=2 needs 2"),
        ({"coats": 2, "scales": (1.0, -1.0)}, "must be positive"),
        ({"coat": 2}, "has no option 'coat'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        popupify(mlp(12, 5), 0.3, method="multicoat", method_options=options)


def test_options_are_spelled_coats_and_stored_in_the_config():
    model = popupify(mlp(12, 5), 0.3, method="multicoat", method_options={"coats": 3})
    config = next(gate.config for _, gate in gated_layers(model))
    assert config.method == "multicoat" and dict(config.method_options) == {"coats": 3}
    assert PopupConfig(0.3, method=MulticoatOptions(coats=3)) == config
