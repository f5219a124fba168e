"""popupify: discovery, freezing, initialization, methods, caching, and the errors users meet."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supermask_fx import (
    INITIALIZERS,
    PopupConfig,
    fix_masks,
    gated_layers,
    kept_count,
    mask_stats,
    popupify,
    refresh_masks,
    supermask_parameters,
)
from supermask_fx.core.state import RECORD_KEY


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class FunctionalWeight(nn.Module):
    """A custom layer that reads its weight through F.linear: only the fx pass finds it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.gamma = nn.Parameter(torch.ones(6))  # not a weight: frozen, not gated

    def forward(self, x):
        return F.linear(x, self.w) * self.gamma


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.custom = FunctionalWeight()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.fc(x[:, :4])


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_only_scores_train_and_paths_stay():
    model = SmallNet()
    keys = set(model.state_dict())
    popupify(model, k=0.5)
    assert trainable_names(model) == ["conv.scores", "fc.scores"]
    assert [id(p) for p in supermask_parameters(model)] == [id(model.conv.scores), id(model.fc.scores)]
    assert set(model.state_dict()) == keys | {"conv.scores", "fc.scores", RECORD_KEY}  # one settings record
    assert isinstance(model.conv, nn.Conv2d) and type(model.conv).__name__ == "SupermaskConv2d"
    assert torch.equal(model.bn.weight, torch.ones(8)) and torch.equal(model.bn.bias, torch.zeros(8))
    assert torch.equal(model.conv.bias, torch.zeros(8)) and torch.equal(model.fc.bias, torch.zeros(10))


def test_batchnorm_stats_still_track_in_train_mode():
    model = popupify(SmallNet(), k=0.5)
    before = model.bn.running_mean.clone()
    model(torch.randn(4, 3, 4, 4))
    assert not torch.equal(model.bn.running_mean, before)
    assert torch.equal(model.bn.weight, torch.ones(8))


def test_functional_weight_found_by_fx_and_gated():
    model = popupify(FunctionalWeight(), k=0.5)
    assert trainable_names(model) == ["w_scores"]
    assert int((model.w != 0).sum()) == kept_count(30, 0.5)
    model(torch.randn(3, 5)).sum().backward()
    assert model.w_scores.grad is not None and model.w_scores.grad.abs().sum() > 0
    assert model.gamma.grad is None


def test_untraceable_model_falls_back_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = popupify(Untraceable(), k=0.5)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "could not trace Untraceable" in messages[0] and "falls back" in messages[0]
    assert "Not gated (frozen at their values): custom.w." in messages[0]  # named; the 1-dim gamma is not
    assert trainable_names(model) == ["fc.scores"]  # F.linear weight inside `custom` is not found without fx
    model(torch.randn(2, 4)).sum().backward()
    assert model.fc.scores.grad is not None


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_projections_are_gated():
    model = popupify(SelfAttention(), k=0.25)
    mha = model.attn
    assert trainable_names(model) == ["attn.in_proj_scores", "attn.out_proj.scores"]
    x = torch.randn(2, 5, 16)
    model(x).sum().backward()
    assert mha.in_proj_scores.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # the fused inference path reads the gated weights too
        out_eval = model(x)
        manual = F.multi_head_attention_forward(
            x.transpose(0, 1),
            x.transpose(0, 1),
            x.transpose(0, 1),
            16,
            4,
            mha.in_proj_weight,
            mha.in_proj_bias,
            None,
            None,
            False,
            0.0,
            mha.out_proj.weight,
            mha.out_proj.bias,
            training=False,
            need_weights=False,
        )[0].transpose(0, 1)
    assert torch.allclose(out_eval, manual, atol=1e-5)
    assert int((mha.in_proj_weight != 0).sum()) == kept_count(48 * 16, 0.25)


def test_popupify_twice_is_a_clear_error():
    model = popupify(SmallNet(), k=0.5)
    with pytest.raises(ValueError, match="already popupified"):
        popupify(model, k=0.5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(k=0.0), "not a fraction in"),
        (dict(k=1.5), "not a fraction in"),
        (dict(k=float("nan")), "not a fraction in"),
        (dict(k=0.5, init="gaussian"), "unknown init 'gaussian'"),
        (dict(k=0.5, method="lottery"), "unknown method"),
        (dict(k=0.5, scope="net"), "unknown scope"),
        (dict(k=0.5, seed=-1), "non-negative"),
        (dict(k=0.5, layer_k={"fcc": 0.2}), "matches no gated layer"),
    ],
)
def test_bad_options_name_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        popupify(SmallNet(), **options)


