"""method="sampled" with Zhou et al.'s options: the evaluation rule and dynamic weight rescaling.

Expected values are written out by hand from the rule (Zhou et al., masked_networks.py): the mask is
``m ~ Bernoulli(sigmoid(s))``, the layer uses ``w * m * numel / sum(m)`` with rescaling, and the gradient goes
straight through ``m`` with ``d m / d s = sigmoid'(s)``, including through the multiplier.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from supermask_fx import load_subnetwork, materialize, popupify, restore, save_subnetwork
from supermask_fx.core.state import RECORD_KEY
from supermask_fx.methods.sampled import ZHOU_ET_AL, Sampled, SampledOptions, configure, options

INF = float("inf")


def layer(out_features=2, in_features=4, **options_) -> nn.Linear:
    model = popupify(nn.Linear(in_features, out_features, bias=False), k=0.5, method="sampled", seed=3)
    if options_:
        configure(model, **options_)
    return model


def raw(model: nn.Linear) -> torch.Tensor:
    return model._parameters["weight"].detach()


def set_scores(model: nn.Linear, values) -> None:
    with torch.no_grad():
        model.scores.copy_(torch.as_tensor(values, dtype=torch.float32))


# scores +inf keep a weight with probability 1, -inf with probability 0: the "sampled" mask is then known exactly.
PATTERN = [[INF, -INF, INF, -INF], [-INF, -INF, INF, -INF]]  # keeps 3 of 8
KEEP = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 0]])


def test_defaults_are_unchanged_threshold_without_rescaling():
    model = layer()
    assert options(model) == {"eval_rule": "threshold", "rescale": False}
    set_scores(model, [[0.3, -0.1, 0.0, -2.0], [1.0, -0.5, 0.2, 0.0]])
    model.eval()
    keep = torch.tensor([[1.0, 0, 1, 0], [1, 0, 1, 1]])  # s >= 0
    assert torch.equal(model.weight, raw(model) * keep)


def test_threshold_evaluation_with_rescaling_multiplies_by_numel_over_kept():
    model = layer(rescale=True)
    set_scores(model, [[0.3, -0.1, 0.0, -2.0], [1.0, -0.5, 0.2, 0.0]])  # 5 of 8 kept
    model.eval()
    keep = torch.tensor([[1.0, 0, 1, 0], [1, 0, 1, 1]])
    assert torch.allclose(model.weight, raw(model) * keep * (8 / 5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_sample_rule_with_certain_probabilities_is_exact(training):
    model = layer(eval_rule="sample")
    set_scores(model, PATTERN)
    model.train(training)
    with torch.no_grad():
        assert torch.equal(model.weight, raw(model) * KEEP)


@pytest.mark.parametrize("training", [True, False])
def test_rescaling_multiplies_the_sampled_mask_by_numel_over_kept(training):
    model = layer(eval_rule="sample", rescale=True)
    set_scores(model, PATTERN)
    model.train(training)
    with torch.no_grad():
        assert torch.allclose(model.weight, raw(model) * KEEP * (8 / 3), rtol=1e-6, atol=0)


def test_sample_rule_draws_a_fresh_mask_at_every_evaluation_read():
    model = layer(out_features=50, in_features=40, eval_rule="sample")
    set_scores(model, torch.zeros(50, 40))  # p = 0.5
    model.eval()
    with torch.inference_mode():
        a, b = model.weight.clone(), model.weight.clone()
    assert not torch.equal(a, b)
    threshold = layer(out_features=50, in_features=40)
    set_scores(threshold, torch.zeros(50, 40))
    threshold.eval()
    assert torch.equal(threshold.weight, threshold.weight)


def test_sample_rule_keeps_each_weight_with_probability_sigmoid_of_its_score():
    p = 0.25
    model = layer(out_features=400, in_features=250, eval_rule="sample")
    set_scores(model, torch.full((400, 250), math.log(p / (1 - p))))
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        kept = torch.stack([(model.weight != 0).float().mean() for _ in range(4)])
    # 100,000 Bernoulli(0.25) draws per read: standard deviation 0.0014
    assert torch.all((kept - p).abs() < 0.006), kept


def test_rescaled_gradient_is_straight_through_the_mask_and_the_multiplier():
    torch.manual_seed(1)
    model = layer(out_features=3, in_features=5, **ZHOU_ET_AL)
    scores = torch.randn(3, 5)
    set_scores(model, scores)
    model.train()
    w = raw(model)
    effective = model.weight
    upstream = torch.randn(3, 5)
    (effective * upstream).sum().backward()
    m = (effective.detach() != 0).float()  # signed constant weights are never 0: the sample is where w_eff != 0
    n, kept = m.numel(), m.sum()
    assert 0 < kept < n
    c = n / kept
    assert torch.allclose(effective.detach(), w * m * c, rtol=1e-6, atol=0)
    # w_eff_ij = w_ij m_ij n / sum(m) with dm/ds = sigmoid'(s):
    # dL/ds_ij = sigmoid'(s_ij) * (c w_ij G_ij - (c / kept) * sum_kl w_kl m_kl G_kl)
    dsig = torch.sigmoid(scores) * (1 - torch.sigmoid(scores))
    expected = dsig * (c * w * upstream - (c / kept) * (w * m * upstream).sum())
    assert torch.allclose(model.scores.grad, expected, rtol=1e-5, atol=1e-9)


def test_gradient_without_rescaling_is_unchanged():
    torch.manual_seed(2)
    model = layer(out_features=3, in_features=5, eval_rule="sample")
    scores = torch.randn(3, 5)
    set_scores(model, scores)
    model.train()
    upstream = torch.randn(3, 5)
    (model.weight * upstream).sum().backward()
    dsig = torch.sigmoid(scores) * (1 - torch.sigmoid(scores))
    assert torch.allclose(model.scores.grad, dsig * raw(model) * upstream, rtol=1e-6, atol=0)


def test_configure_sets_scores_and_survives_copies():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    popupify(model, k=0.5, method="sampled")
    configure(model, **ZHOU_ET_AL)
    assert options(model) == {"eval_rule": "sample", "rescale": True}
    assert all(torch.equal(m.scores, torch.zeros_like(m.scores)) for m in (model[0], model[2]))
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert options(other) == {"eval_rule": "sample", "rescale": True}
    configure(model, rescale=False)  # None keeps the other settings
    assert options(model) == {"eval_rule": "sample", "rescale": False}


def test_options_are_checked():
    with pytest.raises(ValueError, match="eval_rule"):
        Sampled(SampledOptions(eval_rule="expected"))
    with pytest.raises(ValueError, match="rescale"):
        Sampled(SampledOptions(rescale=1))
    with pytest.raises(ValueError, match="eval_rule"):
        popupify(nn.Linear(4, 2, bias=False), k=0.5, method=SampledOptions(eval_rule="expected"))
    with pytest.raises(ValueError, match="no option 'rescaled'"):
        popupify(nn.Linear(4, 2, bias=False), k=0.5, method="sampled", method_options={"rescaled": True})
    with pytest.raises(ValueError, match="sampled"):
        configure(popupify(nn.Linear(4, 2, bias=False), k=0.5), eval_rule="sample")


def test_typed_options_are_the_same_config_as_method_options():
    typed = popupify(nn.Linear(4, 2, bias=False), k=0.5, seed=3, method=SampledOptions(**ZHOU_ET_AL))
    named = popupify(nn.Linear(4, 2, bias=False), k=0.5, seed=3, method="sampled", method_options=ZHOU_ET_AL)
    assert gated_layers_config(typed) == gated_layers_config(named)
    assert gated_layers_config(typed).method == "sampled"


def gated_layers_config(model):
    from supermask_fx import gated_layers

    return next(gate.config for _, gate in gated_layers(model))


def test_method_options_at_popupify_are_applied_and_recorded():
    model = popupify(nn.Linear(4, 2, bias=False), k=0.5, method="sampled", seed=3, method_options=ZHOU_ET_AL)
    assert options(model) == {"eval_rule": "sample", "rescale": True}
    assert torch.equal(model.scores, torch.zeros(2, 4))  # score_init 0
    configured = layer(**ZHOU_ET_AL)  # the same through configure: the same record in the state_dict
    assert torch.equal(configured.state_dict()[RECORD_KEY], model.state_dict()[RECORD_KEY])
    with pytest.raises(RuntimeError, match="method_options"):  # a checkpoint of the other rule is refused
        layer().load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="method 'edge_popup' has no option 'rescale'"):
        popupify(nn.Linear(4, 2), k=0.5, method_options={"rescale": True})
    with pytest.raises(ValueError, match="unknown eval_rule"):
        popupify(nn.Linear(4, 2), k=0.5, method="sampled", method_options={"eval_rule": "mean"})


def test_experiment_variant_zhou_builds_the_faithful_method():
    from supermask_fx.experiments.runner import build
    from supermask_fx.experiments.specs import RunSpec

    spec = RunSpec("t", "fc", 1.0, "sampled", "signed_constant", 0.5, 0, 1, "mnist", variant="zhou")
    model = build(spec)
    assert options(model) == {"eval_rule": "sample", "rescale": True}
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if n.endswith("scores"))
    assert options(build(spec.with_(variant=""))) == {"eval_rule": "threshold", "rescale": False}


@pytest.mark.parametrize("seed", [0, 1])
def test_rescaling_keeps_the_scale_of_glorot_weights_and_doubles_kaiming_variance_per_layer(seed):
    """Why Zhou et al.'s method needs their Glorot signed constant (docs/reproducing.md, "Zhou et al. on Conv2").

    Five square layers (n = 256), ReLU between, masks sampled at p = 0.5 and rescaled by numel / kept (about 2).
    A layer's pre-activation second moment is n * w^2 * 0.5 * 2^2 * E[input^2], with E[relu(z)^2] = E[z^2] / 2
    after the first layer: Glorot (w^2 = 1/n) gives x 2 for the first layer (its input is not rectified) and x 1
    after, so the output RMS is about sqrt(2) times the input's; Kaiming (w^2 = 2/n) doubles every layer's second
    moment, so its output RMS is 2^(5/2) ~ 5.7 times Glorot's.
    """
    n, depth = 256, 5

    def output_rms(init: str) -> float:
        torch.manual_seed(seed)
        layers = []
        for i in range(depth):
            layers.append(nn.Linear(n, n, bias=False))
            if i < depth - 1:
                layers.append(nn.ReLU())
        model = popupify(nn.Sequential(*layers), k=0.5, method="sampled", method_options=ZHOU_ET_AL, init=init)
        x = torch.randn(512, n, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model.train()(x).pow(2).mean().sqrt().item()

    glorot, kaiming = output_rms("xavier_signed_constant"), output_rms("signed_constant")
    assert 0.7 < glorot < 2.8  # about sqrt(2): the scale is kept
    assert 4.0 < kaiming / glorot < 8.0  # about 2 ** 2.5


def test_with_rescaling_materialize_and_the_state_dict_bake_what_evaluation_computes(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = popupify(net, k=0.5, method=SampledOptions(rescale=True)).eval()  # threshold evaluation
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
        for module in (model[0], model[2]):  # the definition: w * (s >= 0) * numel / kept
            mask = module.scores >= 0
            manual = module._parameters["weight"] * mask * (mask.numel() / mask.sum())
            assert torch.allclose(module.weight, manual)
        assert torch.equal(materialize(model).eval()(x), expected)
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        assert torch.equal(restore(fresh, model.state_dict()).eval()(x), expected)
        save_subnetwork(model, tmp_path / "rescaled.safetensors")  # fixed masks compute the multiplier too
        torch.manual_seed(0)
        fresh = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        assert torch.equal(load_subnetwork(fresh, tmp_path / "rescaled.safetensors").eval()(x), expected)
