"""The k warm-up (``KWarmup``; the engine's ``k_warmup_epochs``; the Hugging Face and Lightning callbacks) and
learned norms (``norms="learn"``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from supermask_fx import (
    KWarmup,
    gated_layers,
    load_subnetwork,
    mask_stats,
    popupify,
    save_subnetwork,
    supermask_parameters,
)
from supermask_fx.models import build_model
from tests.references import top_k_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_k(target, epoch, epochs, shape):
    """The schedule written out independently: 1 at epoch 0, ``target`` from ``epochs`` on."""
    if epoch >= epochs:
        return target
    frac = epoch / epochs
    if shape == "cosine":
        frac = 0.5 - 0.5 * math.cos(math.pi * frac)
    return target + (1.0 - target) * (1.0 - frac)  # the documented formula (its float rounding decides ties)


def kept_per_layer(model):
    return [int(gate.current_mask(module).sum()) for module, gate in gated_layers(model)]


def mlp(k=0.2, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30, bias=False), nn.ReLU(), nn.Linear(30, 5, bias=False))
    return popupify(model, k, **options)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_sets_the_exact_kept_count_of_each_epoch(shape):
    model = mlp(0.2)
    schedule = KWarmup(4, shape)
    for epoch in (0, 0.5, 1, 2.25, 3.9, 4, 7):
        k = schedule.apply(model, epoch)
        assert k == pytest.approx(expected_k(0.2, epoch, 4, shape))
        # the paper's rounding, written out: int((1 - k) * n) entries dropped, at least one kept
        want = [max(1, n - int((1 - k) * n)) for n in (600, 150)]
        assert kept_per_layer(model) == want
    assert schedule.apply(model, 0) == 1.0 and kept_per_layer(model) == [600, 150]


def test_warmup_with_global_scope_follows_the_global_count():
    model = mlp(0.1, scope="global")
    KWarmup(2).apply(model, 1.0)  # k = 0.55 over 750 weights together
    assert sum(kept_per_layer(model)) == 750 - int(0.45 * 750)


def test_bad_warmup_settings_are_refused():
    with pytest.raises(ValueError, match="epochs"):
        KWarmup(-1)
    with pytest.raises(ValueError, match="shape"):
        KWarmup(2, "exponential")
    with pytest.raises(ValueError, match="popupify"):
        KWarmup(2).apply(nn.Linear(2, 2), 0)


# ---------------------------------------------------------------------------------------------- the engine


accelerate = pytest.importorskip("accelerate")


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(1)
    return torch.utils.data.TensorDataset(x, y)


def _config(**kw):
    from supermask_fx.training import TrainConfig

    base = dict(epochs=3, batch_size=16, lr=0.1, progress="none", eval_every=1, k_warmup_epochs=2.0)
    base.update(kw)
    return TrainConfig(**base)


def test_engine_applies_the_warmup_before_every_step():
    from supermask_fx.training import train

    model = mlp(0.2)
    seen = []
    first = next(m for m, _ in gated_layers(model))
    first.register_forward_pre_hook(
        lambda module, args: seen.append(kept_per_layer(model)[0]) if module.training else None
    )
    train(model, _data(), _data(32, 1), _config())
    steps_per_epoch = 96 // 16
    want = [600 - int((1 - expected_k(0.2, s / steps_per_epoch, 2.0, "linear")) * 600) for s in range(18)]
    assert seen == want
    assert kept_per_layer(model) == [120, 30]  # the evaluation after the last epoch: popupify's k


def test_resume_in_the_middle_of_the_warmup_is_exact(tmp_path):
    from supermask_fx.training import train

    class Stop(Exception):
        pass

    def stop_after_first(metrics):
        if metrics["epoch"] == 1:
            raise Stop

    config = _config(epochs=3, k_warmup_epochs=2.5)
    full = mlp(0.2)
    ref = train(full, _data(), _data(32, 1), config, out_dir=tmp_path / "full")
    cut = mlp(0.2)
    with pytest.raises(Stop):
        train(cut, _data(), _data(32, 1), config, out_dir=tmp_path / "cut", callbacks=[stop_after_first])
    resumed = mlp(0.2)
    res = train(resumed, _data(), _data(32, 1), config, out_dir=tmp_path / "cut")
    assert res["resumed_from_epoch"] == 1
    a, b = full.state_dict(), resumed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["test_top1"] for m in ref["history"]] == [m["test_top1"] for m in res["history"]]


def test_resuming_with_another_warmup_is_refused(tmp_path):
    from supermask_fx.training import CheckpointMismatchError, train

    train(mlp(0.2), _data(), None, _config(epochs=1, k_warmup_epochs=1.0), out_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="k_warmup_epochs"):
        train(mlp(0.2), _data(), None, _config(epochs=1, k_warmup_epochs=0.5, resume=True), out_dir=tmp_path)


def test_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match="k_warmup_epochs"):
        _config(epochs=2, k_warmup_epochs=3)


# ---------------------------------------------------------------------------------------------- the callbacks


def test_hugging_face_callback_takes_the_warmup():
    pytest.importorskip("transformers")
    from supermask_fx.integrations.huggingface import SupermaskCallback

    model = mlp(0.2)
    callback = SupermaskCallback(write_subnetwork=False, k_warmup=KWarmup(2))
    state = SimpleNamespace(max_steps=40, num_train_epochs=4, global_step=5, log_history=[])
    callback.on_train_begin(None, state, None, model=model)  # a resumed run at step 5: epoch 0.5
    assert kept_per_layer(model)[0] == 600 - int((1 - expected_k(0.2, 0.5, 2, "linear")) * 600)
    state.global_step = 30
    callback.on_step_end(None, state, None, model=model)
    assert kept_per_layer(model) == [120, 30]


def test_lightning_callback_takes_the_warmup():
    pytest.importorskip("lightning")
    from supermask_fx.integrations.lightning import SupermaskCallback

    model = mlp(0.2)
    callback = SupermaskCallback(write_subnetwork=False, k_warmup=KWarmup(1, "cosine"))
    trainer = SimpleNamespace(num_training_batches=10, accumulate_grad_batches=2, global_step=2)
    callback.on_train_batch_end(trainer, model, None, None, 3)  # 5 steps per epoch: epoch 0.4
    assert kept_per_layer(model)[0] == 600 - int((1 - expected_k(0.2, 0.4, 1, "cosine")) * 600)


# ---------------------------------------------------------------------------------------------- learned norms


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 4, bias=False),
        nn.LayerNorm(4),
    )


def test_learned_norms_start_at_identity_and_train_beside_the_scores():
    model = popupify(bn_net(), 0.5, norms="learn")
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for p in m.parameters()
    }
    trained = list(supermask_parameters(model))
    scores = [module._parameters[gate.scores] for module, gate in gated_layers(model)]
    assert {id(p) for p in trained} == norm_params | {id(s) for s in scores}
    assert torch.equal(model[1].weight, torch.ones(6)) and torch.equal(model[1].bias, torch.zeros(6))
    optimizer = torch.optim.SGD(trained, lr=0.5)
    x = torch.randn(8, 3, 6, 6)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8) % 4).backward()
        optimizer.step()
    assert not torch.equal(model[1].weight, torch.ones(6))
    for module, gate in gated_layers(model):  # the weights stay frozen
        assert not module._parameters[gate.param].requires_grad


def test_identity_norms_stay_frozen():
    model = popupify(bn_net(), 0.5)
    assert not model[1].weight.requires_grad
    assert len(list(supermask_parameters(model))) == 2


def test_learned_norms_with_kept_weights_start_at_their_values():
    net = bn_net()
    with torch.no_grad():
        net[1].weight.fill_(3.0)
    model = popupify(net, 0.5, init="keep", norms="learn")
    assert torch.equal(model[1].weight, torch.full((6,), 3.0)) and model[1].weight.requires_grad


def test_learned_norms_survive_files_and_state_dicts(tmp_path):
    model = popupify(bn_net(), 0.5, norms="learn")
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    x = torch.randn(8, 3, 6, 6)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(8) % 4).backward()
        optimizer.step()
    model.eval()
    out = model(x)
    save_subnetwork(model, tmp_path / "n.safetensors")
    loaded = load_subnetwork(bn_net(), tmp_path / "n.safetensors").eval()
    assert torch.equal(loaded(x), out)
    again = popupify(bn_net(), 0.5, norms="learn")
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.eval()(x), out)


def test_fc_bn_model_has_a_batch_norm_per_hidden_layer():
    model = build_model("fc_bn", dataset="mnist")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [n.num_features for n in norms] == [300, 100]
    popupify(model, 0.5, norms="learn")
    assert mask_stats(model).numel == 784 * 300 + 300 * 100 + 100 * 10


def test_a_scaled_init_saves_and_loads_in_the_middle_of_a_warmup(tmp_path):
    """The scaled inits draw with popupify's k: the file's regeneration check must not use the warm-up's k."""
    model = mlp(0.2, init="signed_constant", scaled=True)
    KWarmup(4).apply(model, 1.0)
    x = torch.randn(3, 20)
    out = model.eval()(x)
    save_subnetwork(model, tmp_path / "s.safetensors")
    fresh = nn.Sequential(nn.Linear(20, 30, bias=False), nn.ReLU(), nn.Linear(30, 5, bias=False))
    assert torch.equal(load_subnetwork(fresh, tmp_path / "s.safetensors").eval()(x), out)