def test_same_seed_same_tensors_other_seed_other_tensors():
    a, b, c = (popupify(SmallNet(), k=0.5, seed=s) for s in (7, 7, 8))
    for name in ["conv.weight", "fc.weight", "conv.scores", "fc.scores"]:
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
        assert not torch.equal(a.state_dict()[name], c.state_dict()[name])


@pytest.mark.parametrize("scaled", [False, True])
def test_signed_constant_is_plus_minus_kaiming_std(scaled):
    model = popupify(SmallNet(), k=0.3, init="signed_constant", scaled=scaled)
    w = model.conv._parameters["weight"]
    std = math.sqrt(2.0 / (3 * 9)) * (math.sqrt(1 / 0.3) if scaled else 1.0)
    assert torch.allclose(w.abs(), torch.full_like(w, std))
    assert 0.3 < (w > 0).float().mean() < 0.7


@pytest.mark.parametrize(
    "init, std",
    [
        ("kaiming_normal", math.sqrt(2 / 1000)),
        ("kaiming_uniform", math.sqrt(2 / 1000)),
        ("xavier_normal", math.sqrt(2 / 1500)),
    ],
)
def test_distribution_std(init, std):
    layer = popupify(nn.Linear(1000, 500), k=0.5, init=init)
    assert abs(layer._parameters["weight"].std().item() / std - 1) < 0.02
    if init == "kaiming_uniform":
        assert layer._parameters["weight"].abs().max() <= math.sqrt(3) * std


def test_scores_start_kaiming_uniform():
    layer = popupify(nn.Linear(400, 300), k=0.5)
    bound = 1 / math.sqrt(400)
    assert layer.scores.abs().max() <= bound and layer.scores.abs().max() > 0.99 * bound


def test_methods():
    dense = popupify(SmallNet(), k=0.5, method="dense")
    assert trainable_names(dense) == ["conv.weight", "fc.weight"]
    assert torch.equal(dense.conv.weight, dense.conv._parameters["weight"])

    random = popupify(SmallNet(), k=0.3, method="random")
    assert trainable_names(random) == []
    stats = mask_stats(random)
    assert [layer.kept for layer in stats.layers] == [kept_count(216, 0.3), kept_count(1280, 0.3)]

    sampled = popupify(SmallNet(), k=0.5, method="sampled")
    x = torch.randn(2, 3, 4, 4)
    w1, w2 = sampled.fc.weight, sampled.fc.weight
    assert not torch.equal(w1 != 0, w2 != 0)  # a fresh Bernoulli mask at every read in training
    sampled(x).sum().backward()
    assert sampled.fc.scores.grad.abs().sum() > 0
    sampled.eval()
    assert torch.equal(sampled.fc.weight != 0, sampled.fc.scores >= 0)


def test_sampled_gradient_is_straight_through_the_sample():
    layer = popupify(nn.Linear(5, 3, bias=False), k=0.5, method="sampled")
    torch.manual_seed(3)
    out = layer(torch.ones(1, 5))
    out.sum().backward()
    p = torch.sigmoid(layer.scores.detach())
    expected = torch.ones(3, 5) * layer._parameters["weight"] * p * (1 - p)  # dL/dw_eff = 1 for this loss
    assert torch.allclose(layer.scores.grad, expected)


def test_global_scope_and_layer_overrides():
    model = popupify(SmallNet(), k=0.2, scope="global")
    stats = mask_stats(model)
    assert stats.kept == kept_count(216 + 1280, 0.2)
    assert stats.layers[0].kept != kept_count(216, 0.2) or stats.layers[1].kept != kept_count(1280, 0.2)
    model = popupify(SmallNet(), k=0.2, layer_k={"fc": 1.0})
    assert [layer.kept for layer in mask_stats(model).layers] == [kept_count(216, 0.2), 1280]


