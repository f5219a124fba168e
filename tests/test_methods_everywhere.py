"""Every follow-up method and option on every tiny Hugging Face family of tests/hf_families.py (mixtures of
experts, tied and padded embeddings, einsum and joined weights) and a torchvision ResNet; every option at once
(multicoat, global top-k, learned norms, bf16 scores, sign-bit weights) on every torchvision classification model
but the four of 300M weights and more (their smaller siblings are there; tests/test_torchvision_models.py gates
them too), and IteRand with sign-bit weights on the torchvision subset of the fast job: popupify, two training
steps, then the file reloads to the same logits bit for bit and ``materialize`` computes what evaluation does."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from supermask_fx import load_subnetwork, materialize, popupify, save_subnetwork, supermask_parameters

pytest.importorskip("transformers")
import torchvision  # noqa: E402
from hf_families import FAMILIES  # noqa: E402
from test_torchvision_models import ALL_MODELS, FAST, input_size  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SETTINGS = {
    "iterand": dict(method="iterand", method_options={"rerand_freq": 1, "rerand_lambda": 0.5}),
    "multicoat": dict(method="multicoat", method_options={"coats": 3}),
    "biprop": dict(method="biprop", init="kaiming_normal"),
    "learned_norms_global": dict(norms="learn", scope="global"),
    "bf16_scores": dict(score_dtype="bfloat16"),
    "sign_bit_weights": dict(weight_storage="bits", scope="global"),
}
HUGE = ("regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32")  # 300M-640M weights; smaller siblings are here
EVERY_OPTION = {  # every option at once on every torchvision model; IteRand (which excludes multicoat) on the subset
    "multicoat_global_learned_norms_bf16_bits": (
        [name for name in ALL_MODELS if name not in HUGE],
        dict(method="multicoat", scope="global", norms="learn", score_dtype="bfloat16", weight_storage="bits"),
    ),
    "iterand_bits": (FAST, dict(method="iterand", method_options={"rerand_freq": 1}, weight_storage="bits")),
}


def _resnet():
    return torchvision.models.resnet18(num_classes=5), {"x": torch.randn(2, 3, 32, 32)}


MODELS = {**FAMILIES, "torchvision_resnet18": _resnet}


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_method_trains_saves_and_materializes(family, setting, tmp_path):
    from transformers import logging

    logging.set_verbosity_error()
    _trains_saves_and_materializes(MODELS[family], SETTINGS[setting], tmp_path)


def _torchvision(name: str):
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's own init warnings (inception, googlenet)
            model = torchvision.models.get_model(name, weights=None, num_classes=5)
        size = input_size(name)
        return model, {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}

    return build


@pytest.mark.parametrize(
    "name, setting", [(name, setting) for setting, (names, _) in sorted(EVERY_OPTION.items()) for name in names]
)
def test_every_option_on_every_torchvision_model(name, setting, tmp_path):
    # lr 0.05: learned BatchNorm scales at 0.5 drive VGG-13-BN's outputs to NaN in two steps, and NaN == NaN fails
    _trains_saves_and_materializes(_torchvision(name), EVERY_OPTION[setting][1], tmp_path, lr=0.05)


def _trains_saves_and_materializes(build, options: dict, tmp_path, lr: float = 0.5) -> None:
    torch.manual_seed(0)
    model, inputs = build()

    def call(m):
        return _output(m(inputs["x"]) if "x" in inputs else m(**inputs))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage notes of models with example-input fallbacks
        popupify(model, 0.5, **options)
    model.train()
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=lr)
    for _ in range(2):
        call(model).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = call(model)
        assert torch.isfinite(expected).all()  # else the comparisons below compare NaNs
        save_subnetwork(model, tmp_path / "s.safetensors")
        torch.manual_seed(0)
        fresh, _ = build()
        assert torch.equal(call(load_subnetwork(fresh, tmp_path / "s.safetensors").eval()), expected)
        torch.testing.assert_close(call(materialize(model).eval()).float(), expected.float(), atol=1e-5, rtol=1e-4)
    del model, fresh
    gc.collect()  # the selection's reference cycles hold whole models until a collection: free them per test
