"""Masks over the weights a user brings (``init="keep"``): the weights, biases and norms stay bit for bit, the
first mask is each layer's top-k by magnitude, files store a fingerprint of the base instead of a seed, and a
Hugging Face model loaded from a checkpoint is never redrawn silently. Expectations come from the model before
``popupify`` and from a top-k written here."""

from __future__ import annotations

import copy

import pytest
import torch
from references import top_k_mask
from torch import nn

from supermask_fx import (
    SubnetworkFileError,
    gated_layers,
    load_subnetwork,
    materialize,
    popupify,
    restore,
    save_subnetwork,
    supermask_parameters,
)


def pretrained_convnet(seed: int = 0) -> nn.Module:
    """A small conv net whose weights, biases and norms are far from any init (as if trained)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + 0.1)
    model.train()(torch.randn(16, 3, 6, 6))  # running statistics away from their defaults
    return model.eval()


def test_at_k_1_the_outputs_are_the_original_ones_and_nothing_changed():
    model = pretrained_convnet()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    popupify(model, k=1.0, init="keep")
    state = {n: t for n, t in model.state_dict().items() if n in before}
    assert all(torch.equal(state[n], before[n]) for n in before)  # weights, biases, norms, running stats
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert [n for n, _ in ((n, p) for n, p in model.named_parameters() if p.requires_grad)] == ["0.scores", "4.scores"]


def test_the_first_mask_is_each_layers_top_k_mask():
    model = popupify(pretrained_convnet(), k=0.3, init="keep")
    for module, gate in gated_layers(model):
        weight = module._parameters["weight"]
        assert torch.equal(gate.current_mask(module), top_k_mask(weight, 0.3)), gate.name


def test_scores_can_start_random_over_kept_weights():
    a = popupify(pretrained_convnet(), k=0.3, init="keep", scores="random", seed=1)
    b = popupify(pretrained_convnet(), k=0.3, init="keep", scores="random", seed=1)
    assert torch.equal(a[0].scores, b[0].scores)
    assert not torch.equal(a[0].scores, a[0]._parameters["weight"].abs())


def trained(model: nn.Module) -> nn.Module:
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.5)
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 5, (32,))
    model.train()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_files_store_a_fingerprint_of_the_base_and_refuse_another_base(tmp_path):
    model = trained(popupify(pretrained_convnet(), k=0.5, init="keep"))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    size = save_subnetwork(model, tmp_path / "kept.safetensors")
    weights = sum(m._parameters["weight"].numel() for m, _ in gated_layers(model))
    assert size < weights / 8 + 8_000  # about a bit per weight, plus the header and the stored biases and norms
    loaded = load_subnetwork(pretrained_convnet(), tmp_path / "kept.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    with pytest.raises(SubnetworkFileError, match="not the base weights"):
        load_subnetwork(pretrained_convnet(seed=1), tmp_path / "kept.safetensors")


def test_state_dict_restore_and_materialize_work_over_kept_weights():
    model = trained(popupify(pretrained_convnet(), k=0.5, init="keep"))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(restore(pretrained_convnet(), model.state_dict()).eval()(x), expected)
        assert torch.equal(materialize(model).eval()(x), expected)
    with pytest.raises(ValueError, match="not this model's"):
        restore(pretrained_convnet(seed=1), model.state_dict())


def test_a_hugging_face_model_from_a_checkpoint_needs_init_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    built = transformers.BertForSequenceClassification(config)
    popupify(copy.deepcopy(built), k=0.5)  # built from a config: random weights are what the user has
    built.save_pretrained(tmp_path)
    pretrained = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match=r"init='keep'.*init='signed_constant'"):
        popupify(copy.deepcopy(pretrained), k=0.5)
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        expected = pretrained(input_ids=ids).logits
        kept = popupify(copy.deepcopy(pretrained), k=1.0, init="keep").eval()
        assert torch.equal(kept(input_ids=ids).logits, expected)
    redrawn = popupify(copy.deepcopy(pretrained), k=0.5, init="signed_constant")  # on purpose: allowed
    assert not torch.equal(redrawn.classifier._parameters["weight"], pretrained.classifier.weight)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit", "resnet18"])
def test_kept_weights_on_real_architectures(name, tmp_path):
    if name == "resnet18":
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model, inputs = torchvision.models.resnet18(num_classes=7).eval(), {"x": torch.randn(2, 3, 32, 32)}
    else:
        pytest.importorskip("transformers")
        from hf_families import build

        model, inputs = build(name)

    def logits(m):
        with torch.no_grad():
            out = m(**inputs) if name != "resnet18" else m(inputs["x"])
        return out if isinstance(out, torch.Tensor) else out.logits

    base = copy.deepcopy(model)
    expected = logits(model)
    popupify(model, k=1.0, init="keep")
    assert torch.equal(logits(model.eval()), expected)  # k = 1: the original model, bit for bit
    masked = popupify(copy.deepcopy(base), k=0.5, init="keep").eval()
    for module, gate in gated_layers(masked):
        weight = module._parameters[gate.param]
        if gate.expert_dims == 0 and gate.selector is not None and len(gate.selector.members) == 1:
            assert torch.equal(gate.current_mask(module), top_k_mask(weight, 0.5)), gate.name
    save_subnetwork(masked, tmp_path / "m.safetensors")
    again = load_subnetwork(copy.deepcopy(base), tmp_path / "m.safetensors").eval()
    assert torch.equal(logits(again), logits(masked))


def test_hugging_face_reload_of_masks_over_pretrained_weights_needs_the_base(tmp_path):
    transformers = pytest.importorskip("transformers")
    from supermask_fx.integrations.huggingface import from_pretrained

    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    model = popupify(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base"), k=0.5, init="keep")
    trained_scores = torch.randn_like(model.classifier.scores)
    with torch.no_grad():
        model.classifier.scores.copy_(trained_scores)
    model.eval().save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="base="):
        from_pretrained(transformers.BertForSequenceClassification, tmp_path / "saved")
    again = from_pretrained(transformers.BertForSequenceClassification, tmp_path / "saved", base=tmp_path / "base")
    ids = torch.randint(3, 96, (2, 8))
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    assert torch.equal(again.classifier.scores, trained_scores) and again.classifier.scores.requires_grad


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_kept_weights_and_named_masks_on_timm_models(name, tmp_path):
    """A timm model's own weights masked (k = 1: its outputs, bit for bit), a second mask trained while the first
    stays bit-identical, and the file of both masks reloading onto the same base."""
    timm = pytest.importorskip("timm")
    from supermask_fx import add_mask, set_mask

    torch.manual_seed(0)
    kwargs = {"img_size": 32} if "vit" in name else {}
    base = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)
    full = popupify(copy.deepcopy(base), k=1.0, init="keep").eval()
    with torch.no_grad():
        assert torch.equal(full(x), expected)
    model = popupify(copy.deepcopy(base), k=0.5, init="keep").eval()
    first = [g.current_mask(m).clone() for m, g in gated_layers(model)]
    add_mask(model, "task2")
    set_mask(model, "task2")
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    model.train()
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    model.eval()
    set_mask(model, "default")
    assert all(torch.equal(g.current_mask(m), a) for (m, g), a in zip(gated_layers(model), first))
    with torch.no_grad():
        default_logits = model(x)
    save_subnetwork(model, tmp_path / "timm.safetensors")
    again = load_subnetwork(copy.deepcopy(base), tmp_path / "timm.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(again(x), default_logits)