def test_masks_recomputed_once_per_step_never_in_eval():
    # Count mask computations per layer, whatever the back-end (the compiled CPU path and the device back-end
    # select every stale layer of the model at once; the others one layer per call).
    def count():
        return sum(gate.selector.selections for _, gate in gated_layers(model))

    model = popupify(SmallNet(), k=0.5)
    opt = torch.optim.SGD(supermask_parameters(model), lr=0.1)
    x = torch.randn(4, 3, 4, 4)
    for _ in range(3):  # gradient accumulation: three forwards, masks computed once per layer
        model(x).sum().backward()
    assert count() == 2
    opt.step()
    model(x)
    assert count() == 4
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            model(x)
    assert count() == 4
    with torch.no_grad():
        model.fc.scores.data.mul_(-1)  # invisible to version counters ...
    refresh_masks(model)  # ... hence this
    model(x)
    assert count() == 6


def test_mask_follows_scores_after_optimizer_step():
    model = popupify(nn.Linear(50, 20), k=0.3)
    opt = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    x = torch.randn(16, 50)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[torch.sort(model.scores.detach().abs().flatten(), descending=True, stable=True).indices[:300]] = True
        assert torch.equal(model.weight.detach() != 0, expected.view(20, 50))


def test_fix_masks_and_retrain_weights():
    model = popupify(SmallNet(), k=0.5)
    masks = [(m.weight != 0).clone() for m in (model.conv, model.fc)]
    fix_masks(model, train_weights=True)
    assert trainable_names(model) == ["conv.weight", "fc.weight"]
    assert "fc.mask" in model.state_dict()
    opt = torch.optim.SGD(supermask_parameters(model), lr=0.1)
    before = model.fc._parameters["weight"].detach().clone()
    model(torch.randn(4, 3, 4, 4)).sum().backward()
    assert torch.all(model.fc._parameters["weight"].grad[~masks[1]] == 0)
    opt.step()
    assert not torch.equal(model.fc._parameters["weight"], before)
    assert torch.equal(model.fc.weight != 0, masks[1])


def test_deepcopy_pickle_and_torch_save_keep_behaviour():
    model = popupify(SmallNet(), k=0.5).eval()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert type(clone.conv).__name__ == "SupermaskConv2d"
        assert torch.equal(clone(x), ref)
        assert clone.conv.scores is not model.conv.scores


def test_state_dict_round_trip_into_fresh_popupified_model():
    a = popupify(SmallNet(), k=0.5, seed=1)
    with torch.no_grad():
        a.fc.scores.mul_(-3).add_(0.1)
    b = popupify(SmallNet(), k=0.5, seed=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(RuntimeError, match="seed: 1 in the state_dict, 2 in this model"):  # other random weights
        popupify(SmallNet(), k=0.5, seed=2).load_state_dict(a.state_dict())


def test_reset_parameters_is_refused_with_a_reason():
    model = popupify(SmallNet(), k=0.5)
    with pytest.raises(RuntimeError, match="fixed by popupify's seed"):
        model.conv.reset_parameters()


def test_config_object_and_json_round_trip():
    config = PopupConfig(k=0.3, init="kaiming_normal", layer_k={"fc": 1.0}, seed=3)
    assert PopupConfig.from_dict(config.to_dict()) == config
    known = r"known fields: \['bias', 'fan_in_fan_out', 'include', 'init', 'k',"
    with pytest.raises(ValueError, match=r"unknown PopupConfig fields \['kk'\]; " + known):
        PopupConfig.from_dict({"k": 0.5, "kk": 0.3})
    model = popupify(SmallNet(), config)
    assert {gate.config for _, gate in gated_layers(model)} == {config}
    with pytest.raises(TypeError, match="either a PopupConfig"):
        popupify(SmallNet(), config, seed=1)


def test_channels_last_keeps_the_weight_format_and_the_same_masks():
    model = popupify(SmallNet(), k=0.3).eval()
    x = torch.randn(2, 3, 4, 4)
    expected_mask = (model.conv.weight != 0).clone()
    expected = model(x)
    model.to(memory_format=torch.channels_last)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.conv.weight != 0, expected_mask)
    assert torch.allclose(model(x.to(memory_format=torch.channels_last)), expected, atol=1e-6)