def test_learned_norms_match_an_independent_re_implementation():
    """Linear -> BatchNorm1d with norms="learn", against plain tensors: w_eff = w * top-k(|s|), batch statistics,
    scale and shift trained by SGD beside the scores (straight-through score gradient dL/dw_eff * w * sign(s))."""
    torch.manual_seed(0)
    model = popupify(nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)), 0.4, norms="learn")
    linear, norm = model[0], model[1]
    w = linear._parameters["weight"].detach().clone()
    s = linear._parameters["scores"].detach().clone().requires_grad_(True)
    gamma = torch.ones(5, requires_grad=True)
    beta = torch.zeros(5, requires_grad=True)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.3)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

        mask = top_k_mask(s, 0.4).float()
        w_eff = (w * mask).requires_grad_(True)
        h = x @ w_eff.T
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + norm.eps) * gamma + beta
        nn.functional.cross_entropy(h, y).backward()
        with torch.no_grad():
            s -= 0.3 * w_eff.grad * w * torch.sign(s)
            gamma -= 0.3 * gamma.grad
            beta -= 0.3 * beta.grad
            gamma.grad = beta.grad = None
        torch.testing.assert_close(linear._parameters["scores"].detach(), s.detach())
        torch.testing.assert_close(norm.weight.detach(), gamma.detach())
        torch.testing.assert_close(norm.bias.detach(), beta.detach())
