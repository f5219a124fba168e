"""``include=``: gating weights that no built-in rule finds (GPT-2's Conv1D, ``x @ W``), and the warnings that
point at them."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supermask_fx import (
    PopupConfig,
    gated_layers,
    kept_count,
    load_subnetwork,
    mask_stats,
    popupify,
    save_subnetwork,
    supermask_parameters,
)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear map whose weight is stored (in, out) and used through torch.addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class TinyGPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(12)
        self.c_fc = Conv1D(48, 12)
        self.c_proj = Conv1D(12, 48)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(x + self.c_proj(F.gelu(self.c_fc(self.ln(x)))))


class MatmulWeight(nn.Module):
    """A traceable custom layer that uses its weight with ``@``: no built-in rule gates it."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x @ self.W)


def popupify_quietly(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        popupify(model, *args, **kwargs)
    return [str(w.message) for w in caught]


def gpt_block(**options):
    model = TinyGPTBlock()
    messages = popupify_quietly(model, k=0.5, include=["c_fc.weight", "c_proj.weight"], **options)
    return model, messages


def test_included_conv1d_is_gated_and_trains():
    model, messages = gpt_block(fan_in_fan_out=True)
    assert messages == []  # traced: c_fc/c_proj reach torch.addmm, but they are included now
    assert [layer.name for layer in mask_stats(model).layers] == ["c_fc.weight", "c_proj.weight", "head.weight"]
    for module in (model.c_fc, model.c_proj):
        weight, scores = module._parameters["weight"], module.scores
        assert not weight.requires_grad and scores.requires_grad
        assert int((module.weight != 0).sum()) == kept_count(weight.numel(), 0.5)  # reads go through the gate
        assert torch.equal(module.bias, torch.zeros_like(module.bias))  # bias="zero" applies to its bias too
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    x = torch.randn(8, 3, 12)
    before = model.c_fc.weight.clone()
    for _ in range(5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        assert model.c_fc.scores.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.equal(model.c_fc.weight, before)  # the mask moved


def test_fan_in_fan_out_reads_the_fan_in_from_the_first_dimension():
    stored_in_out, _ = gpt_block(fan_in_fan_out=True)
    stored_out_in, _ = gpt_block()
    for name, fan_in in (("c_fc", 12), ("c_proj", 48)):  # weights (12, 48) and (48, 12), stored (in, out)
        right = getattr(stored_in_out, name)
        assert torch.allclose(right._parameters["weight"].abs(), torch.tensor(math.sqrt(2 / fan_in)))
        assert right.scores.abs().max() <= 1 / math.sqrt(fan_in)
        wrong = getattr(stored_out_in, name)  # without the flag the other dimension is taken as the fan-in
        fan_other = right.weight.numel() // fan_in
        assert torch.allclose(wrong._parameters["weight"].abs(), torch.tensor(math.sqrt(2 / fan_other)))
    # the built-in rules keep their known layout whatever the flag says
    assert torch.equal(stored_in_out.head._parameters["weight"], stored_out_in.head._parameters["weight"])


def test_include_round_trips_through_a_subnetwork_file(tmp_path):
    model, _ = gpt_block(fan_in_fan_out=True)
    model.c_fc.scores.data.normal_()  # a mask other than the initial one
    model.eval()
    x = torch.randn(4, 12)
    path = tmp_path / "gpt.smfx"
    save_subnetwork(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored config includes the Conv1D weights: nothing left ungated
        loaded = load_subnetwork(TinyGPTBlock(), path).eval()
    assert {gate.name: gate.fan_in_fan_out for _, gate in gated_layers(loaded)} == {
        "c_fc.weight": True,
        "c_proj.weight": True,
        "head.weight": False,
    }
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.c_fc._parameters["weight"], model.c_fc._parameters["weight"])
    config = PopupConfig.from_dict(PopupConfig(k=0.5, include=("a.weight",), fan_in_fan_out=True).to_dict())
    assert config.include == ("a.weight",) and config.fan_in_fan_out


def test_matmul_weight_is_reported_then_gated_when_included():
    messages = popupify_quietly(MatmulWeight(), k=0.5)
    assert len(messages) == 1 and "matrix products" in messages[0] and " W." in messages[0]
    assert "include=" in messages[0]
    model = MatmulWeight()
    assert popupify_quietly(model, k=0.5, include=["W"], fan_in_fan_out=True) == []
    assert int((model.W != 0).sum()) == kept_count(24, 0.5)
    assert model.fc._parameters["weight"].abs().unique().numel() == 1  # signed constant, fc's own layout


def test_untraceable_model_warning_names_the_ungated_matrices():
    class Untraceable(TinyGPTBlock):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = -x
            return super().forward(x)

    messages = popupify_quietly(Untraceable(), k=0.5)
    assert len(messages) == 1 and "could not trace" in messages[0]
    assert "c_fc.weight, c_proj.weight." in messages[0]  # the LayerNorm and the Linear are not named
    messages = popupify_quietly(Untraceable(), k=0.5, include=["c_*.weight"], fan_in_fan_out=True)
    assert len(messages) == 1 and "Not gated" not in messages[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(include=["c_attn.weight"]), "include pattern 'c_attn.weight' matches no parameter"),
        (dict(include=["*.bias"]), "matches ln.bias of shape (12,): only weights with 2+ dimensions"),
        (dict(include=["ln.*"]), "only weights with 2+ dimensions"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=True applies to the include= weights"),
        (dict(include=[3]), "must be a list of fnmatch patterns"),
        (dict(include=["c_fc.weight"], fan_in_fan_out="yes"), "must be True or False"),
    ],
)
def test_bad_include_options_are_refused(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        popupify(TinyGPTBlock(), k=0.5, **options)


def test_a_single_pattern_string_is_one_pattern():
    assert PopupConfig(k=0.5, include="c_fc.weight").include == ("c_fc.weight",)


def test_traced_matrix_product_weights_are_gated_from_the_export_graph_given_inputs():
    model = MatmulWeight()
    messages = popupify_quietly(model, k=0.5, example_inputs=torch.randn(2, 6))
    assert messages == []
    gates = {gate.name: gate for _, gate in gated_layers(model)}
    assert set(gates) == {"W", "fc.weight"}
    assert gates["W"].fan_in_fan_out and not gates["fc.weight"].fan_in_fan_out  # x @ W: W stored (in, out)
    w = model._parameters["W"]
    assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 6)))  # fan-in 6: dimension 0