def test_channels_last_in_training_keeps_the_weight_format():
    model = popupify(SmallNet(), k=0.3).to(memory_format=torch.channels_last)
    with torch.enable_grad():
        weight = model.conv.weight
    assert weight.requires_grad and weight.is_contiguous(memory_format=torch.channels_last)
    mask = model.conv._supermask_gates["weight"].layer_mask.tensor()
    assert torch.equal(weight, model.conv._parameters["weight"] * mask)
    assert int(mask.sum()) == kept_count(mask.numel(), 0.3)


def test_training_holds_no_copy_of_the_weights_and_evaluation_keeps_one():
    """A training forward builds w * mask for its graph only (freed with it); evaluation caches it; going back
    to training drops the cache. Masks are not recomputed by any of these switches."""
    model = popupify(SmallNet(), k=0.5)
    gates = [gate for _, gate in gated_layers(model)]
    x = torch.randn(4, 3, 4, 4)
    model(x).sum().backward()
    assert all(g.layer_mask.effective_buffer is None and g.layer_mask.tensor() is not None for g in gates)
    model.eval()
    with torch.no_grad():
        model(x)
        weights = [model.conv.weight.clone(), model.fc.weight.clone()]
    assert all(g.layer_mask.effective_buffer is not None for g in gates)
    masks = [g.layer_mask.tensor().clone() for g in gates]
    model.train()
    model(x).sum().backward()  # same scores: the masks stay, the cached copies go
    assert all(g.layer_mask.effective_buffer is None for g in gates)
    assert all(torch.equal(g.layer_mask.tensor(), m) for g, m in zip(gates, masks))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.conv.weight, weights[0]) and torch.equal(model.fc.weight, weights[1])


def test_scores_switched_to_trainable_get_gradients():
    model = popupify(SmallNet(), k=0.5, method="random")
    model(torch.randn(2, 3, 4, 4))  # masks cached while the scores are frozen
    model.fc.scores.requires_grad_(True)
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    assert model.fc.scores.grad is not None and model.fc.scores.grad.abs().sum() > 0


def test_numpy_and_0d_tensor_values_are_numbers():
    np = pytest.importorskip("numpy")
    for k in (np.float32(0.3), np.float64(0.3), torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64)):
        assert PopupConfig(k=k).k == 0.3 and type(PopupConfig(k=k).k) is float
    assert PopupConfig(k=0.5, seed=np.int64(3)).seed == 3
    assert PopupConfig(k=0.5, layer_k={"fc": np.float32(1.0)}).layer_k == (("fc", 1.0),)
    with pytest.raises(ValueError, match="not a fraction"):
        PopupConfig(k=torch.tensor([0.3, 0.5]))


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models_are_refused_with_the_order_to_use(wrap):
    model = SmallNet()
    wrapped = nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model)
    with pytest.raises(ValueError, match="popupify the model first and wrap it afterwards"):
        popupify(wrapped, k=0.5)
    assert not any(n.endswith("scores") for n, _ in model.named_parameters())  # nothing was changed


def test_meta_device_models_are_refused_at_popupify():
    with torch.device("meta"):
        model = SmallNet()
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        popupify(model, k=0.5)
    model.to_empty(device="cpu")
    assert popupify(model, k=0.5) is model


@pytest.mark.parametrize("init", sorted(INITIALIZERS))
def test_drawing_in_place_gives_the_same_weights_bit_for_bit(init):
    """popupify draws into the model's own float32 weight (no temporary the size of the layer): the values must be
    those of a fresh draw, or files made before would no longer regenerate."""
    from supermask_fx.core.initializers import draw_weight, generator_for

    shape = (300, 77)
    fresh = draw_weight(shape, init, std=0.05, generator=generator_for(3, "layer.weight", "weight"))
    out = torch.full(shape, float("nan"))
    drawn = draw_weight(shape, init, std=0.05, generator=generator_for(3, "layer.weight", "weight"), out=out)
    assert drawn is out and torch.equal(out, fresh)
    if init not in ("unsigned_constant",):  # a random draw: the seed matters
        other = draw_weight(shape, init, std=0.05, generator=generator_for(4, "layer.weight", "weight"))
        assert not torch.equal(other, fresh)
