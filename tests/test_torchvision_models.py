"""Every torchvision classification model popupifies, runs forward and backward, and obeys the rules.

CI runs a subset that covers the interesting cases (BatchNorm, LayerNorm2d, MultiheadAttention in ViT, Swin's
``shifted_window_attention(x, self.qkv.weight, ...)``, GoogLeNet's auxiliary heads); ``-m slow`` runs all of them.
"""

import gc
import warnings

import pytest
import torch
import torchvision
from torch import nn

from supermask_fx import kept_count, mask_stats, popupify
from supermask_fx.graph.discover import NORM_TYPES

ALL_MODELS = sorted(torchvision.models.list_models(module=torchvision.models))
FAST = ["resnet18", "mobilenet_v3_small", "convnext_tiny", "googlenet", "swin_t", "vit_b_16", "squeezenet1_1"]
INPUT_SIZE = {"inception_v3": 299, "googlenet": 96}
FIXED_224 = ("vit_", "maxvit", "swin")  # fixed image size, or windows that need it


def input_size(name):
    if name.startswith(FIXED_224):
        return 224
    return INPUT_SIZE.get(name, 64)


def check_model(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's own init warnings (inception, googlenet)
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    linear_modules = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every torchvision model traces: no fallback warning
        popupify(model, k=0.3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("scores") for n in trainable), trainable[:5]
    gated = {n.rsplit(".", 1)[0] for n in trainable}
    assert set(linear_modules) <= gated | {n for n in linear_modules if "in_proj" in n}, set(linear_modules) - gated
    for module in model.modules():
        if isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
            assert not module.weight.requires_grad
    for layer in mask_stats(model).layers:
        assert (
            layer.kept == kept_count(layer.numel, 0.3)
            and abs(layer.kept - 0.3 * layer.numel) < 1 + 1e-9
            or (layer.kept == 1)
        )
    size = input_size(name)
    out = model(torch.randn(2, 3, size, size))
    outputs = [t for t in out if t is not None] if isinstance(out, tuple) else [out]  # inception/googlenet aux heads
    assert all(t.shape == (2, 10) for t in outputs)
    sum(t.logsumexp(1).sum() for t in outputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    return model


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(name):
    model = check_model(name)
    if name == "swin_t":  # weights passed straight to torchvision's wrapped attention function are gated too
        assert model.features[1][0].attn.qkv.scores.grad.abs().sum() > 0
    if name == "vit_b_16":
        attention = model.encoder.layers.encoder_layer_0.self_attention
        assert attention.in_proj_scores.grad.abs().sum() > 0
        assert not model.encoder.pos_embedding.requires_grad and not model.class_token.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in FAST])
def test_every_torchvision_model(name):
    check_model(name)
    gc.collect()  # gated modules and their selectors form reference cycles: free big models before the next
