"""Tests of supermask_fx.models: shapes, parameter counts, FX traceability, widths."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from supermask_fx.models import (
    FC,
    MODEL_NAMES,
    BasicBlock,
    ConvNet,
    build_model,
    conv2,
    conv4,
    conv6,
    conv8,
    resnet18_cifar,
)

INPUTS = [(1, 28), (3, 32)]  # (channels, image size): Fashion-MNIST / CIFAR-10


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names():
    assert set(MODEL_NAMES) == {
        "fc",
        "fc_bn",
        "fc1",
        "fc2",
        "fc4",
        "fc6",
        "conv2",
        "conv4",
        "conv6",
        "conv8",
        "resnet18",
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), INPUTS)
def test_output_shape_and_symbolic_trace(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    batch = 1 if name == "resnet18" else 3  # keep the (CPU) ResNet forward cheap
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, 7)
    assert torch.isfinite(out).all()
    gm = torch.fx.symbolic_trace(model)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), out)


def test_fc_param_count_and_layers():
    model = FC()
    assert n_params(model) == 784 * 300 + 300 * 100 + 100 * 10 == 266200
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 300), (300, 100), (100, 10)]
    # build_model derives in_features from the image shape
    assert n_params(build_model("fc", in_channels=1, image_size=28)) == 266200
    assert build_model("fc", in_channels=3, image_size=32).layers[1].in_features == 3 * 32 * 32
    # flattens any (N, C, H, W) input
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)


@pytest.mark.parametrize(("name", "depth"), [("fc1", 1), ("fc2", 2), ("fc4", 4), ("fc6", 6)])
def test_fc_depth_variants(name, depth):
    model = build_model(name, dataset="mnist", width=0.5)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected = [(784, 150)] + [(150, 150)] * (depth - 1) + [(150, 10)]
    assert [(m.in_features, m.out_features) for m in linears] == expected


def test_conv2_param_count_by_hand():
    expected = 3 * 64 * 9 + 64 * 64 * 9 + 16 * 16 * 64 * 256 + 256 * 256 + 256 * 10
    assert n_params(build_model("conv2", in_channels=3, image_size=32)) == expected
    assert n_params(conv2()) == expected


def test_conv_param_counts_28x28():
    # Conv4 on 28x28x1: 28 -> 14 -> 7, so the classifier sees 7*7*128 features
    expected = 1 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9 + 7 * 7 * 128 * 256 + 256 * 256 + 2560
    assert n_params(build_model("conv4", in_channels=1, image_size=28)) == expected


def test_resnet18_param_count():
    # Kuang Liu's CIFAR ResNet-18 has 11,173,962 parameters; ours has no bias in the final Linear (-10)
    assert n_params(resnet18_cifar()) == 11173962 - 10


@pytest.mark.parametrize("depth", [2, 4, 6, 8])
def test_convnet_architecture(depth):
    model = ConvNet(depth, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    expected = [64, 64, 128, 128, 256, 256, 512, 512][:depth]
    assert [c.out_channels for c in convs] == expected
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert len(pools) == depth // 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    side = 32 // 2 ** (depth // 2)
    assert [(m.in_features, m.out_features) for m in linears] == [
        (expected[-1] * side * side, 256),
        (256, 256),
        (256, 10),
    ]


def test_conv_helpers():
    for fn, depth in ((conv2, 2), (conv4, 4), (conv6, 6), (conv8, 8)):
        model = fn(in_channels=1, image_size=28, num_classes=5)
        assert model.depth == depth
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 5)


def test_conv8_on_28x28_uses_floor_pooling():
    model = conv8(in_channels=1, image_size=28)
    assert model.feature_shape == (512, 1, 1)  # 28 -> 14 -> 7 -> 3 -> 1
    assert model.classifier[1].in_features == 512
    assert conv6(in_channels=1, image_size=28).feature_shape == (256, 3, 3)


def test_too_small_image_raises():
    with pytest.raises(ValueError, match="too small"):
        conv8(image_size=8)  # 8 -> 4 -> 2 -> 1 -> 0
    conv6(image_size=8)  # 8 -> 4 -> 2 -> 1 still fine


def test_bad_depth_and_unknown_name():
    with pytest.raises(ValueError, match="depth"):
        ConvNet(3)
    with pytest.raises(ValueError) as exc:
        build_model("vgg16")
    for name in MODEL_NAMES:
        assert name in str(exc.value)


@pytest.mark.parametrize("name", ["fc", "conv2", "conv4", "conv6", "conv8"])
def test_no_bias_parameters(name):
    model = build_model(name)
    names = [n for n, _ in model.named_parameters()]
    assert names and not [n for n in names if "bias" in n]


def test_resnet_conv_and_linear_have_no_bias():
    model = resnet18_cifar()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 1 + 16 + 3 + 1  # stem, 8 blocks x 2 convs, 3 projection shortcuts, classifier
    assert all(m.bias is None for m in layers)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 16 + 3


def test_resnet18_structure():
    model = resnet18_cifar()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert [b.conv1.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    has_projection = [isinstance(b.shortcut, nn.Sequential) for b in blocks]
    assert has_projection == [False, False, True, False, True, False, True, False]
    assert all(b.shortcut[0].kernel_size == (1, 1) for b, p in zip(blocks, has_projection) if p)
    assert model.linear.in_features == 512


def test_width_multiplier_changes_channels():
    half = build_model("conv4", width=0.5)
    convs = [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64]
    linears = [(m.in_features, m.out_features) for m in half.modules() if isinstance(m, nn.Linear)]
    assert linears == [(64 * 8 * 8, 128), (128, 128), (128, 10)]
    double = build_model("conv2", width=2.0)
    assert [m.out_channels for m in double.modules() if isinstance(m, nn.Conv2d)] == [128, 128]
    assert n_params(build_model("conv2", width=0.5)) < n_params(build_model("conv2"))
    fc = build_model("fc", in_channels=1, image_size=28, width=0.5)
    assert [m.out_features for m in fc.modules() if isinstance(m, nn.Linear)] == [150, 50, 10]
    res = build_model("resnet18", width=0.25)
    assert res.conv1.out_channels == 16 and res.linear.in_features == 128
    assert res(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # tiny widths never reach zero channels
    tiny = build_model("conv2", width=0.001)
    assert [m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)] == [1, 1]


@pytest.mark.parametrize("name", ["fc", "conv2"])
def test_build_model_takes_sizes_from_a_dataset(name):
    from supermask_fx.data import dataset_info

    fmnist = build_model(name, dataset="fashion_mnist", width=0.25)
    assert fmnist(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    cifar = build_model(name, dataset="CIFAR-10", width=0.25)  # any name dataset_info accepts, or its DatasetInfo
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    same = build_model(name, dataset=dataset_info("cifar10"), width=0.25)
    assert n_params(same) == n_params(cifar) == n_params(build_model(name, in_channels=3, image_size=32, width=0.25))
    # explicit sizes may repeat the data set's
    agreeing = build_model(name, dataset="fashion_mnist", num_classes=10, in_channels=1, image_size=28, width=0.25)
    assert n_params(agreeing) == n_params(fmnist)


def test_build_model_refuses_sizes_that_contradict_the_dataset():
    with pytest.raises(ValueError, match=r"dataset 'fashion_mnist' conflicts with in_channels=3 \(it has 1\)"):
        build_model("conv2", dataset="fashion_mnist", in_channels=3)
    with pytest.raises(ValueError, match=r"num_classes=100 \(it has 10\), image_size=32 \(it has 28\)"):
        build_model("fc", dataset="mnist", num_classes=100, image_size=32)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; valid names"):
        build_model("conv2", dataset="svhn")


def test_build_model_is_case_insensitive_and_keyword_only():
    assert isinstance(build_model("Conv6"), ConvNet)
    with pytest.raises(TypeError):
        build_model("fc", 10)  # num_classes etc. are keyword-only
