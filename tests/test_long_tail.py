"""Cases where popupify used to do the wrong thing without saying so, each checked against an expectation derived
here (from the model before popupify, from the models' source, or from a top-k written in the test):

* capturing the graph must not change the model (BigBird swaps its attention modules on short inputs);
* fused optimizers (the Hugging Face ``Trainer``'s default) write the scores without bumping their version
  counters: the masks must still follow the scores;
* fixed tables (``requires_grad=False``) stay exactly as they are; embeddings keep their zero padding row;
* Gemma's ``(1 + w)`` norms become the identity whatever values they were loaded with;
* a weight joined with ``torch.cat`` before its matmul is gated;
* the fallback warning names the real cause of a failed export;
* PEFT adapters, either order, are refused; a model loaded from a popupified model's save is refused.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
import transformers  # noqa: E402
from hf_families import build  # noqa: E402
from references import top_k_mask  # noqa: E402
from test_hf_models import assert_identity_norm  # noqa: E402

from supermask_fx import (  # noqa: E402
    coverage,
    gated_layers,
    kept_count,
    load_subnetwork,
    materialize,
    popupify,
    restore,
    save_subnetwork,
    supermask_parameters,
)

transformers.logging.set_verbosity_error()


def base_classes(model: nn.Module) -> dict[str, type]:
    return {name: getattr(type(m), "_supermask_base", type(m)) for name, m in model.named_modules()}


def plain_attributes(model: nn.Module) -> dict[str, dict]:
    kinds = (str, int, float, bool, type(None))
    out = {}
    for name, m in model.named_modules():
        out[name] = {k: v for k, v in vars(m).items() if isinstance(v, kinds) and not k.startswith("_supermask")}
    return out


# ------------------------------------------------------------------------------------------ capture leaves no trace


def test_capturing_the_graph_leaves_bigbird_as_it_was():
    model, inputs = build("bigbird")
    classes, attributes = base_classes(model), plain_attributes(model)
    config = model.config.to_dict()
    popupify(model, k=0.5)
    assert base_classes(model) == classes  # block-sparse attention modules still in place
    assert plain_attributes(model) == attributes
    config_after = {k: v for k, v in model.config.to_dict().items() if k != "supermask_fx"}
    assert config_after == config
    assert coverage(model).path == "export"
    with torch.no_grad():  # the forward that failed after popupify: block-sparse at 48 tokens
        assert model(**inputs).logits.shape == (2, 3)


def hooks_and_attributes(model: nn.Module) -> dict[str, tuple]:
    out = {}
    for name, m in model.named_modules():
        hooks = {  # forward and backward hooks (popupify's own state_dict hooks on the root are deliberate)
            k: tuple(v) for k, v in vars(m).items() if k.startswith(("_forward", "_backward")) and isinstance(v, dict)
        }
        out[name] = (sorted(k for k in vars(m) if not k.startswith("_supermask")), hooks)
    return out


@pytest.mark.parametrize("name", ["wav2vec2", "bert"])
def test_capturing_the_graph_adds_no_hook_and_no_attribute(name):
    model, _ = build(name)  # a transformers model's first forward installs output-capturing hooks
    before = hooks_and_attributes(model)
    popupify(model, k=0.5)
    after = hooks_and_attributes(model)
    assert after.keys() == before.keys()
    for module_name, (names, hooks) in after.items():
        assert hooks == before[module_name][1], module_name
        assert set(names) == set(before[module_name][0]), module_name


def test_use_cache_taken_through_kwargs_does_not_stop_export():
    model, _ = build("granitemoe")
    expected = {n for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        popupify(model, k=0.5)
    assert coverage(model).path == "export"
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(m._parameters[g.param])] for m, g in gated_layers(model)} == expected  # experts, router too
    assert model.config.use_cache is True  # turned off only while the graph was captured


class _Branchy(transformers.PreTrainedModel):
    """A Hugging Face model whose forward branches on a tensor's value: export fails on a data-dependent guard."""

    config_class = transformers.PretrainedConfig

    def __init__(self, config):
        super().__init__(config)
        self.fc = nn.Linear(4, 4)
        self.W = nn.Parameter(torch.randn(4, 4))

    def forward(self, input_values):
        h = self.fc(input_values)
        if h.sum() > 0:  # data-dependent: not exportable
            h = h @ self.W
        return h


