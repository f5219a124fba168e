"""Hugging Face families (built offline from tiny configs): ``popupify(model, k)`` with no other argument gates
every weight, freezes the rest with norms at 1 / 0, trains only scores, and round-trips through subnetwork files
and ``materialize``.

The expected gated set is derived here without the library: every parameter of 2+ dimensions, minus the ones
each family uses otherwise (listed below with the reason, read off the models' source), one name per tied
Parameter. Independently, each gated weight must reach a matrix product or linear map in the exported graph.
"""

import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
import transformers  # noqa: E402
from hf_families import FAMILIES, build  # noqa: E402

from supermask_fx import (  # noqa: E402
    coverage,
    gated_layers,
    kept_count,
    load_subnetwork,
    mask_stats,
    materialize,
    popupify,
    save_subnetwork,
    supermask_parameters,
)

transformers.logging.set_verbosity_error()

# 2+-dim parameters that are not weights: (family, name suffix) -> what the model does with them
NOT_WEIGHTS = {
    ("vit", "embeddings.cls_token"): "concatenated to the patch tokens",
    ("vit", "embeddings.position_embeddings"): "added to the tokens",
    ("whisper", "decoder.embed_positions.weight"): "WhisperPositionalEmbedding slices it and adds it",
    ("wav2vec2", "parametrizations.weight.original0"): "weight norm's magnitude g of the positional conv",
    ("funnel", "attention.r_w_bias"): "added to the query heads (q_head + r_w_bias)",
    ("funnel", "attention.r_r_bias"): "added to the query heads (q_head + r_r_bias)",
    ("funnel", "attention.r_s_bias"): "added to the query heads (q_head + r_s_bias)",
}
PRODUCT_OPS = ("linear", "conv", "embedding", "mm", "addmm", "bmm", "matmul", "einsum", "grouped_mm")


def expected_weights(family: str, model: nn.Module) -> set[int]:
    """ids of the Parameters that must be gated: not those the model itself does not train (``requires_grad=False``:
    Whisper's sinusoidal encoder positions), which are data."""
    out = set()
    for name, p in model.named_parameters():  # one name per Parameter (tied ones once)
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and not any(f == family and name.endswith(s) for f, s in NOT_WEIGHTS):
            out.add(id(p))
    return out


def reaches_product(model, inputs) -> set[str]:
    """Parameter names whose placeholder reaches (through any ops) a node of a matrix product / linear map."""
    kwargs = dict(inputs, use_cache=False) if getattr(model.config, "use_cache", None) is not None else inputs
    program = torch.export.export(model, (), kwargs, strict=False)
    names = program.graph_signature.inputs_to_parameters
    found = set()
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        frontier, seen = [node], set()
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user in seen:
                    continue
                seen.add(user)
                op = str(user.target).split("::")[-1].split(".")[-2 if "." in str(user.target) else -1]
                if any(op.lstrip("_").startswith(p) for p in PRODUCT_OPS):
                    found.add(names[node.name])
                frontier.append(user)
    return found


