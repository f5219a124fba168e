"""Scores in a narrower dtype than the weights (``PopupConfig(score_dtype="bfloat16")``): exact top-k over the
stored values, gradients in that dtype, files and state_dicts round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from supermask_fx import gated_layers, load_subnetwork, popupify, restore, save_subnetwork, supermask_parameters
from tests.references import top_k_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10, bias=False))


def train(model, steps=4):
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_scores_take_the_dtype_and_the_mask_is_the_exact_top_k_of_their_values(dtype):
    model = popupify(net(), 0.3, score_dtype=dtype)
    want = getattr(torch, str(dtype).removeprefix("torch."))
    train(model)
    for module, gate in gated_layers(model):
        scores = module._parameters[gate.scores]
        assert scores.dtype == want and scores.grad.dtype == want
        assert module._parameters[gate.param].dtype == torch.float32  # the weights keep theirs
        assert torch.equal(gate.current_mask(module), top_k_mask(scores.detach().float(), 0.3))


def test_ties_among_bf16_scores_follow_the_documented_rule():
    model = popupify(nn.Sequential(nn.Linear(50, 4, bias=False)), 0.3, score_dtype="bfloat16")
    module, gate = next(iter(gated_layers(model)))
    with torch.no_grad():  # 200 scores, 100 of them tied at the top: 60 kept, the lowest flat indices among the tie
        module._parameters[gate.scores].copy_(torch.tensor([0.5, -0.25, 0.125, -0.5] * 50).view(4, 50))
    mask = gate.current_mask(module).flatten()
    tied_top = torch.nonzero(torch.tensor([1, 0, 0, 1] * 50, dtype=torch.bool)).flatten()
    expected = torch.zeros(200, dtype=torch.bool)
    expected[tied_top[:60]] = True
    assert int(mask.sum()) == 60 and torch.equal(mask, expected)


def test_bf16_scores_round_trip_through_files_and_state_dicts(tmp_path):
    model = popupify(net(), 0.3, score_dtype="bfloat16")
    train(model)
    x = torch.randn(4, 3, 6, 6)
    out = model.eval()(x)
    save_subnetwork(model, tmp_path / "b.safetensors")
    assert torch.equal(load_subnetwork(net(), tmp_path / "b.safetensors").eval()(x), out)
    again = restore(net(), model.state_dict())
    assert torch.equal(again.eval()(x), out)
    assert all(m._parameters[g.scores].dtype == torch.bfloat16 for m, g in gated_layers(again))


def test_a_state_dict_of_other_score_dtype_is_refused_with_the_field():
    state = popupify(net(), 0.3, score_dtype="bfloat16").state_dict()
    with pytest.raises(RuntimeError, match="score_dtype: 'bfloat16' in the state_dict, None in this model"):
        popupify(net(), 0.3).load_state_dict(state)


def test_bad_score_dtype_is_refused():
    with pytest.raises(ValueError, match="score_dtype"):
        popupify(net(), 0.3, score_dtype="int8")


def test_memory_of_scores_halves():
    full = popupify(net(), 0.3)
    half = popupify(net(), 0.3, score_dtype="bfloat16")

    def nbytes(model):
        return sum(p.numel() * p.element_size() for p in supermask_parameters(model))

    assert 2 * nbytes(half) == nbytes(full)


def test_the_engine_trains_bf16_scores_and_still_refuses_a_converted_model():
    pytest.importorskip("accelerate")
    from supermask_fx.training import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 6, 6, generator=g), torch.randint(0, 10, (32,), generator=g)
    )
    config = TrainConfig(epochs=1, batch_size=16, progress="none", eval_every=0)
    model = popupify(net(), 0.3, score_dtype="bfloat16")
    before = [m._parameters[g.scores].detach().clone() for m, g in gated_layers(model)]
    train(model, data, None, config)
    after = [m._parameters[g.scores] for m, g in gated_layers(model)]
    assert all(a.dtype == torch.bfloat16 and not torch.equal(a, b) for a, b in zip(after, before))
    with pytest.raises(ValueError, match="converted with"):
        train(popupify(net(), 0.3).bfloat16(), data, None, config)


def test_bf16_scores_are_the_float32_scores_rounded():
    """popupify draws bf16 scores a chunk at a time (no float32 copy of a layer): the values must be the float32
    draw rounded, across chunk boundaries (a layer of 2.1M scores)."""
    big = lambda: nn.Sequential(nn.Linear(700, 3001, bias=False))  # noqa: E731
    full = popupify(big(), 0.3)
    half = popupify(big(), 0.3, score_dtype="bfloat16")
    assert torch.equal(half[0].scores, full[0].scores.detach().to(torch.bfloat16))