def test_the_fallback_warning_names_the_real_export_error():
    model = _Branchy(transformers.PretrainedConfig())
    with pytest.warns(UserWarning) as caught:
        popupify(model, k=0.5, example_inputs={"input_values": torch.randn(2, 4)})
    text = " ".join(str(w.message) for w in caught)
    assert "experts implementation" not in text
    assert "data-dependent" in text or "GuardOnDataDependent" in text or "Could not guard" in text, text
    assert "W" in coverage(model).ungated


# ------------------------------------------------------------------------------------------- the optimizer's step


class _ThirdPartySGD(torch.optim.Optimizer):
    """An optimizer from outside ``torch.optim`` that writes through ``.data`` (as CUDA-kernel optimizers do)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=5.0, fused=True),
        lambda ps: _ThirdPartySGD(ps, lr=5.0),
    ],
    ids=["adamw_fused", "sgd_fused", "third_party"],
)
def test_masks_follow_scores_written_by_any_optimizer(make):
    torch.manual_seed(0)
    model = popupify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), k=0.4)
    optimizer = make(list(supermask_parameters(model)))
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    flipped = 0
    for _ in range(4):
        before = [g.current_mask(m).clone() for m, g in gated_layers(model)]
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for (module, gate), old in zip(gated_layers(model), before):
            mask = gate.current_mask(module)
            assert torch.equal(mask, top_k_mask(module._parameters[gate.scores], 0.4)), gate.name
            flipped += int((mask != old).sum())
    assert flipped > 0  # the scores moved enough to change the masks: the check above had something to see


# ------------------------------------------------------------------------------------------------ what stays as is


def test_fixed_position_tables_stay_exactly_as_they_are():
    model, inputs = build("pegasus")
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert fixed  # Pegasus's sinusoidal tables
    popupify(model, k=0.5)
    after = dict(model.named_parameters())
    for name, value in fixed.items():
        assert torch.equal(after[name], value), name
        assert not any(g.name == name for _, g in gated_layers(model))
    plain = materialize(model)
    assert {n for n, p in plain.named_parameters() if not p.requires_grad} == set(fixed)


def test_a_model_whose_weights_are_all_frozen_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=False.*requires_grad_\(True\)"):
        popupify(model, k=0.5)


def test_embedding_padding_rows_stay_zero(tmp_path):
    model, inputs = build("roberta")
    rows = {name: m.padding_idx for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.padding_idx}
    assert rows  # word and position embeddings
    popupify(model, k=0.5)
    for name, row in rows.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[row] == 0) and weight.abs().sum() > 0, name
    model.eval()
    save_subnetwork(model, tmp_path / "r.safetensors")
    again = load_subnetwork(build("roberta")[0], tmp_path / "r.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_gemma_norms_scale_by_one_plus_w_and_become_the_identity_whatever_was_loaded():
    model, _ = build("gemma3")
    norms = [(n, m) for n, m in model.named_modules() if "RMSNorm" in type(m).__name__]
    with torch.no_grad():
        for _, m in norms:
            m.weight.fill_(0.7)  # as if trained weights were loaded
    popupify(model, k=0.5)
    assert len(norms) >= 5
    for name, module in norms:
        assert_identity_norm(name, module)


def test_a_weight_joined_by_cat_before_its_matmul_is_gated():
    model, _ = build("mobilebert")
    joined = model.cls.predictions.dense.weight  # cat([decoder.weight.t(), dense.weight]) @ ...
    popupify(model, k=0.5)
    gated = {g.name for _, g in gated_layers(model)}
    assert "cls.predictions.dense.weight" in gated
    assert joined.shape == model.cls.predictions.dense._parameters["weight"].shape
    assert not any("class token" in why for _, _, why in coverage(model).frozen)


# ------------------------------------------------------------------------------------------------------- stacks


def test_peft_adapters_are_refused_in_either_order():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["query", "value"])
    model, _ = build("bert")
    with pytest.raises(ValueError, match="PEFT"):
        popupify(peft.get_peft_model(model, config), k=0.5)
    model, _ = build("bert")
    wrapped = peft.get_peft_model(popupify(model, k=0.5), config)
    with pytest.raises(ValueError, match="PEFT"):
        list(supermask_parameters(wrapped))


def test_a_model_loaded_from_a_popupified_save_is_not_popupified_again(tmp_path):
    model, inputs = build("bert")
    popupify(model, k=0.5)
    model.eval().save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"restore"):
        popupify(plain, k=0.5)
    again = restore(type(model)(transformers.AutoConfig.from_pretrained(tmp_path)), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)
    assert "supermask_fx" not in materialize(model).config.to_dict()


def test_models_built_in_memory_from_one_config_are_each_popupified():
    model, _ = build("bert")
    popupify(model, k=0.5)
    second = type(model)(model.config)  # the same config object, now carrying the settings
    third = type(model)._from_config(copy.deepcopy(model.config))
    popupify(second, k=0.5)
    popupify(third, k=0.5)


# ------------------------------------------------------------------------------------------------ einsum layouts


class _Einsums(nn.Module):
    """Weights read by einsum in three layouts; fan-ins and ranking units written out by hand below."""

    def __init__(self):
        super().__init__()
        self.r_kernel = nn.Parameter(torch.randn(12, 3, 4))  # "td,dnh->tnh": contract d=12, out n*h = 12
        self.experts = nn.Parameter(torch.randn(5, 12, 6))  # "ebd,edf->ebf": 5 experts, contract d=12, out 6
        self.seg = nn.Parameter(torch.randn(2, 3, 4))  # "bind,snd->bnis": per head n (batch, middle), contract d=4

    def forward(self, x):  # x: (t, 12)
        r = torch.einsum("td,dnh->tnh", x, self.r_kernel)  # (t, 3, 4)
        e = torch.einsum("ebd,edf->ebf", x.expand(5, -1, -1), self.experts)  # (5, t, 6)
        s = torch.einsum("bind,snd->bnis", r.unsqueeze(0), self.seg)  # (1, 3, t, 2)
        return r.sum() + e.sum() + s.sum()


@pytest.mark.parametrize(
    "name, fan_in, blocks",
    [("r_kernel", 12, 1), ("experts", 12, 5), ("seg", 4, 1)],
)
def test_einsum_weights_take_fans_and_ranking_from_their_subscripts(name, fan_in, blocks):
    model = popupify(_Einsums(), k=0.3, example_inputs=(torch.randn(7, 12),))
    assert coverage(model).path == "export"
    weight = model._parameters[name]
    assert torch.allclose(weight.abs(), torch.full_like(weight, (2 / fan_in) ** 0.5))  # signed constant
    gate = next(g for _, g in gated_layers(model) if g.name == name)
    kept = gate.current_mask(model).reshape(blocks, -1).sum(1)
    assert kept.tolist() == [kept_count(weight.numel() // blocks, 0.3)] * blocks


def test_einsum_layouts_survive_files_and_restore(tmp_path):
    model = popupify(_Einsums(), k=0.3, example_inputs=(torch.randn(7, 12),))
    x = torch.randn(7, 12)
    save_subnetwork(model, tmp_path / "e.safetensors")
    again = load_subnetwork(_Einsums(), tmp_path / "e.safetensors")
    assert torch.equal(again(x), model(x))
    assert torch.equal(restore(_Einsums(), model.state_dict())(x), model(x))


class _NoGradRegion(nn.Module):
    """A weight used only inside ``torch.no_grad()``: export wraps the region in a higher-order op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.W = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        h = self.fc(x)
        with torch.no_grad():
            frozen = h @ self.W
        return h.sum(-1, keepdim=True) + frozen


