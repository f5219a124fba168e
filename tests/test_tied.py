"""Tied weights (a language model's token embedding and output layer): one weight, one mask, everywhere it is
used, through training, pickling, subnetwork files and ``materialize``."""

import copy
import io
import pickle

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from supermask_fx import (
    kept_count,
    load_subnetwork,
    mask_stats,
    materialize,
    popupify,
    save_subnetwork,
    supermask_parameters,
)


class TinyLM(nn.Module):
    """Embedding and output layer share one Parameter, as GPT-2's wte and lm_head do."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


IDS = torch.tensor([[1, 4, 7, 10], [0, 3, 3, 9]])


def test_the_tied_weight_is_masked_wherever_it_is_read():
    model = popupify(TinyLM(), k=0.5)
    assert [layer.name for layer in mask_stats(model).layers] == ["mix.weight", "head.weight"]  # gated once
    assert model.embed._parameters["weight"] is model.head._parameters["weight"]  # still tied
    assert torch.equal(model.embed.weight, model.head.weight)  # both read weight * mask
    assert int((model.embed.weight != 0).sum()) == kept_count(66, 0.5)
    assert isinstance(model.embed, nn.Embedding) and not hasattr(model.embed, "scores")


def test_score_gradient_sums_both_uses():
    model = popupify(TinyLM(), k=0.5)
    F.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
    # reference: the same forward on a leaf w_eff used by both modules; straight-through grad = dL/dw_eff * w * sign(s)
    w = model.head._parameters["weight"].detach()
    mask = model.head.weight.detach() != 0
    w_eff = (w * mask).requires_grad_()
    h = torch.tanh(model.mix(F.embedding(IDS, w_eff)))
    F.cross_entropy(F.linear(h, w_eff).flatten(0, 1), IDS.flatten()).backward()
    expected = w_eff.grad * w * torch.sign(model.head.scores.detach())
    torch.testing.assert_close(model.head.scores.grad, expected)
    embedding_part = torch.zeros_like(w).index_add_(0, IDS.flatten(), torch.ones(IDS.numel(), w.shape[1]))
    assert (embedding_part.bool() & (w_eff.grad != 0)).any()  # the embedding's use contributes


def test_training_pickle_deepcopy_and_files_keep_the_tie(tmp_path):
    model = popupify(TinyLM(), k=0.5)
    optimizer = torch.optim.SGD(supermask_parameters(model), lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
        optimizer.step()
    model.eval()
    expected = model(IDS)
    assert torch.equal(model.embed.weight, model.head.weight)  # after the masks moved
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(IDS), expected)
        assert clone.embed._parameters["weight"] is clone.head._parameters["weight"]
        buffer = io.BytesIO()
        torch.save(clone, buffer)
    path = tmp_path / "lm.safetensors"
    save_subnetwork(model, path)
    tensors = load_file(path)
    assert "state/embed.weight" not in tensors and "state/head.weight" not in tensors  # regenerated, not stored
    assert torch.equal(load_subnetwork(TinyLM(), path).eval()(IDS), expected)


def test_materialize_bakes_the_mask_into_the_tied_weight_once():
    model = popupify(TinyLM(), k=0.5).eval()
    expected = model(IDS)
    plain = materialize(model)
    assert type(plain.embed) is nn.Embedding and type(plain.head) is nn.Linear
    assert plain.embed.weight is plain.head.weight
    fresh = TinyLM()
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.eval()(IDS), expected)


def test_two_linear_layers_sharing_a_weight():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5, bias=False)
            self.b = nn.Linear(5, 5, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = popupify(Shared(), k=0.4)
    assert [layer.name for layer in mask_stats(model).layers] == ["a.weight"]
    assert torch.equal(model.b.weight, model.a.weight) and int((model.b.weight != 0).sum()) == kept_count(25, 0.4)
    model(torch.randn(3, 5)).sum().backward()  # b's forward keeps its w_eff (only a rebuilds it); both reach the scores
    assert model.a.scores.grad.abs().sum() > 0