def logits_of(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.logits_per_image


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name = request.param
    reference, inputs = build(name)
    reach = reaches_product(reference, inputs)
    model, _ = build(name)
    names = {id(p): n for n, p in model.named_parameters()}  # (weight_storage="bits" gives new Parameter objects)
    expected = {names[i] for i in expected_weights(name, model)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every family is read from its graph: no fallback warning
        popupify(model, k=0.5)
    return name, model, inputs, expected, reach


def test_every_weight_is_gated_and_nothing_else(family):
    name, model, _, expected, reach = family
    report = coverage(model)
    assert report.path == "export" and not report.ungated
    pairs = list(gated_layers(model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(m._parameters[g.param])] for m, g in pairs} == expected
    assert all(g.name in reach or g.name.replace("lm_head", "") for _, g in pairs)
    untied = {g.name for _, g in pairs if not any(g.name.endswith(s) for s in ("lm_head.weight",))}
    assert untied <= reach, untied - reach
    for layer in mask_stats(model).layers:
        assert layer.kept == kept_count(layer.numel, 0.5) or name in ("mixtral", "qwen2_moe", "granitemoe", "jetmoe")


def test_only_scores_train_and_norms_are_reset(family):
    _, model, _, _, _ = family
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("scores") for n in trainable)
    assert len(trainable) == len(list(gated_layers(model)))
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and module._parameters:  # LayerNorm, LlamaRMSNorm, Gemma's, ...
            assert_identity_norm(module_name, module)


def assert_identity_norm(name: str, module: nn.Module) -> None:
    """The norm's output is the plain normalized input, without any scale or shift: layer-normalized, or
    RMS-normalized (``x / sqrt(mean(x^2) + eps)``), whatever form the model writes its affine part in (or ``x``
    itself: MobileBERT's ``NoNorm`` is only the affine part)."""
    width = next(iter(module._parameters.values())).shape[-1]
    eps = next((getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(module, a)), 1e-5)
    g = torch.Generator().manual_seed(0)
    if isinstance(module, nn.GroupNorm):
        x = torch.randn(2, width, 7, generator=g)
        normed = torch.nn.functional.group_norm(x, module.num_groups, eps=eps)
        plain = [normed, torch.relu(normed)]  # BiT's GroupNorm carries its ReLU
    else:
        x = torch.randn(2, 5, width, generator=g)
        layer = torch.nn.functional.layer_norm(x, (width,), eps=eps)
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        plain = [layer, rms, x]
    with torch.no_grad():
        out = module(x)
    assert any(torch.allclose(out, p, rtol=1e-5, atol=1e-6) for p in plain), f"{name} is not an identity-affine norm"


def test_one_step_changes_only_scores(family):
    _, model, inputs, _, _ = family
    before = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    model.train()
    logits_of(model, inputs).float().square().mean().backward()
    optimizer.step()
    model.eval()
    changed = {
        n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if not torch.equal(t, before[n])
    }
    assert changed and all(n.endswith("scores") for n in changed)


def test_subnetwork_file_and_materialize_reproduce_the_logits(family, tmp_path):
    name, model, inputs, _, _ = family
    model.eval()
    with torch.no_grad():
        expected = logits_of(model, inputs)
    path = tmp_path / f"{name}.safetensors"
    save_subnetwork(model, path)
    fresh, _ = build(name)
    load_subnetwork(fresh, path).eval()
    with torch.no_grad():
        assert torch.equal(logits_of(fresh, inputs), expected)
    plain = materialize(model).eval()
    assert type(plain) is type(fresh) and not any(n.endswith("scores") for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.equal(logits_of(plain, inputs), expected)
    again, _ = build(name)
    again.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(logits_of(again.eval(), inputs), expected)


def test_gpt2_conv1d_is_read_as_in_out():
    model, _ = build("gpt2")
    popupify(model, k=0.5)
    conv1d = model.transformer.h[0].mlp.c_fc
    w = conv1d._parameters["weight"]  # stored (in, out) = (32, 128): fan-in 32
    assert w.shape == (32, 128) and torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 32)))
    assert model.lm_head.scores is not None and not hasattr(model.transformer.wte, "scores")  # tied: gated once
    assert torch.equal(model.transformer.wte.weight, model.lm_head.weight)


@pytest.mark.parametrize("name, count", [("mixtral", 4), ("qwen2_moe", 4), ("jetmoe", 8)])
def test_experts_are_drawn_and_ranked_one_matrix_at_a_time(name, count):
    model, _ = build(name)
    popupify(model, k=0.3)
    experts = [(m, g) for m, g in gated_layers(model) if m._parameters[g.param].dim() == 3]
    assert len(experts) == count  # 2 layers x (gate_up_proj, down_proj); JetMoE also its attention experts
    for module, gate in experts:
        w = module._parameters[gate.param]
        fan_in = w.shape[-1]  # (experts, out, in)
        assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / fan_in)))
        kept = gate.current_mask(module).flatten(1).sum(1)
        assert kept.tolist() == [kept_count(w[0].numel(), 0.3)] * w.shape[0]


def test_eager_experts_are_exported_through_grouped_mm():
    model, _ = build("mixtral")
    model.set_experts_implementation("eager")  # loops over nonzero(): not exportable as such
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        popupify(model, k=0.5)
    assert coverage(model).path == "export"
    assert model.get_experts_implementation()[""] == "eager"  # restored after discovery
    assert sum(m._parameters[g.param].dim() == 3 for m, g in gated_layers(model)) == 4


def test_without_inputs_the_fallback_names_what_it_leaves_and_the_fix():
    class Custom(nn.Module):  # iterates over a tensor: fx cannot trace it, export can; not a Hugging Face model
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.W = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.stack([self.fc(row) for row in x]) @ self.W

    with pytest.warns(UserWarning, match=r"(?s)Not gated.*W\b.*example_inputs="):
        popupify(Custom(), k=0.5)
    model = popupify(Custom(), k=0.5, example_inputs=(torch.randn(2, 4),))
    assert coverage(model).path == "export"
    assert [g.name for _, g in gated_layers(model)] == ["W", "fc.weight"]  # named_modules order: root first
    assert next(g for _, g in gated_layers(model) if g.name == "W").fan_in_fan_out  # x @ W: stored (in, out)