def test_a_weight_used_under_no_grad_is_found_inside_the_region():
    model = popupify(_NoGradRegion(), k=0.5, example_inputs=(torch.randn(2, 4),))
    assert coverage(model).path == "export"
    gate = next(g for _, g in gated_layers(model) if g.name == "W")
    assert gate.fan_in_fan_out  # h @ W: stored (in, out), fan-in 6
    assert torch.allclose(model._parameters["W"].abs(), torch.full((6, 3), (2 / 6) ** 0.5))


class _RescalesInEval(nn.Module):
    """Writes into its own weight when it switches to eval, as RWKV does (``weight.div_`` under ``no_grad``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.rescaled = False

    def forward(self, x):
        if not self.training and not self.rescaled:
            with torch.no_grad():
                self.fc.weight.div_(2.0)
            self.rescaled = True
        return self.fc(x)


def test_a_model_that_writes_into_its_masked_weights_is_refused():
    model = popupify(_RescalesInEval(), k=0.5).eval()
    with pytest.raises(RuntimeError, match=r"wrote into the masked weight in place.*rescale_every=0"):
        with torch.no_grad():
            model(torch.randn(2, 6))
    plain = popupify(nn.Sequential(nn.Linear(6, 4)), k=0.5).eval()  # reads only: no refusal, same outputs
    x = torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))
